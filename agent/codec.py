"""JSON out, sized for holding: every result, dead letter and stored option set goes through here."""

from __future__ import annotations

from typing import Any

import orjson


def dumps(obj: Any) -> bytes:
    """Compact RFC 8259 JSON as an exact-size bytes object.

    orjson is ~10x faster than the standard library and writes a non-finite float as null, so a task's NaN
    cannot make a result unreadable to strict consumers. Its output keeps the whole 4 KiB buffer it was
    written into, though; for the thousands of small results held in queues and in flight that multiplies
    their memory by ten, so the bytes are copied out (a few hundred nanoseconds).
    """
    return memoryview(orjson.dumps(obj)).tobytes()
