"""What a run will cost: said at its start, refined as its cells finish.

Each cell's time comes from the last committed run of the same suite (`results/<suite>/repeats.csv`: every
process's `cell_seconds`, the first round's — which runs every probe — apart from later repeats'), else from the
median of the cells that have one, else a flat guess; as cells finish, the rest is rescaled by how this run's
cells compared with their estimates (a slower machine, a busier one).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

GUESS_S = 60.0  # a cell nothing is known about


def _seconds(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def earlier(suite: str, root: Path = Path("results")) -> dict[tuple[str, str, bool], float]:
    """(method, workload, first round?) → median seconds of a process, from the suite's committed repeats."""
    path = root / suite / "repeats.csv"
    got: dict[tuple[str, str, bool], list[float]] = {}
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        for s in csv.DictReader(f):
            t = _seconds(s.get("cell_seconds"))
            if t == t and s.get("status") == "ok":
                got.setdefault((s["method"], s["workload"], str(s.get("repeat")) == "0"), []).append(t)
    return {k: statistics.median(v) for k, v in got.items()}


class Cost:
    """The run's estimate: per process, and what is left as processes finish."""

    def __init__(self, cells, rounds: int, suite: str, root: Path = Path("results")) -> None:
        known = earlier(suite, root)
        fallback = statistics.median(known.values()) if known else GUESS_S
        self.source = f"{root / suite / 'repeats.csv'}, this suite's last committed run" if known else \
            "a flat guess of a minute per process: no earlier run of this suite"
        self.each = {(c.key(), r): known.get((c.method, c.workload, r == 0), fallback)
                     for c in cells for r in range(rounds)}
        self.spent: dict[tuple[str, int], float] = {}

    @property
    def total_s(self) -> float:
        return sum(self.each.values())

    def done(self, key: str, repeat: int, seconds: float) -> None:
        self.spent[key, repeat] = seconds

    def left_s(self) -> float:
        """The estimate of the processes not yet run, scaled by how the finished ones compared with theirs."""
        planned = sum(self.each.get(k, 0.0) for k in self.spent)
        scale = sum(self.spent.values()) / planned if planned > 0 else 1.0
        return scale * sum(t for k, t in self.each.items() if k not in self.spent)


def duration(seconds: float) -> str:
    minutes = seconds / 60
    if minutes < 1.5:
        return f"{seconds:.0f} s"
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"
