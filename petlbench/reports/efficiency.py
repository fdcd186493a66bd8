"""The papers' performance-efficiency metrics.

    PPE = score · exp(−log10(r + 1)),   r = trainable / total parameters (a fraction, not a percentage)
    PME = score · exp(−log10(m + 1)),   m = peak training memory / full fine-tuning's peak training memory

`score` is the average test AUC (×100) over the table's datasets. Full fine-tuning has r = m = 1, so its
PPE = PME = score · e^(−log10 2) ≈ 0.7400 · score; as r or m tends to 0 the factor tends to 1.
"""

from __future__ import annotations

import math


def efficiency_factor(ratio: float) -> float:
    """exp(−log10(ratio + 1)): the discount PPE/PME apply to the score for a cost ratio ≥ 0."""
    if ratio is None or not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"cost ratio must be a finite number ≥ 0, got {ratio!r}")
    return math.exp(-math.log10(ratio + 1.0))


def ppe(score: float, param_ratio: float) -> float:
    """Performance-parameter efficiency; `param_ratio` = trainable / total as a fraction (0.0103 for 1.03%)."""
    return score * efficiency_factor(param_ratio)


def pme(score: float, mem_ratio: float) -> float:
    """Performance-memory efficiency; `mem_ratio` = the method's peak memory / full fine-tuning's."""
    return score * efficiency_factor(mem_ratio)
