"""Statistics every accuracy in nestling carries: the 95% Wilson score interval.

    wilson(41, 50)   # [0.6919, 0.9022]: 82% of 50 questions, and how far that could be from the truth

Two intervals that overlap are not a measured difference; eval, the run report and the benchmarks print
them beside every rate.
"""

from __future__ import annotations

import math


def wilson(k: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of k successes in n trials, [low, high]; sound at 0%, 100% and small n."""
    if n <= 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]
