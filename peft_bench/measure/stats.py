"""Statistics of repeated measurements: intervals whose coverage is proven, paired ratios, a noise floor.

A step time is measured in several fresh processes; each process's median step time is one observation. The noise
between processes is multiplicative (a process lands 3 % slow, not 3 ms slow), so the estimate is the geometric
mean of the processes' medians with a Student-t interval on their logarithms (`log_t`), and a ratio of two cells is
the geometric mean of the per-round ratios with the paired t-interval on their logs (`paired_ratio`). Both are valid
at any n ≥ 2 — wide at n = 2 (t with one degree of freedom: ×12.7 the standard error), as they should be. Their
coverage is not assumed: `tests/test_intervals.py` draws thousands of experiments from a two-level noise model with
this machine's measured spreads and occasional slow processes, and checks that the stated 95 % intervals contain the
truth at least 93 % of the time (a percentile bootstrap of 3 medians, used before, is [min, max]: 75 %).
One observation has no interval (low = high = NaN), never a zero-width one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval at `level` (NaN ends when there is one observation)."""

    value: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def half_width_pct(self) -> float:
        """Half the interval's width as a percentage of the value (NaN without an interval)."""
        return 100 * (self.high - self.low) / 2 / self.value if self.value else math.nan

    @property
    def has_interval(self) -> bool:
        return self.low == self.low and self.high == self.high

    def includes(self, x: float) -> bool:
        return self.low <= x <= self.high

    @classmethod
    def missing(cls) -> Estimate:
        return cls(math.nan, math.nan, math.nan, 0)


def t_quantile(level: float, dof: int) -> float:
    """The two-sided Student-t quantile: P(|T| ≤ q) = level with `dof` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def log_t(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """Geometric mean of positive `values` with the Student-t interval of their logs, mapped back (exp)."""
    logs = [math.log(float(x)) for x in values if x == x and float(x) > 0]
    if not logs:
        return Estimate.missing()
    m = statistics.fmean(logs)
    if len(logs) < 2:
        return Estimate(math.exp(m), math.nan, math.nan, 1, level)
    half = t_quantile(level, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return Estimate(math.exp(m), math.exp(m - half), math.exp(m + half), len(logs), level)


def paired_ratio(num: dict[int, float], den: dict[int, float], level: float = LEVEL) -> Estimate:
    """num / den over the rounds both were measured in: the geometric mean of the per-round ratios with the paired
    t-interval of their logs. Cells run round-robin (A B C A B C …): pairing by round cancels drift that hits every
    cell of a round alike."""
    rounds = sorted(set(num) & set(den))
    ratios = [num[r] / den[r] for r in rounds if den[r] and num[r] == num[r] and den[r] == den[r]]
    return log_t(ratios, level)


def noise_floor(aa: Estimate) -> float:
    """How far apart two measurements of the same cell land, as a fraction: the larger distance of the A/A
    ratio's CI ends from 1 (0 when unknown)."""
    if aa.n == 0 or not aa.has_interval:
        return 0.0
    return max(abs(aa.high - 1), abs(1 - aa.low), abs(aa.value - 1))


def verdict(ratio: Estimate, floor: float = 0.0, lower_is_better: bool = True) -> str:
    """'no measurable difference' when the CI includes 1 or the ratio lies within the noise floor; 'not ranked (one
    repeat)' without an interval; else the direction ('faster'/'slower' for lower-is-better times, 'higher'/'lower'
    otherwise)."""
    if ratio.n == 0 or ratio.value != ratio.value:
        return "n/a"
    if not ratio.has_interval:
        return "not ranked (one repeat)"
    if ratio.includes(1.0) or abs(ratio.value - 1) <= floor:
        return "no measurable difference"
    if lower_is_better:
        return "faster" if ratio.value < 1 else "slower"
    return "higher" if ratio.value > 1 else "lower"


def wilson(correct: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion correct / n (stays inside [0, 1] and is sound at 0 or n)."""
    if not n or n != n or correct != correct:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if correct <= 0 else max(0.0, centre - half)
    high = 1.0 if correct >= n else min(1.0, centre + half)
    return low, high


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """Mean with its Student-t confidence interval (for a few independent runs, e.g. accuracy over seeds);
    low == high == mean for a single value."""
    xs = [float(x) for x in values if x == x]
    if not xs:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return Estimate(mean, mean, mean, len(xs))
    half = t_quantile(level, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Estimate(mean, mean - half, mean + half, len(xs))


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Estimate:
    """mean(a) - mean(b) with its Welch confidence interval (unequal variances); NaN interval with < 2 each."""
    a, b = [float(x) for x in a if x == x], [float(x) for x in b if x == x]
    if not a or not b:
        return Estimate(math.nan, math.nan, math.nan, 0)
    d = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Estimate(d, math.nan, math.nan, min(len(a), len(b)))
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Estimate(d, d, d, min(len(a), len(b)))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(level, df) * se
    return Estimate(d, d - half, d + half, min(len(a), len(b)))
