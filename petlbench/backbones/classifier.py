"""The model shared by the backbone-based baselines: a timm ViT classifying `batch["image"]`, plus freezing helpers."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from petlbench.core.method import Batch, PetlModel

HEAD_PATTERN = r"head\..+"


class BackboneClassifier(PetlModel):
    """A classifier network (a timm ViT, possibly peft-wrapped) whose forward reads `batch["image"]`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B, C] of `batch["image"]` [B, 3, res, res]."""
        return self.net(batch["image"])


def freeze_except(module: nn.Module, is_trainable: Callable[[str], bool]) -> list[str]:
    """Set `requires_grad = is_trainable(name)` on every parameter; returns the trainable names.

    Raises if nothing is left trainable (a predicate that matches no name is a bug, not a method).
    """
    trainable = []
    for name, param in module.named_parameters():
        param.requires_grad_(is_trainable(name))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"no parameter of {type(module).__name__} matched the trainable set")
    return trainable


def name_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A predicate that is true for parameter names fully matching any of the regular expressions."""
    compiled = [re.compile(pattern) for pattern in patterns]
    return lambda name: any(pattern.fullmatch(name) for pattern in compiled)
