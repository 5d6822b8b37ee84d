"""Score statistics: per-task aggregation, bootstrap confidence interval, judge agreement."""

from __future__ import annotations

import math
import random
import statistics


def bootstrap_ci(values: list[float], n_resamples: int = 2000, level: float = 0.95, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (seeded, so reports are reproducible)."""
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], values[0]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(n_resamples))
    low = means[int((1 - level) / 2 * n_resamples)]
    high = means[min(n_resamples - 1, int((1 + level) / 2 * n_resamples))]
    return low, high


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(xs: list[float], ys: list[float]) -> float:
    return pearson(ranks(xs), ranks(ys))


def agreement(ours: list[float], reference: list[float]) -> dict[str, float]:
    """How a judge agrees with a reference judge on the same answers."""
    n = len(ours)
    return {"n": n, "pearson": pearson(ours, reference), "spearman": spearman(ours, reference),
            "exact": sum(a == b for a, b in zip(ours, reference)) / n,
            "within_1": sum(abs(a - b) <= 1 for a, b in zip(ours, reference)) / n,
            "mean_bias": statistics.fmean(a - b for a, b in zip(ours, reference))}
