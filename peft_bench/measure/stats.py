"""Statistics of repeated measurements: percentile-bootstrap confidence intervals, paired ratios, a noise floor.

Resampling is seeded, so the same numbers always give the same interval (results and tests are reproducible).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % confidence interval (low == high == value when there is one sample)."""

    value: float
    low: float
    high: float
    n: int

    @property
    def half_width_pct(self) -> float:
        """Half the interval's width as a percentage of the value."""
        return 100 * (self.high - self.low) / 2 / self.value if self.value else math.nan

    def includes(self, x: float) -> bool:
        return self.low <= x <= self.high

    @classmethod
    def missing(cls) -> Estimate:
        return cls(math.nan, math.nan, math.nan, 0)


def _percentiles(xs: list[float], level: float) -> tuple[float, float]:
    xs = sorted(xs)
    lo = (1 - level) / 2
    # nearest-rank percentiles of the bootstrap distribution
    i = max(0, min(len(xs) - 1, math.floor(lo * len(xs))))
    j = max(0, min(len(xs) - 1, math.ceil((1 - lo) * len(xs)) - 1))
    return xs[i], xs[j]


def bootstrap(values: Sequence[float], stat: Callable[[list[float]], float] = statistics.median,
              resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Estimate:
    """`stat` of `values` with a percentile-bootstrap CI (resampling the values with replacement)."""
    xs = [float(x) for x in values if x == x]
    if not xs:
        return Estimate.missing()
    point = stat(xs)
    if len(xs) == 1:
        return Estimate(point, point, point, 1)
    rng = random.Random(seed)
    boots = [stat(rng.choices(xs, k=len(xs))) for _ in range(resamples)]
    lo, hi = _percentiles(boots, level)
    return Estimate(point, lo, hi, len(xs))


def paired_ratio(num: dict[int, float], den: dict[int, float], **kw) -> Estimate:
    """Median of the per-round ratios num[r] / den[r] over the rounds both were measured in, with a bootstrap CI.

    Cells run round-robin (A B C A B C …): pairing by round cancels drift that hits every cell of a round alike."""
    rounds = sorted(set(num) & set(den))
    ratios = [num[r] / den[r] for r in rounds if den[r] and num[r] == num[r] and den[r] == den[r]]
    return bootstrap(ratios, **kw)


def noise_floor(aa: Estimate) -> float:
    """How far apart two measurements of the same cell land, as a fraction: the larger distance of the A/A
    ratio's CI ends from 1 (0 when unknown)."""
    if aa.n == 0 or aa.low != aa.low:
        return 0.0
    return max(abs(aa.high - 1), abs(1 - aa.low), abs(aa.value - 1))


def verdict(ratio: Estimate, floor: float = 0.0, lower_is_better: bool = True) -> str:
    """'no measurable difference' when the CI includes 1 or the ratio lies within the noise floor; else the
    direction ('faster'/'slower' for lower-is-better times, 'higher'/'lower' otherwise)."""
    if ratio.n == 0 or ratio.value != ratio.value:
        return "n/a"
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
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
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
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, df) * se
    return Estimate(d, d - half, d + half, min(len(a), len(b)))
