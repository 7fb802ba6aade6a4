"""One output for structlog and ``logging``: the processor chain, the renderer and the shared writer."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from agent.telemetry._problems import PROBLEMS
from agent.telemetry._redaction import redact_event, register_secret
from agent.telemetry._structlog import ExceptionDictTransformer, ExceptionRenderer, Processor, structlog

if TYPE_CHECKING:
    from agent.config import Settings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


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
