"""The `embedding-jobs` command line: its parser and entry point; the commands live in embedding_jobs.commands."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from embedding_jobs.backends import BackendUnavailableError
from embedding_jobs.commands.admin import cmd_config, cmd_init_db, cmd_purge, cmd_reconcile_dlq, cmd_recount
from embedding_jobs.commands.ingest import cmd_feeder, cmd_ingest
from embedding_jobs.commands.jobs import cmd_jobs
from embedding_jobs.commands.serve import cmd_exporter
from embedding_jobs.commands.work import cmd_up, cmd_worker
from jobs.errors import JobError
from jobs.logs import configure_logging
from jobs.model import JobStatus
from jobs.settings import Settings
from jobs.version import package_version

ALL_SECTIONS = ("store", "queue", "embedder", "worker", "exporter")
OUTPUTS = ("table", "json")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(args)
    except ValueError as exc:
        parser.error(str(exc))
    quiet_up = args.command is cmd_up and "log_level" not in vars(args) and "EMBEDDING_JOBS_LOG_LEVEL" not in os.environ
    # `up` shows a progress line; per-job logs would bury it unless asked for.
    configure_logging("WARNING" if quiet_up else settings.log_level, settings.log_format)
    command: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = args.command
    try:
        return asyncio.run(command(settings, args))
    except (BackendUnavailableError, JobError, FileNotFoundError, ValueError) as exc:
        print(f"embedding-jobs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand and its settings flags."""
    parser = argparse.ArgumentParser(
        prog="embedding-jobs",
        description="Embedding-generation jobs with per-tenant status tracking and observability. "
        "Every setting can also come from an EMBEDDING_JOBS_* environment variable.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[..., Any], help: str, sections: Sequence[str]) -> argparse.ArgumentParser:
        # A command's --help shows its own arguments and only the names of the settings it reads: the
        # descriptions of all of them (about 50) would bury the command. `config --help` has those.
        epilog = (
            "settings it reads, each also an EMBEDDING_JOBS_* variable\n"
            f"(`embedding-jobs config --help` describes each, with its default):\n{Settings.flags_summary(sections)}"
        )
        sub = commands.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.set_defaults(command=fn)
        Settings.add_arguments(sub, sections, describe=False)
        return sub

    ingest = add("ingest", cmd_ingest, "save shards and enqueue a job for each new or changed one", ALL_SECTIONS)
    ingest.add_argument("source", help="a .jsonl file, '-' for JSON Lines on stdin, or a folder of text files")
    ingest.add_argument("--tenant", default="default", help="tenant of files at a folder's top level")

    worker = add("worker", cmd_worker, "consume the queue and embed shards until stopped", ALL_SECTIONS)
    worker.add_argument("--exit-when-idle", action="store_true", help="stop once the queue is empty")

    up = add("up", cmd_up, "run everything locally: ingest the sample corpus, then work the queue", ALL_SECTIONS)
    up.add_argument("--ingest", metavar="SOURCE", help="ingest this instead of the bundled sample corpus")
    up.add_argument("--no-sample", action="store_true", help="ingest nothing; only work the queue")
    up.add_argument("--exit-when-idle", action="store_true", help="stop once every job has finished")

    jobs = add("jobs", cmd_jobs, "look at jobs: `jobs stats [--tenant T]` or `jobs list --tenant T`", ["store"])
    jobs.add_argument("action", choices=("list", "stats"))
    jobs.add_argument("--tenant", help="tenant id (required for list)")
    jobs.add_argument("--status", choices=[s.value for s in JobStatus], help="only jobs in this status")
    jobs.add_argument("--limit", type=int, default=20, help="jobs to show (default 20)")
    jobs.add_argument(
        "--output",
        choices=OUTPUTS,
        default="table",
        help="table (default), or json: stats as one object by tenant, list as one job per line",
    )

    add("init-db", cmd_init_db, "create the Cosmos DB database and containers (idempotent)", ["store"])
    feeder = add("feeder", cmd_feeder, "enqueue a job for every new or changed shard in the shard store", ALL_SECTIONS)
    feeder.add_argument("--poll-interval", type=float, default=1.0, help="seconds between change reads (1)")
    add(
        "exporter",
        cmd_exporter,
        "serve /metrics, the REST API and the status page, and on a port of its own the OTLP receiver",
        ALL_SECTIONS,
    )
    add(
        "reconcile-dlq",
        cmd_reconcile_dlq,
        "mark jobs dead_lettered whose messages the queue dead-lettered by itself",
        ["store", "queue", "worker"],
    )
    add("recount", cmd_recount, "rebuild per-tenant counters from the job records", ["store"])
    purge = add("purge", cmd_purge, "delete finished jobs older than the retention", ["store"])
    purge.add_argument("--older-than-hours", type=float, help="defaults to --retention-hours")
    config = commands.add_parser(
        "config",
        help="show the effective settings (secrets masked); --help describes every setting",
        description="Show the effective settings, from flags, EMBEDDING_JOBS_* variables and defaults; "
        "secrets show only whether they are set.",
    )
    config.set_defaults(command=cmd_config)
    config.add_argument("--output", choices=OUTPUTS, default="table", help="table (default) or json")
    Settings.add_arguments(config, ALL_SECTIONS)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
