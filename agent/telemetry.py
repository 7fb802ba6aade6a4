"""Logging: structlog for the agent, the standard library's ``logging`` for third parties, one output.

Every event, whether from ``get_logger(...)`` or from a library logging through ``logging`` (paho, httpx,
uvicorn), runs through the same chain and ends as one line on one stream:

    merge contextvars → level → (logger name) → UTC timestamp → exception text → redaction → recent problems
    → renderer

The renderer is JSON lines when the stream is not a terminal (journald captures stdout) and structlog's
``ConsoleRenderer`` on a terminal; ``EDGE_AGENT_LOG__FORMAT`` forces either. Redaction runs last before
rendering so nothing added earlier (tracebacks included) escapes it. Warnings and errors are also kept, redacted,
in a small table of recent problems that ``edge-agent status`` shows (:data:`PROBLEMS`).
"""

from __future__ import annotations

import json
import logging
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import SecretBytes, SecretStr

# structlog imports rich and colorama when they are installed (rich comes with the [demo] extra): ~3.5 MB of
# pretty tracebacks, locals and Windows colours that the daemon never uses (exceptions become text or dicts,
# show_locals=False, before any renderer sees them; ANSI colours need no colorama off Windows). Hidden while
# structlog loads, so that it falls back to its plain formatters; a later `import rich` works as usual.
_HIDDEN = [name for name in ("rich", "colorama") if name not in sys.modules]
for _name in _HIDDEN:
    sys.modules[_name] = None  # type: ignore[assignment]  # None in sys.modules: the import raises ImportError
try:
    import structlog
    from structlog.processors import ExceptionRenderer
    from structlog.tracebacks import ExceptionDictTransformer
    from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger
finally:
    for _name in _HIDDEN:
        del sys.modules[_name]

if TYPE_CHECKING:
    from agent.config import Settings

__all__ = [
    "MASK",
    "PROBLEMS",
    "RecentProblems",
    "configure_logging",
    "get_logger",
    "redact_event",
    "register_secret",
    "warn_if_world_readable",
]

MASK = "**********"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SENSITIVE_KEY_PARTS = ("password", "token", "secret", "authorization", "credential")
# Secrets shorter than this would mask ordinary words and digits all over the output.
_MIN_SECRET_LEN = 4
# Deeper structures are flattened to their (scrubbed) repr instead of walked, which also stops cycles.
_MAX_DEPTH = 6

_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Mask ``value`` wherever it appears in any later log output. Values under 4 characters are ignored."""
    global _secrets
    if len(value.strip()) < _MIN_SECRET_LEN:
        return
    # repr() and JSON escape quotes, backslashes and control characters, so an object's repr (or a JSON
    # document logged as text) may carry the secret in an escaped spelling: mask those spellings too.
    variants = {
        value,
        repr(value)[1:-1],
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
    }
    with _secrets_lock:
        # Longest first, so a secret containing a shorter one is masked whole.
        _secrets = tuple(sorted(set(_secrets) | variants, key=len, reverse=True))


class _Rendered(str):
    """Text that already is a value's repr: the console renderer must not quote it a second time."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _scrub_text(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


@lru_cache(maxsize=4096)
def _is_sensitive_key(key: str) -> bool:
    lowered = key.lower()
    return any(part in lowered for part in _SENSITIVE_KEY_PARTS)


def _scrub(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if depth >= _MAX_DEPTH:
        return _Rendered(_scrub_text(repr(value)))
    if isinstance(value, dict):
        return _scrub_mapping(value, depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        items = [_scrub(item, depth + 1) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    # Anything else would be rendered through repr() by both renderers (structlog's JSON fallback and the
    # console renderer); doing it here first lets the secret scrub see that text.
    hook = getattr(value, "__structlog__", None)
    if callable(hook):
        return _scrub(hook(), depth + 1)
    return _Rendered(_scrub_text(repr(value)))


def _scrub_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
    scrubbed: dict[Any, Any] = {}
    for key, value in mapping.items():
        if isinstance(key, str):
            scrubbed[_scrub_text(key)] = MASK if _is_sensitive_key(key) else _scrub(value, depth)
        else:
            scrubbed[key] = _scrub(value, depth)
    return scrubbed


def redact_event(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask sensitive keys, registered secret values and ``SecretStr``, nested too."""
    return _scrub_mapping(event_dict, 0)


_PROBLEM_LEVELS = frozenset(("warning", "error", "critical"))
_PROBLEM_OWN_KEYS = frozenset(("event", "level", "timestamp", "logger"))
_PROBLEM_DETAIL_CHARS = 300


class RecentProblems:
    """The latest warning and error events, one entry per event name and level with how often it came.

    A structlog processor (after redaction, so nothing secret is kept). One entry per event rather than one
    per occurrence: a flood of ``dead_letter`` warnings must not push the one ``mqtt_subscribe_refused`` that
    explains it out of the table. Events below the warning level cost one set lookup; warnings are rare.
    """

    def __init__(self, size: int = 20) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()  # warnings come from the event loop, the store writer and library threads

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        level = event_dict.get("level")
        if level in _PROBLEM_LEVELS:
            self.record(str(level), event_dict)
        return event_dict

    def record(self, level: str, event_dict: Mapping[str, Any]) -> None:
        event = str(event_dict.get("event", ""))
        detail = " ".join(f"{key}={_short(value)}" for key, value in event_dict.items()
                          if key not in _PROBLEM_OWN_KEYS)
        key = (event, level)
        with self._lock:
            entry = self._entries.pop(key, None)
            count = 1 if entry is None else entry["count"] + 1
            self._entries[key] = {
                "time": str(event_dict.get("timestamp", "")), "level": level, "event": event,
                "logger": str(event_dict.get("logger", "")), "count": count,
                "detail": detail[:_PROBLEM_DETAIL_CHARS],
            }
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def latest(self) -> list[dict[str, Any]]:
        """Newest first: time (UTC, ISO 8601) of the latest occurrence, level, event, logger, count, detail."""
        with self._lock:
            return [dict(entry) for entry in reversed(self._entries.values())]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _short(value: Any) -> str:
    # A traceback: the exception raised says what went wrong (as text, its last line; rendered for JSON, the
    # first of a list of exception dicts, its causes after it).
    if isinstance(value, list) and value and isinstance(value[0], dict) and "exc_type" in value[0]:
        value = f"{value[0]['exc_type']}: {value[0].get('exc_value', '')}"
    elif isinstance(value, str) and value.startswith("Traceback"):
        value = value.rstrip().rsplit("\n", 1)[-1]
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 120 else text[:119] + "…"


PROBLEMS = RecentProblems()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _LogLineHandler(logging.Handler):
    """Root handler: formats a stdlib record through structlog and writes it with the agent's own writer.

    Sharing the ``WriteLogger`` (and so its lock) keeps lines from the two sources from interleaving.
    """

    def __init__(self, writer: structlog.WriteLogger, formatter: logging.Formatter) -> None:
        super().__init__()
        self._writer = writer
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.msg(self.format(record))
        except RecursionError:  # as logging.StreamHandler does: a recursion here must not be swallowed
            raise
        except Exception:  # noqa: BLE001  logging's contract: report on stderr, never raise into the caller
            self.handleError(record)


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Route structlog and ``logging`` to ``stream`` (default stdout), per ``settings.log``.

    Safe to call again: the previous configuration, root handler included, is replaced. Secrets registered
    earlier stay registered (forgetting one could only leak it).
    """
    out = stream if stream is not None else sys.stdout
    level = _LEVELS[settings.log.level]
    as_json = settings.log.format == "json" or (settings.log.format == "auto" and not _is_tty(out))

    for secret in (settings.mqtt.password, settings.cloud.token):
        if secret is not None:
            register_secret(secret.get_secret_value())

    exceptions: Processor
    renderer: Processor
    if as_json:
        # Structured tracebacks, without local variables: locals are where secrets live.
        exceptions = ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        renderer = structlog.processors.JSONRenderer()
    else:
        # Exceptions are made text before redaction; ConsoleRenderer prints an "exception" string as is.
        exceptions = structlog.processors.format_exc_info
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(out))
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    writer = structlog.WriteLogger(out)

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            exceptions,
            redact_event,
            PROBLEMS,
            renderer,
        ],
        # Calls below the level are bound to a no-op method: a disabled debug call costs a method lookup.
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_shared_writer_factory(writer),
        # get_logger() caches per configuration itself; structlog's own cache would outlive a reconfiguration.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exceptions,
            redact_event,
            PROBLEMS,
            renderer,
        ],
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LogLineHandler)]:
        root.removeHandler(handler)
        handler.close()
    root.addHandler(_LogLineHandler(writer, formatter))
    # Third-party libraries are chatty at INFO (uvicorn access, httpx requests): WARNING unless debugging.
    root.setLevel(logging.DEBUG if level == logging.DEBUG else max(level, logging.WARNING))
    # Our own stdlib loggers, if any module uses one, follow the configured level.
    logging.getLogger("agent").setLevel(level)


def _shared_writer_factory(writer: structlog.WriteLogger) -> Callable[..., structlog.WriteLogger]:
    # One writer for every logger: no object built per call, and its lock is shared with the stdlib handler.
    def factory(*_args: Any) -> structlog.WriteLogger:
        return writer

    return factory


class _AgentLogger:
    """A module-level logger that follows the current structlog configuration.

    Modules create their logger at import, before the command line configures logging, and tests
    reconfigure (``configure_logging`` again, ``capture_logs``, ``reset_defaults``). So the concrete bound
    logger is rebuilt whenever structlog's processors, wrapper class or logger factory change, and reused
    otherwise. The log methods are properties handing out the concrete logger's own method: a call costs one
    configuration check plus structlog's method (a no-op for a disabled level), with no argument repacking;
    about 0.5 µs for a disabled debug call, against 2.5 µs for structlog's uncached lazy proxy. Loggers
    returned by ``bind()`` are concrete and keep the configuration they were made under.
    """

    __slots__ = ("_cache", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._cache: tuple[object, object, object, FilteringBoundLogger] | None = None

    def _current(self) -> FilteringBoundLogger:
        config = structlog.get_config()
        cache = self._cache
        if (
            cache is not None
            and cache[0] is config["processors"]
            and cache[1] is config["wrapper_class"]
            and cache[2] is config["logger_factory"]
        ):
            return cache[3]
        bound: FilteringBoundLogger = structlog.get_logger().bind(logger=self._name)
        self._cache = (config["processors"], config["wrapper_class"], config["logger_factory"], bound)
        return bound

    @property
    def _context(self) -> dict[str, Any]:
        return dict(self._current()._context)

    def bind(self, **new_values: Any) -> FilteringBoundLogger:
        return self._current().bind(**new_values)

    def unbind(self, *keys: str) -> FilteringBoundLogger:
        return self._current().unbind(*keys)

    def try_unbind(self, *keys: str) -> FilteringBoundLogger:
        return self._current().try_unbind(*keys)

    def new(self, **new_values: Any) -> FilteringBoundLogger:
        return self._current().new(logger=self._name, **new_values)

    def is_enabled_for(self, level: int) -> bool:
        return self._current().is_enabled_for(level)

    def get_effective_level(self) -> int:
        return self._current().get_effective_level()

    @property
    def debug(self) -> Callable[..., Any]:
        return self._current().debug

    @property
    def info(self) -> Callable[..., Any]:
        return self._current().info

    @property
    def warning(self) -> Callable[..., Any]:
        return self._current().warning

    @property
    def warn(self) -> Callable[..., Any]:
        return self._current().warning

    @property
    def error(self) -> Callable[..., Any]:
        return self._current().error

    @property
    def err(self) -> Callable[..., Any]:
        return self._current().error

    @property
    def exception(self) -> Callable[..., Any]:
        return self._current().exception

    @property
    def critical(self) -> Callable[..., Any]:
        return self._current().critical

    @property
    def fatal(self) -> Callable[..., Any]:
        return self._current().critical

    @property
    def msg(self) -> Callable[..., Any]:
        return self._current().info

    @property
    def log(self) -> Callable[..., Any]:
        return self._current().log

    @property
    def adebug(self) -> Callable[..., Any]:
        return self._current().adebug

    @property
    def ainfo(self) -> Callable[..., Any]:
        return self._current().ainfo

    @property
    def awarning(self) -> Callable[..., Any]:
        return self._current().awarning

    @property
    def awarn(self) -> Callable[..., Any]:
        return self._current().awarning

    @property
    def aerror(self) -> Callable[..., Any]:
        return self._current().aerror

    @property
    def aexception(self) -> Callable[..., Any]:
        return self._current().aexception

    @property
    def acritical(self) -> Callable[..., Any]:
        return self._current().acritical

    @property
    def afatal(self) -> Callable[..., Any]:
        return self._current().acritical

    @property
    def amsg(self) -> Callable[..., Any]:
        return self._current().ainfo

    @property
    def alog(self) -> Callable[..., Any]:
        return self._current().alog


def get_logger(name: str) -> FilteringBoundLogger:
    """The logger for module ``name``; its events carry ``logger=name``. Safe to create at import time."""
    return _AgentLogger(name)


def warn_if_world_readable(path: Path, log: FilteringBoundLogger) -> None:
    """Warn when the env file holds a secret and any user on the machine can read it."""
    try:
        mode = path.stat().st_mode
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return  # a missing or unreadable file is the settings loader's to report
    holds_secret = any(
        line.strip().upper().startswith(("EDGE_AGENT_MQTT__PASSWORD=", "EDGE_AGENT_CLOUD__TOKEN=")) for line in lines
    )
    if mode & stat.S_IROTH and holds_secret:
        log.warning(
            "env_file_readable_by_others",
            path=str(path),
            mode=f"{stat.S_IMODE(mode):04o}",
            hint=f"chmod 0640 {path}; chown root:edge-agent {path}",
        )
