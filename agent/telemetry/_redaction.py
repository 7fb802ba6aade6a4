"""Secrets out of every log line: sensitive keys, registered secret values in any spelling, ``SecretStr``."""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import SecretBytes, SecretStr

from agent.telemetry._structlog import EventDict, FilteringBoundLogger, WrappedLogger

MASK = "**********"

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

