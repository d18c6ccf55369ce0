"""Small statistics for gates and comparisons: Wilson bounds, exact McNemar, paired bootstrap.

No SciPy: every function here is exact or seeded, so the same inputs give the same numbers on
every machine.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from eqaudit.metrics import wilson_interval

#: Resamples of the paired bootstrap (the interval's ends move by ~0.5/sqrt(B) of its width).
BOOTSTRAP_RESAMPLES = 4000


def z_value(confidence: float) -> float:
    """Two-sided normal quantile: 0.95 -> 1.95996..."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, not {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def successes(share: float, n: int) -> int:
    """Recover the count ``k`` from a stored share ``k / n`` (exact: shares are ratios of ints)."""
    return round(share * n)


def wilson_bounds(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval of ``k / n`` at ``confidence``."""
    return wilson_interval(k, n, z_value(confidence))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts.

    ``only_a`` images agree under A only, ``only_b`` under B only. Under the null hypothesis (A and
    B agree equally often) each discordant pair falls either way with probability 1/2, so with
    ``n = only_a + only_b`` and ``m = min(only_a, only_b)``:

        p = min(1, 2 * sum_{k <= m} C(n, k) / 2^n)

    Computed with exact integers (Python's int / int is correctly rounded). ``n = 0`` gives 1.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts cannot be negative")
    n = only_a + only_b
    if n == 0:
        return 1.0
    m = min(only_a, only_b)
    term, tail = 1, 1  # C(n, 0)
    for k in range(1, m + 1):
        term = term * (n - k + 1) // k
        tail += term
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap_interval(
    a: np.ndarray,
    b: np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(b) - mean(a)`` for paired 0/1 outcomes per image.

    Resampling images with replacement only changes how many images fall in each of the four
    outcome cells (both, A only, B only, neither), so a resample is drawn directly as a
    multinomial of those counts: the same distribution as resampling image indices, at a cost
    independent of the number of images. Seeded, hence reproducible.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("paired outcomes must be two 1-D arrays of the same length")
    n = a.size
    if n == 0:
        return (math.nan, math.nan)
    cells = np.array([np.sum(a & b), np.sum(a & ~b), np.sum(~a & b), np.sum(~a & ~b)])
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, cells / n, size=resamples)
    differences = (draws[:, 2] - draws[:, 1]) / n
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    return (float(low), float(high))
