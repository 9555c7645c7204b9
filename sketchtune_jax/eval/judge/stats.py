"""Win/loss/tie counts of a pairwise judgement, the win rate and its Wilson score interval."""

from __future__ import annotations

import math
from collections.abc import Iterable
from statistics import NormalDist
from typing import Any


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion ``successes / n``.

    Unlike the normal approximation it stays inside [0, 1] and is sound for small ``n`` and
    proportions near 0 or 1 (Wilson, 1927). ``n == 0`` gives ``(0.0, 1.0)``: nothing is known.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # p = 0 puts the low end exactly at 0 and p = 1 the high end at 1; float rounding would miss them.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def summarize(outcomes: Iterable[str], *, inconsistent: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Counts and rates of model A's ``outcomes`` (``win``/``loss``/``tie``/``unparsed``, one a pair).

    ``win_rate`` is wins over the judged pairs (wins + losses + ties; unparsed pairs are left
    out), with its Wilson interval at ``confidence``; ``None`` when no pair was judged.
    ``inconsistent`` is how many of the ties are verdicts that flipped with the order.
    """
    counts = {"win": 0, "loss": 0, "tie": 0, "unparsed": 0}
    for outcome in outcomes:
        if outcome not in counts:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {sorted(counts)}")
        counts[outcome] += 1
    judged = counts["win"] + counts["loss"] + counts["tie"]
    low, high = wilson_interval(counts["win"], judged, confidence)
    return {
        "pairs": judged + counts["unparsed"],
        "wins": counts["win"],
        "losses": counts["loss"],
        "ties": counts["tie"],
        "inconsistent_ties": inconsistent,
        "unparsed": counts["unparsed"],
        "win_rate": counts["win"] / judged if judged else None,
        "loss_rate": counts["loss"] / judged if judged else None,
        "tie_rate": counts["tie"] / judged if judged else None,
        "confidence": confidence,
        "win_rate_low": low if judged else None,
        "win_rate_high": high if judged else None,
    }
