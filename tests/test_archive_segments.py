"""The archive's segments: format, sealing by size and age, recovery, and a real SIGKILL in the middle of appends
and seals (agent/archive/segment.py, agent/archive/intake.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from agent.archive.catalog import Catalog
from agent.archive.intake import Intake, Sealing
from agent.archive.segment import (
    Record,
    SegmentError,
    file_chunks,
    iter_records,
    read_segment,
    recover_journal,
    seal,
    segment_info,
)

from support import wait_for

ROUTE = "city/+/noise/+/pcm"


def record(i: int, size: int = 40) -> Record:
    return Record(1_700_000_000.0 + i, f"city/aarhus/noise/{i % 3}/pcm", os.urandom(size), f"{i:032x}")


def open_intake(root: Path, **sealing: float) -> Intake:
    seal_at = Sealing(age_s=sealing.get("age_s", 3600), max_bytes=int(sealing.get("max_bytes", 1 << 20)))
    intake = Intake(root, Catalog(root / "catalog.db"), seal_at, clock=lambda: 1_700_000_000.0)
    intake.open()
    return intake


def all_records(intake: Intake) -> list[Record]:
    out: list[Record] = []
    for entry in intake.catalog.entries(route=ROUTE):
        out.extend(read_segment(file_chunks(intake.directory(ROUTE) / f"{entry.segment_id}.seg")))
    return out + [r for _, records in intake.unsealed(ROUTE) for r in records]


def test_sealed_segment_reads_back_in_order_and_checks_itself(tmp_path: Path) -> None:
    records = [record(i, size=i * 7) for i in range(500)]
    info = seal(records, ROUTE, "00000000000000001", tmp_path)
    path = tmp_path / "00000000000000001.seg"
    assert info.count == 500 and info.size == path.stat().st_size < info.raw_bytes + 200
    # Read in chunks of every size a stream may deliver.
    for chunk in (13, 4096):
        blob = path.read_bytes()
        assert list(read_segment(iter([blob[i:i + chunk] for i in range(0, len(blob), chunk)]))) == records
    assert segment_info(path, ROUTE) == info
    corrupt = bytearray(path.read_bytes())
    corrupt[-3] ^= 0xFF
    with pytest.raises((SegmentError, zlib.error)):
        list(read_segment(iter([bytes(corrupt)])))


def test_torn_journal_tail_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    intake = open_intake(tmp_path)
    intake.append({ROUTE: [record(i) for i in range(10)]})
    journal = next(intake.directory(ROUTE).glob("*.jrn"))
    intake.close()
    with journal.open("ab") as handle:  # a power cut in the middle of the next record
        handle.write(b"\x99\x00\x00\x00\x12\x34")
    assert len(recover_journal(journal, repair=False)) == 10
    reopened = open_intake(tmp_path)
    assert [r.task_id for r in all_records(reopened)] == [f"{i:032x}" for i in range(10)]
    assert not list(reopened.directory(ROUTE).glob("*.jrn"))  # sealed at the start


def test_seals_by_size_and_by_age(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    catalog = Catalog(tmp_path / "catalog.db")
    intake = Intake(tmp_path, catalog, Sealing(age_s=60, max_bytes=2_000), clock=lambda: now[0])
    intake.open()
    intake.append({ROUTE: [record(i, size=100) for i in range(30)]})  # > 2,000 bytes
    assert len(intake.seal_due()) == 1
    intake.append({ROUTE: [record(100)]})
    assert intake.seal_due() == []  # small and young
    now[0] += 61
    sealed = intake.seal_due()
    assert [s.count for s in sealed] == [1]
    assert len(all_records(intake)) == 31
    assert catalog.disk_bytes() == sum(p.stat().st_size for p in intake.directory(ROUTE).glob("*.seg"))


CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from agent.archive.catalog import Catalog
    from agent.archive.intake import Intake, Sealing
    from agent.archive.segment import Record
    root = Path(sys.argv[1])
    intake = Intake(root, Catalog(root / "catalog.db"), Sealing(age_s=3600, max_bytes=3_000))
    intake.open()
    n = int(sys.argv[3])
    while True:
        batch = [Record(1e9 + n + i, "t/x", os.urandom(50), f"{n + i:032x}") for i in range(7)]
        intake.append({sys.argv[2]: batch})
        n += len(batch)
        print("durable", n, flush=True)  # the parent may count on these
        if n % 35 == 0:
            intake.seal_due()
""")


@pytest.mark.parametrize("kills", [2, pytest.param(8, marks=pytest.mark.slow)])  # the full suite: more moments
def test_sigkill_during_appends_and_seals_loses_nothing_and_corrupts_nothing(tmp_path: Path, kills: int) -> None:
    root = tmp_path / "archive"
    archived = 0
    for round_ in range(kills):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), ROUTE, str(archived)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        reported: list[int] = []
        wait_target = archived + 300 + 97 * round_  # a different moment in each round

        def progressed(child: subprocess.Popen[str] = child, reported: list[int] = reported,
                       target: int = wait_target) -> bool:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.startswith("durable "):
                reported.append(int(line.split()[1]))
            return bool(reported) and reported[-1] >= target

        try:
            wait_for(progressed, 30, "the child to archive records", interval=0)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        intake = open_intake(root)  # recovery: every journal sealed, every segment checked
        ids = [r.task_id for r in all_records(intake)]
        # Every record reported durable, each once and in order; what was written before the kill and not
        # yet reported may be there too, whole.
        assert ids == [f"{i:032x}" for i in range(len(ids))]
        assert len(ids) >= reported[-1]
        archived = len(ids)
        for path in intake.directory(ROUTE).glob("*.seg"):
            segment_info(path, ROUTE)  # raises on a corrupt segment
        assert not list(intake.directory(ROUTE).glob("*.seg.tmp"))
        intake.close()
    # Only whole records were ever kept: every segment's body decodes to the end.
    for path in (root / "routes").rglob("*.seg"):
        blob = path.read_bytes()
        assert sum(1 for _ in iter_records(zlib.decompress(blob[blob.index(b"}") + 1:]))) > 0


FULL_DISK = textwrap.dedent("""
    import json, os, resource, signal, sys
    from pathlib import Path
    from agent.archive.catalog import Catalog
    from agent.archive.intake import Intake, Sealing
    from agent.archive.segment import Record
    # A file-size limit makes the journal's writes fail for real (EFBIG), as a full disk does (ENOSPC).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    root = Path(sys.argv[1])
    intake = Intake(root, Catalog(root / "catalog.db"), Sealing(age_s=3600, max_bytes=1 << 30))
    intake.open()
    resource.setrlimit(resource.RLIMIT_FSIZE, (6_000, 6_000))
    kept = []
    for n in range(0, 700, 7):
        batch = [Record(1e9 + n + i, "t/x", os.urandom(100), f"{n + i:032x}") for i in range(7)]
        before = intake.refused
        intake.append({sys.argv[2]: batch})
        if intake.refused == before:
            kept += [r.task_id for r in batch]
    print(json.dumps({"kept": kept, "refused": intake.refused, "failures": intake.append_failures}))
""")


def test_a_failing_write_refuses_its_batch_and_leaves_no_torn_record_behind(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), ROUTE], capture_output=True, text=True,
                         timeout=60, check=True)
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["failures"] > 1 and report["refused"] > 0  # each full journal refused a batch, then a new one
    intake = open_intake(tmp_path)  # seals every journal: each reads whole to its end
    assert [r.task_id for r in all_records(intake)] == report["kept"]
