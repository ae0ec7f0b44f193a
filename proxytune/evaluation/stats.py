"""The numbers an evaluation reports: accuracy with a 95 % Wilson interval, paired comparisons (examples fixed
and broken, McNemar's exact test), gap closed with a paired bootstrap interval, pass@k."""
from __future__ import annotations

import math
import random
from typing import Sequence

Z_95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion: unlike p ± z·se, it stays inside [0, 1] and is
    sensible at 0 / n and n / n, which small evaluations hit often."""
    if total <= 0:
        return (0.0, 1.0)
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # at 0 / n and n / n the bound is exactly 0 (or 1); computed, it comes out as 5.6e-17 or 1 - 1e-16
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return (low, high)


def accuracy(correct: Sequence[bool]) -> dict:
    n, k = len(correct), sum(bool(c) for c in correct)
    low, high = wilson_interval(k, n)
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci95": [low, high]}


def gap_closed(proxy: float, base: float, tuned: float) -> float | None:
    """(proxy − base) / (tuned − base), the paper's measure; undefined when tuning did not move the base."""
    if tuned == base:
        return None
    return (proxy - base) / (tuned - base)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 − C(n−c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar test of two roles on the same examples: of the n = fixed + broken examples where
    they disagree, is the split compatible with 1/2 each? p = P(a split at least this uneven | Binomial(n, ½)),
    doubled, at most 1; 1 when they never disagree."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Role a against role b on the same examples: fixed (a right, b wrong), broken (a wrong, b right), and
    McNemar's exact p."""
    fixed = sum(bool(x) and not y for x, y in zip(a, b, strict=True))
    broken = sum(bool(y) and not x for x, y in zip(a, b, strict=True))
    return {"fixed": fixed, "broken": broken, "mcnemar_p": mcnemar_exact(fixed, broken)}


def gap_closed_interval(proxy: Sequence[bool], base: Sequence[bool], tuned: Sequence[bool],
                        resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """95 % paired bootstrap interval of gap closed: the examples resampled with replacement (the three roles'
    results of an example stay together), percentiles 2.5 and 97.5 of the resampled gaps. Resamples where
    tuning did not move the base (gap undefined) are left out; None when that is most of them."""
    rng = random.Random(seed)
    n = len(proxy)
    if n == 0:
        return None
    gaps = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        gap = gap_closed(sum(proxy[i] for i in picks) / n, sum(base[i] for i in picks) / n,
                         sum(tuned[i] for i in picks) / n)
        if gap is not None:
            gaps.append(gap)
    if len(gaps) < resamples / 2:
        return None
    gaps.sort()
    return [gaps[int(0.025 * (len(gaps) - 1))], gaps[int(0.975 * (len(gaps) - 1))]]
