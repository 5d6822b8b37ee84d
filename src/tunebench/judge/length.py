"""Length control: answer-length statistics and a length-controlled win rate.

LLM judges prefer longer answers. AlpacaEval 2 answers this by fitting the win probability on the
length difference and reporting the win rate the fit predicts at equal length (Dubois et al. 2024,
"Length-Controlled AlpacaEval"). We have one comparison per task, so the fit is a two-parameter
logistic regression: P(B beats A) = sigmoid(w0 + w1 * tanh(Δlen / scale)); the length-controlled
win rate is sigmoid(w0). Ties count as half a win (a soft label), as in the raw win rate.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

L2 = 0.01  # a little ridge on the length slope keeps the fit finite when length alone separates wins from losses


def length_stats(texts: list[str]) -> dict[str, float]:
    """Characters per answer: n, mean, median, min, max."""
    lengths = [len(t) for t in texts]
    if not lengths:
        return {"n": 0}
    return {"n": len(lengths), "mean": statistics.fmean(lengths), "median": statistics.median(lengths),
            "min": min(lengths), "max": max(lengths)}


def fit_length_logistic(length_diffs: list[float], outcomes: list[float], iterations: int = 100
                        ) -> tuple[float, float, float]:
    """(w0, w1, scale) of P(win) = sigmoid(w0 + w1 * tanh(diff / scale)), by Newton's method.

    length_diffs: len(B) - len(A) per task; outcomes: 1 win of B, 0.5 tie, 0 loss.
    """
    d = np.asarray(length_diffs, dtype=float)
    y = np.asarray(outcomes, dtype=float)
    # Normalise by the typical size of a difference (not centred: the mean difference is the signal).
    scale = float(np.sqrt(np.mean(d ** 2))) or 1.0
    x = np.stack([np.ones_like(d), np.tanh(d / scale)], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        ridge = np.array([0.0, L2])  # the intercept is the answer: it is not shrunk
        gradient = x.T @ (p - y) + ridge * w
        hessian = (x.T * (p * (1 - p))) @ x + np.diag(ridge) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1]), scale


def length_controlled(length_diffs: list[float], outcomes: list[float]) -> dict:
    """The raw and the length-controlled win rate of B, and whether length explains B's result."""
    if len(outcomes) < 2:
        return {"win_rate": statistics.fmean(outcomes) if outcomes else None, "lc_win_rate": None,
                "length_coef": None, "winner_simply_longer": False}
    raw = statistics.fmean(outcomes)
    w0, w1, scale = fit_length_logistic(length_diffs, outcomes)
    lc = 1.0 / (1.0 + math.exp(-w0))
    mean_diff = statistics.fmean(length_diffs)
    # When length alone separates wins from losses the fit cannot tell what happens at equal length
    # (the intercept rests on the few closest pairs), so the share of decisive verdicts that went to
    # the longer answer is reported and counted too.
    decisive = [(d, y) for d, y in zip(length_diffs, outcomes) if y in (0.0, 1.0) and d != 0]
    longer_won = sum(1 for d, y in decisive if (d > 0) == (y == 1.0)) / len(decisive) if decisive else None
    # "Simply longer": the winner writes more, and at equal length at least half its edge is gone
    # (or the longer answer won nine decisive verdicts in ten).
    edge, lc_edge = raw - 0.5, lc - 0.5
    explained = abs(lc_edge) <= abs(edge) / 2 or (longer_won is not None and len(decisive) >= 5
                                                  and longer_won >= 0.9)
    simply_longer = abs(edge) >= 0.1 and mean_diff * edge > 0 and explained
    return {"win_rate": raw, "lc_win_rate": lc, "length_coef": w1, "length_scale": scale,
            "mean_length_diff": mean_diff, "longer_won_share": longer_won, "decisive_with_length_diff": len(decisive),
            "winner_simply_longer": simply_longer}
