"""The archive's on-disk format: an append-only journal per route, sealed into compressed, checksummed segments.

A journal (``<segment id>.jrn``) takes a route's committed inputs as framed records, each with its own crc32,
fsynced per batch: a power cut leaves at most a torn last record, which recovery cuts off. Sealing compresses a
journal into ``<segment id>.seg`` written beside it under a temporary name, fsynced, renamed and the directory
fsynced, and only then removes the journal: a sealed segment is either whole or absent (docs/archive.md#format).

A sealed segment is ``MAGIC``, a 4-byte header length, a JSON header (route, counts, times, the sha256 of the
uncompressed body) and the zlib-compressed body: the same records as the journal. The sha256 of the whole file
is what the object store verifies on upload.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agent.errors import AgentError

JOURNAL_MAGIC = b"EAJRNL1\n"
SEGMENT_MAGIC = b"EASEG01\n"
_FRAME = struct.Struct("<II")  # body length, crc32 of the body
_BODY = struct.Struct("<dH16s")  # received_at, topic length, task id (16 raw bytes)
_HEADER_LEN = struct.Struct("<I")
COMPRESSION_LEVEL = 6  # zlib: level 6 is within a few percent of 9 on JSON readings at a third of the time
READ_CHUNK = 256 * 1024
MAX_RECORD = 512 * 1024 * 1024


class SegmentError(AgentError):
    """A sealed segment that does not read back as written (wrong magic, header or checksum)."""


class Record(NamedTuple):
    """One archived input: what a query answers."""

    received_at: float
    topic: str
    payload: bytes
    task_id: str  # 32 hex digits: the store's task id, so recovery can tell what is archived already


def encode(record: Record) -> bytes:
    topic = record.topic.encode()
    body = _BODY.pack(record.received_at, len(topic), bytes.fromhex(record.task_id)) + topic + record.payload
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _decode_body(body: bytes) -> Record:
    received_at, topic_len, task_id = _BODY.unpack_from(body)
    start = _BODY.size
    topic = body[start:start + topic_len].decode()
    return Record(received_at, topic, body[start + topic_len:], task_id.hex())


def iter_records(data: bytes) -> Iterator[tuple[int, Record]]:
    """The whole records in ``data`` with the offset after each; stops at the first torn or corrupt one."""
    offset, end = 0, len(data)
    while offset + _FRAME.size <= end:
        length, crc = _FRAME.unpack_from(data, offset)
        start = offset + _FRAME.size
        if length < _BODY.size or length > MAX_RECORD or start + length > end:
            return
        body = data[start:start + length]
        if zlib.crc32(body) != crc:
            return
        offset = start + length
        yield offset, _decode_body(body)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """A route's open journal: appends framed records and makes each batch durable with one fdatasync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if new:
            os.write(self._fd, JOURNAL_MAGIC)
            os.fsync(self._fd)
            fsync_dir(path.parent)  # the new name survives a power cut too
        self.size = os.fstat(self._fd).st_size
        self.count = 0
        self.started_at: float | None = None  # when the first record came (sealing by age counts from it)

    def append(self, records: Iterable[Record], now: float) -> int:
        data = bytearray()
        for record in records:
            data += encode(record)
            self.count += 1
        if self.started_at is None:
            self.started_at = now
        if data:
            try:
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(f"short write to {self.path.name}: {written} of {len(data)} bytes")
                os.fdatasync(self._fd)
            except OSError:
                # Cut off what part of the batch reached the file (a full disk): records appended later must
                # not follow a torn one, which recovery would stop at.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self.size)
                raise
            self.size += len(data)
        return len(data)

    def close(self) -> None:
        os.close(self._fd)


def recover_journal(path: Path, *, repair: bool = True) -> list[Record]:
    """A journal's whole records. With ``repair``, a torn tail left by a power cut is cut off (it was never
    archived: the store still holds the input, see agent/archive/recovery.py); a reader of a live journal in
    another process leaves it alone."""
    data = path.read_bytes()
    if not data.startswith(JOURNAL_MAGIC):
        return []
    body = data[len(JOURNAL_MAGIC):]
    records, good = [], 0
    for good, record in iter_records(body):  # noqa: B007 - good is the offset after the last whole record
        records.append(record)
    if repair and good + len(JOURNAL_MAGIC) < len(data):
        with path.open("r+b") as handle:
            handle.truncate(good + len(JOURNAL_MAGIC))
            os.fsync(handle.fileno())
    return records


@dataclass(frozen=True)
class SegmentInfo:
    """A sealed segment as the catalog keeps it."""

    route: str
    segment_id: str
    count: int
    first_at: float
    last_at: float
    raw_bytes: int  # the records uncompressed
    size: int  # the file
    sha256: str  # of the file: the object store verifies it on upload


def seal(records: list[Record], route: str, segment_id: str, directory: Path) -> SegmentInfo:
    """Write ``records`` as the sealed segment ``<segment_id>.seg`` in ``directory``, durably and atomically."""
    body = b"".join(encode(r) for r in records)
    header = json.dumps({
        "route": route, "segment_id": segment_id, "count": len(records),
        "first_at": min((r.received_at for r in records), default=0.0),
        "last_at": max((r.received_at for r in records), default=0.0),
        "raw_bytes": len(body), "body_sha256": hashlib.sha256(body).hexdigest(), "codec": "zlib",
    }, sort_keys=True).encode()
    blob = SEGMENT_MAGIC + _HEADER_LEN.pack(len(header)) + header + zlib.compress(body, COMPRESSION_LEVEL)
    final = directory / f"{segment_id}.seg"
    temporary = directory / f"{segment_id}.seg.tmp"
    with temporary.open("wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(final)
    fsync_dir(directory)
    info = read_header(blob)
    return SegmentInfo(route, segment_id, info["count"], info["first_at"], info["last_at"], info["raw_bytes"],
                       len(blob), hashlib.sha256(blob).hexdigest())


def read_header(head: bytes) -> dict[str, Any]:
    if not head.startswith(SEGMENT_MAGIC):
        raise SegmentError("not an archive segment (wrong magic)")
    start = len(SEGMENT_MAGIC) + _HEADER_LEN.size
    if len(head) < start:
        raise SegmentError("segment header cut short")
    (length,) = _HEADER_LEN.unpack_from(head, len(SEGMENT_MAGIC))
    if start + length > len(head):
        raise SegmentError("segment header cut short")
    header: dict[str, Any] = json.loads(head[start:start + length])
    header["_body_offset"] = start + length
    return header


def segment_info(path: Path, route: str) -> SegmentInfo:
    """Read back a sealed segment found on disk (recovery): checks its body against its header."""
    blob = path.read_bytes()
    header = read_header(blob)
    records = list(read_segment(iter([blob])))
    if len(records) != header["count"]:
        raise SegmentError(f"{path.name}: {len(records)} records, the header says {header['count']}")
    return SegmentInfo(route, header["segment_id"], header["count"], header["first_at"], header["last_at"],
                       header["raw_bytes"], len(blob), hashlib.sha256(blob).hexdigest())


def read_segment(chunks: Iterator[bytes]) -> Iterator[Record]:
    """Stream a sealed segment's records from its bytes in chunks (a local file or an object store's stream),
    checking the body's sha256 and record count against the header when the stream ends."""
    head = b""
    header: dict[str, Any] | None = None
    for chunk in chunks:
        head += chunk
        try:
            header = read_header(head)
            break
        except SegmentError:
            if len(head) > 1024 * 1024 or not SEGMENT_MAGIC.startswith(head[:len(SEGMENT_MAGIC)]):
                raise
    if header is None:
        raise SegmentError("segment ended before its header")
    inflate = zlib.decompressobj()
    digest = hashlib.sha256()
    pending = b""
    count = 0

    def records_in(data: bytes) -> Iterator[Record]:
        nonlocal pending, count
        digest.update(data)
        pending += data
        used = 0
        for used, record in iter_records(pending):  # noqa: B007
            count += 1
            yield record
        pending = pending[used:]

    yield from records_in(inflate.decompress(head[header["_body_offset"]:]))
    for chunk in chunks:
        yield from records_in(inflate.decompress(chunk))
    yield from records_in(inflate.flush())
    if pending or count != header["count"] or digest.hexdigest() != header["body_sha256"]:
        raise SegmentError(f"segment {header['segment_id']} fails its checksum")


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk
