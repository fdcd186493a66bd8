"""Trainable and total parameter counts of every method (the Params column of Table I), without training."""

from __future__ import annotations

from typing import Any

import torch

from petlbench.core.method import BackboneSpec, BuildContext, PetlModel, get_method


def build_for_inspection(
    key: str, backbone: BackboneSpec, res: int, num_classes: int, options: dict[str, Any] | None = None
) -> PetlModel:
    """Build a method's model for counting/profiling: on the meta device (no memory), else on CPU."""
    method = get_method(key).from_overrides(options or {})
    ctx = BuildContext(backbone=backbone, num_classes=num_classes, res=res, total_steps=1000, log=lambda _: None)
    if not (backbone.pretrained or backbone.weights):
        try:
            with torch.device("meta"):
                return method.build(ctx)
        except (NotImplementedError, RuntimeError, TypeError, ValueError):
            pass  # some libraries cannot initialise on meta; counting on CPU is exact too
    return method.build(ctx)


def param_row(
    key: str, backbone: BackboneSpec, res: int, num_classes: int, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """{method, name, trainable, total, ratio_pct} for one method."""
    cls = get_method(key)
    model = build_for_inspection(key, backbone, res, num_classes, options)
    trainable, total = model.param_report()
    return {
        "method": key,
        "name": cls.display_name,
        "trainable": trainable,
        "total": total,
        "ratio_pct": 100.0 * trainable / total,
    }
