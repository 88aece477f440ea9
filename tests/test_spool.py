"""The tracking spool: order, ownership by flock, adoption of a dead worker's file, compaction, torn lines."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.model import JobMetadata, JobStatus
from worker.messages import JobMessage
from worker.spool import COMPACT_MIN_LINES, Spool, TrackedWrite, read_spool, spool_files

S = JobStatus


def begin(n: int, tenant: str = "t") -> TrackedWrite:
    return TrackedWrite.begin(JobMessage(f"job-{n}", tenant, f"shard-{n}", "document"), trace_id=f"{n:032x}")


def finish(n: int) -> TrackedWrite:
    msg = JobMessage(f"job-{n}", "t", f"shard-{n}", "document", attempt=1)
    return TrackedWrite.finish(
        msg, S.COMPLETED, error=None, retry_count=None, metadata=JobMetadata("m", vector_count=3, chunk_count=3)
    )


def ids(writes: Iterator[TrackedWrite] | list[TrackedWrite] | Spool) -> list[str]:
    return [f"{w.describe}/{w.job_id}" for w in writes]


# A worker process that spools writes and is then killed: the spool's owner really dies.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from worker.messages import JobMessage
    from worker.spool import Spool, TrackedWrite

    spool = Spool.open(Path(sys.argv[1]))
    first, count = int(sys.argv[2]), int(sys.argv[3])
    for n in range(first, first + count):
        spool.append(TrackedWrite.begin(JobMessage(f"job-{n}", "t", f"shard-{n}", "document"), None))
    print(spool.path, flush=True)
    time.sleep(120)
    """
)


class Writer:
    """A live process owning a spool with writes job-first .. job-(first+count-1)."""

    def __init__(self, directory: Path, first: int, count: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory), str(first), str(count)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        # The path is printed once every write is in the file.
        self.path = Path(self.process.stdout.readline().strip())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=10) == -signal.SIGKILL
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for writer in started:
        if writer.process.poll() is None:
            writer.kill()


def test_writes_come_back_in_the_order_they_were_appended(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    writes = [begin(1), begin(2), finish(1), begin(3), finish(2)]
    for write in writes:
        spool.append(write)
    assert list(spool) == writes
    assert spool.head(2) == writes[:2]
    assert [spool.pop() for _ in range(2)] == writes[:2]
    assert spool.path is not None
    # On disk, the acknowledged writes are gone from what a successor would replay.
    assert [entry.write for entry in read_spool(spool.path)] == writes[2:]
    spool.close()


def test_a_spooled_write_survives_the_json_round_trip(tmp_path: Path) -> None:
    failed = TrackedWrite.finish(
        JobMessage("job-9", "tenant-x", "s", "d", attempt=2), S.FAILED, error="boom: ü", retry_count=3, metadata=None
    )
    for write in (begin(1), finish(1), failed):
        assert TrackedWrite.from_json(json.loads(json.dumps(write.to_json()))) == write


def test_an_owned_spool_is_not_adopted_and_an_orphan_is(tmp_path: Path, writers: list[Writer]) -> None:
    writers.append(Writer(tmp_path, 0, 5))
    # The writer is alive and holds its lock: a starting worker leaves its file alone.
    bystander = Spool.open(tmp_path)
    assert (bystander.adopted, len(bystander)) == (0, 0)
    bystander.close()
    assert writers[0].path.exists()

    writers[0].kill()
    successor = Spool.open(tmp_path)
    assert successor.adopted == 5
    assert ids(successor) == [f"begin/job-{n}" for n in range(5)]
    # The orphan is gone; its writes now live in the successor's own file.
    assert spool_files(tmp_path) == [successor.path]
    assert successor.path is not None
    assert ids([e.write for e in read_spool(successor.path)]) == ids(successor)
    successor.close()


def test_orphans_of_several_dead_workers_are_merged_by_when_each_write_was_made(
    tmp_path: Path, writers: list[Writer]
) -> None:
    writers.extend([Writer(tmp_path, 0, 3), Writer(tmp_path, 3, 3)])
    for writer in writers:
        writer.kill()
    spool = Spool.open(tmp_path)
    assert ids(spool) == [f"begin/job-{n}" for n in range(6)]
    spool.close()


def test_a_clean_shutdown_leaves_unreplayed_writes_for_the_next_worker(tmp_path: Path) -> None:
    first = Spool.open(tmp_path)
    for n in range(3):
        first.append(begin(n))
    first.pop()
    first.close()
    second = Spool.open(tmp_path)
    assert ids(second) == ["begin/job-1", "begin/job-2"]
    while second:
        second.pop()
    second.close()
    # An empty spool deletes its file: nothing is left to adopt.
    assert spool_files(tmp_path) == []


def test_the_file_is_truncated_when_the_spool_empties(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    assert spool.path is not None
    for n in range(10):
        spool.append(begin(n))
    assert spool.path.stat().st_size > 0
    for _ in range(10):
        spool.pop()
    assert spool.path.stat().st_size == 0
    spool.close()


def test_acknowledged_lines_are_compacted_away_while_writes_stay_buffered(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path)
    # A long outage that keeps a few writes buffered while many come and go.
    total = COMPACT_MIN_LINES * 3
    for n in range(total):
        spool.append(begin(n))
        if n >= 5:
            spool.pop()
    assert len(spool) == 5
    assert spool.path is not None
    lines = spool.path.read_bytes().count(b"\n")
    # Without compaction the file would hold every write and every ack: 2 lines a write.
    assert lines <= COMPACT_MIN_LINES + 2 * 5, lines
    assert ids([e.write for e in read_spool(spool.path)]) == [f"begin/job-{n}" for n in range(total - 5, total)]
    # Compaction swaps in a new file under the same lock: still exactly one spool, ours.
    assert spool_files(tmp_path) == [spool.path]
    spool.close()


def test_a_torn_last_line_is_skipped_with_a_warning(
    tmp_path: Path, writers: list[Writer], caplog: pytest.LogCaptureFixture
) -> None:
    writers.append(Writer(tmp_path, 0, 3))
    writers[0].kill()
    # What a kill in the middle of writing a fourth line leaves behind.
    with writers[0].path.open("ab") as f:
        f.write(b'{"seq":4,"at":1.0,"write":{"kind":"begin","tenantId":"t","jobId":"jo')
    with caplog.at_level(logging.WARNING, logger="worker.spool"):
        successor = Spool.open(tmp_path)
    assert ids(successor) == ["begin/job-0", "begin/job-1", "begin/job-2"]
    assert any("partial line" in r.getMessage() for r in caplog.records)
    assert not writers[0].path.exists()
    successor.close()


def test_an_unreadable_line_is_skipped_and_the_rest_adopted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    orphan = tmp_path / "spool-1-abc.jsonl"
    good = [json.dumps({"seq": n, "at": float(n), "write": begin(n).to_json()}).encode() for n in (1, 2, 3)]
    bad = [b"not json", b'{"seq": 9, "at": 1.0, "write": {"kind": "drop tables"}}', b"[" * 5000]
    orphan.write_bytes(b"\n".join([good[0], *bad, good[1], b'{"ack": 1}', good[2]]) + b"\n")
    with caplog.at_level(logging.WARNING, logger="worker.spool"):
        spool = Spool.open(tmp_path)
    # Write 1 was acknowledged; the three bad lines are skipped, each with its line number.
    assert ids(spool) == ["begin/job-2", "begin/job-3"]
    warned = [r.getMessage() for r in caplog.records if "is not a spooled write" in r.getMessage()]
    assert [m.split(" line ")[1].split()[0] for m in warned] == ["2", "3", "4"]
    spool.close()


def test_a_spool_held_in_memory_touches_no_file(tmp_path: Path) -> None:
    spool = Spool()
    spool.append(begin(1))
    assert (spool.path, len(spool)) == (None, 1)
    assert spool.pop() == begin(1)
    spool.close()
    assert list(tmp_path.iterdir()) == []
