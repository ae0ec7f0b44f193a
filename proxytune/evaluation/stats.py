"""The numbers an evaluation reports: accuracy with a 95 % Wilson interval, gap closed, pass@k."""
from __future__ import annotations

import math
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
