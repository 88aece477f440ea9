"""What every benchmark shares: interleaved runs, medians with spread, machine load, one report line.

Machines here are shared and noisy, so a benchmark never reports an absolute figure alone:
it runs its subject and a baseline side by side (interleaved, so a burst of load hits both),
and reports the median ratio with its spread and the load average at the time.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def machine_load() -> str:
    """The 1-minute load average against the core count, e.g. '0.42/2'."""
    try:
        one, _, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f}/{os.cpu_count() or 1}"


def interleaved(runs: int, *subjects: Callable[[], float]) -> list[list[float]]:
    """Call each subject once per round, rounds after each other; the figures per subject."""
    results: list[list[float]] = [[] for _ in subjects]
    for _ in range(runs):
        for index, subject in enumerate(subjects):
            results[index].append(subject())
    return results


@dataclass(frozen=True, slots=True)
class Figure:
    """A median with its spread (min-max) over runs."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Figure:
        """The median and the range of values."""
        return cls(statistics.median(values), min(values), max(values))

    def show(self, unit: str, scale: float = 1.0, digits: int = 2) -> str:
        """'12.30 ms (11.90-13.10)'."""
        return (
            f"{self.median * scale:.{digits}f} {unit} "
            f"({self.low * scale:.{digits}f}-{self.high * scale:.{digits}f})".replace(" )", ")")
        )


def ratios(subject: Sequence[float], baseline: Sequence[float]) -> Figure:
    """Per-round ratios subject/baseline, as a Figure."""
    return Figure.of([s / b for s, b in zip(subject, baseline, strict=True) if b > 0])


def report(name: str, figure: str, target: str, ok: bool) -> None:
    """One line per figure: name, what was measured, the target, whether it was met, the load."""
    verdict = "meets" if ok else "MISSES"
    print(f"{name}: {figure} | target {target}: {verdict} | load {machine_load()}", flush=True)
