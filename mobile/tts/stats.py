"""Uncertainty for accuracies over a task set: Wilson intervals and paired differences.

With k tasks one task is 1/k of accuracy, so a curve over N means nothing without intervals.
Two scorers (or two N) are judged on the *same* tasks, so their difference is paired: the
bootstrap resamples tasks, keeping each task's pair of outcomes together, and the exact
McNemar test counts only the tasks on which the two disagree.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (stays inside [0, 1], sane at 0 and k)."""
    if total <= 0:
        return (0.0, 1.0)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], iters: int = 4000,
                     seed: int = 0) -> tuple[float, float, float]:
    """(mean(a) - mean(b), 2.5th, 97.5th percentile) over task resamples; a[i], b[i] pair up."""
    if len(a) != len(b) or not a:
        raise ValueError("paired samples must be non-empty and of equal length")
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    k = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(k)] for _ in range(k)) / k for _ in range(iters))
    return (sum(diffs) / k, means[int(0.025 * iters)], means[int(0.975 * iters) - 1])


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: binomial(n01 + n10, 1/2) on the discordant tasks."""
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(a: Sequence[bool], b: Sequence[bool], seed: int = 0) -> dict[str, float]:
    """The paired summary stored in the results: difference, its 95% CI, McNemar p."""
    diff, lo, hi = paired_bootstrap(a, b, seed=seed)
    return {"diff": diff, "ci95": [lo, hi], "mcnemar_p": mcnemar_exact(a, b)}
