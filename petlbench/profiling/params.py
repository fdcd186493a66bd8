"""Trainable and total parameter counts of every method (the Params column of Table I), without training."""

from __future__ import annotations

from typing import Any

from petlbench.core.method import BackboneSpec, get_method
from petlbench.profiling.models import build_meta, make_context


def param_row(
    key: str, backbone: BackboneSpec, res: int, num_classes: int, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """{method, name, trainable, total, ratio_pct} for one method, counted on a meta-device build (no memory)."""
    method = get_method(key).from_overrides(options or {})
    model, _ = build_meta(method, make_context(backbone, res, num_classes))
    trainable, total = model.param_report()
    return {
        "method": key,
        "name": method.display_name,
        "trainable": trainable,
        "total": total,
        "ratio_pct": 100.0 * trainable / total,
    }
