"""Run every benchmark in turn: `python -m bench` (what `make bench` runs), or name some."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    """Import bench.bench_* modules (all, or those named in argv) and call their main()."""
    names = sorted(
        info.name for info in pkgutil.iter_modules([str(Path(__file__).parent)]) if info.name.startswith("bench_")
    )
    chosen = [name for name in names if not argv or name in argv or name.removeprefix("bench_") in argv]
    for name in chosen:
        print(f"== {name}", flush=True)
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
