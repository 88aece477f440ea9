"""Where `embedding-jobs up --exit-when-idle` spends its time: a py-spy profile, summarised per thread.

Not a benchmark (no ratio, not run by `make bench`): it guides work on the worker's hot path.
py-spy is not a dependency of the project; install it anywhere and pass its path:

    python -m bench.profile_pipeline --py-spy /path/to/py-spy [--shards 2000]

The shards are those of `bench pipeline`, ingested first (not profiled). Two profiled runs of
`up --no-sample --exit-when-idle` follow, each on a fresh copy of the ingested data directory:

1. `--gil`: samples only the thread holding the GIL. The event loop's samples (imports and
   start-up left out) are put in categories by the frame nearest the leaf that names one;
   milliseconds per job are GIL-held sample time over the job count (on a loaded machine a
   thread can hold the GIL while descheduled, so read them as shares, not as CPU time).
2. `--idle --native` (with `--native`): every thread all the time, with C frames, to see what
   the SQLite threads wait on (SQLite's busy handler sleeping while another connection holds the
   write lock, a WAL checkpoint's fdatasync, the GIL) and how long the event loop sits in epoll.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from bench.worker_rig import REPO, cli_env, run_cli, sample_shards, write_jsonl

# Categories of the event loop's GIL time: the first whose marker is in the frame nearest the leaf.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "thread hop: hand-off (queueing a unit wakes the thread)",
        ("concurrent/futures/thread.py", "threading.py", "_Connection.submit"),
    ),
    (
        "thread hop: result back to the loop",
        ("asyncio/futures.py", "call_soon_threadsafe", "_write_to_self", "base_futures.py", "asyncio/threads.py"),
    ),
    ("chunk_text", ("worker/chunking.py",)),
    ("hashing embed", ("embedders/hashing.py",)),
    (
        "spans and span metrics",
        (
            "trace/__init__.py",
            "trace/sampling.py",
            "attributes/__init__.py",
            "util/__init__.py",
            "_decorator.py",
            "context/__init__.py",
            "contextvars_context.py",
            "propagat",
            "trace/span.py",
            "exporter/spanmetrics",
            "worker/tracing.py",
        ),
    ),
    ("logging", ("logging/__init__", "jobs/logs.py")),
    ("job store, Python side", ("jobs/sqlite_store.py", "jobs/model.py", "jobs/store.py")),
    ("local queue, Python side", ("worker/local_queue.py",)),
    ("shard store, Python side", ("worker/shards.py",)),
    ("sqlite_db.run", ("jobs/sqlite_db.py",)),
    ("tracker and spool", ("worker/tracker.py", "worker/spool.py")),
    ("message parsing, JSON", ("worker/messages.py", "json/", "strict_json")),
    ("consumer's own lines", ("worker/consumer.py",)),
    ("exporter, aiohttp, progress line", ("aiohttp/", "exporter/", "embedding_jobs/cli.py")),
    ("event loop: select", ("selectors.py",)),
    ("event loop: other asyncio", ("asyncio/",)),
)
# Frames that only pass a call on: the category is decided further up.
_TRANSPARENT = ("contextlib.py", "abc>", "abc.py", "functools.py", "enum.py", "typing.py")
_STORES = (
    ("jobs/sqlite_store.py", "job store"),
    ("worker/local_queue.py", "local queue"),
    ("worker/shards.py", "shards"),
)
_THREAD = re.compile(r"^thread \((\d+)\): ?(.*)$")


def samples(path: Path) -> Iterator[tuple[str, str, list[str], int]]:
    """(thread id, thread name, frames root first, count) per line of py-spy's raw output."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        match = _THREAD.match(frames[0])
        if match is None or not count.isdigit():
            continue
        yield match.group(1), match.group(2), frames[1:], int(count)


def category(frames: list[str]) -> str:
    """The category of the frame nearest the leaf that names one."""
    for frame in reversed(frames):
        if any(mark in frame for mark in _TRANSPARENT):
            continue
        for name, marks in CATEGORIES:
            if any(mark in frame for mark in marks):
                return name
    return "other"


def _line_of(path: Path, text: str) -> str:
    """'file.py:N' of the first line of a repository file holding text ('' if none), as py-spy names frames."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return f"{path.name}:{number})"
    return ""


_SQLITE_DB = REPO / "jobs" / "sqlite_db.py"
_BEGIN = _line_of(_SQLITE_DB, 'conn.execute("BEGIN IMMEDIATE")')
_COMMIT = _line_of(_SQLITE_DB, 'conn.execute("COMMIT")')
# The Python frames a connection's thread sits in between units: a pool worker, or a loop of its own.
_IDLE_FRAMES = ("_worker (concurrent/futures/thread.py", "_serve (jobs/sqlite_db.py")


def sqlite_state(frames: list[str]) -> str:
    """What a SQLite connection's thread is doing, from its Python and C frames."""
    stack = ";".join(frames)
    python = [frame for frame in frames if ".py:" in frame]
    waiting_gil = "take_gil" in stack or "pthread_cond_timedwait" in stack
    if python and any(mark in python[-1] for mark in _IDLE_FRAMES):
        # Between units: blocked on its work queue, or taking the GIL back to run the next one.
        return "waiting for the GIL" if waiting_gil else "waiting for work"
    if "usleep" in stack or "nanosleep" in stack:
        return "busy handler sleeping (another connection holds the write lock)"
    if "fdatasync" in stack and "Checkpoint" in stack:
        return "WAL checkpoint fdatasync"
    if waiting_gil:
        return "waiting for the GIL"
    if _BEGIN and _BEGIN in stack:
        return "BEGIN IMMEDIATE, other"
    if _COMMIT and _COMMIT in stack:
        return "COMMIT, other"
    return "statements and row handling"


def record(py_spy: str, data_dir: Path, out: Path, rate: int, *flags: str) -> None:
    """Profile one `up --no-sample --exit-when-idle` on data_dir into out (raw collapsed stacks)."""
    argv = [py_spy, "record", "--threads", "-r", str(rate), "-f", "raw", "-o", str(out), *flags, "--"]
    argv += [sys.executable, "-m", "embedding_jobs", "up", "--no-sample", "--exit-when-idle"]
    argv += ["--data-dir", str(data_dir), "--exporter-port", "0"]
    subprocess.run(argv, env=cli_env(), cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def show(title: str, counts: Counter[str], per_job: float | None = None) -> None:
    """Print a counter as shares (and milliseconds per job when per_job converts a sample)."""
    total = sum(counts.values())
    print(f"\n{title}: {total} samples")
    for name, count in counts.most_common():
        ms = f"  {count * per_job * 1e3:6.3f} ms/job" if per_job else ""
        print(f"  {100 * count / total:5.1f}%{ms}  {name}")


def gil_report(path: Path, rate: int, jobs: int) -> None:
    """The event loop's GIL time by category; the other threads' GIL time by kind."""
    loop: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    sqlite: Counter[str] = Counter()
    for _, name, frames, count in samples(path):
        stack = ";".join(frames)
        if "run_forever" in stack:
            loop[category(frames)] += count
            threads["event loop"] += count
        elif name.startswith("sqlite"):
            store = next((label for mark, label in _STORES if mark in stack), "hop machinery")
            sqlite[store] += count
            threads["SQLite connections' threads"] += count
        elif name.startswith("asyncio_"):
            threads["default executor (embedder.embed via to_thread)"] += count
        elif "MainThread" in name or not name:
            threads["main thread outside the loop (imports, start, exit)"] += count
        else:
            threads[f"other: {name}"] += count
    per_job = 1 / rate / jobs
    show("GIL held, by thread", threads, per_job)
    show("event loop's GIL time", loop, per_job)
    show("SQLite threads' GIL time, by connection", sqlite, per_job)


def wait_report(path: Path) -> None:
    """Each SQLite thread's wall time by state; the event loop's time in epoll."""
    states: defaultdict[str, Counter[str]] = defaultdict(Counter)
    owner: defaultdict[str, Counter[str]] = defaultdict(Counter)
    loop: Counter[str] = Counter()
    for tid, name, frames, count in samples(path):
        stack = ";".join(frames)
        if name.startswith("sqlite"):
            states[tid][sqlite_state(frames)] += count
            for mark, label in _STORES:
                if mark in stack:
                    owner[tid][label] += count
        elif "run_forever" in stack:
            idle = "epoll_wait" in stack or "select.epoll" in stack
            loop["idle in epoll" if idle else "running or waiting for the GIL"] += count
    for tid, counts in states.items():
        label = ", ".join(name for name, _ in owner[tid].most_common()) or "unknown"
        show(f"SQLite thread {tid} ({label}), wall time", counts)
    show("event loop, wall time", loop)


def main() -> None:
    """Ingest, profile twice, print the breakdowns."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--py-spy", required=True, help="path of the py-spy executable")
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=500, help="samples per second of the --gil run")
    parser.add_argument("--native", action="store_true", help="also profile every thread with C frames")
    parser.add_argument("--keep", type=Path, help="copy py-spy's raw stacks (gil.txt, native.txt) into this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-pipeline-") as tmp:
        root = Path(tmp)
        source = write_jsonl(root / "shards.jsonl", sample_shards(args.shards))
        run_cli("ingest", str(source), "--data-dir", str(root / "seeded"), log=root / "ingest.log")
        shutil.copytree(root / "seeded", root / "gil")
        record(args.py_spy, root / "gil", root / "gil.txt", args.rate, "--gil", "--nonblocking")
        gil_report(root / "gil.txt", args.rate, args.shards)
        if args.native:
            shutil.copytree(root / "seeded", root / "native")
            record(args.py_spy, root / "native", root / "native.txt", 100, "--idle", "--native")
            wait_report(root / "native.txt")
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for raw in root.glob("*.txt"):
                shutil.copy(raw, args.keep / raw.name)


if __name__ == "__main__":
    main()
