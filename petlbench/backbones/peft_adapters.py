"""peft on timm ViTs: low-rank adapters on the query and value projections only, and AdaLoRA's training hooks.

The fused qkv projection is split first so that peft can
target `q` and `v` without touching `k`; peft freezes the classifier head, which is re-enabled in place (never via
`modules_to_save`, which would keep a second, frozen head and inflate the total count); AdaLoRA's orthogonality
term and rank allocation are driven from the harness because a timm model returns a plain logits tensor.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # peft (and the transformers it imports) loads only when a peft method builds its model
    from peft import LoraConfig, PeftModel
    from peft.tuners.adalora import AdaLoraModel
from timm.models.vision_transformer import VisionTransformer

from petlbench.backbones.split_qkv import split_qkv

# peft full-matches a string `target_modules` against each module's full name.
QV_TARGET_REGEX = r"blocks\.\d+\.attn\.(q|v)"


def wrap_qv(net: VisionTransformer, config: LoraConfig) -> PeftModel:
    """Split the fused qkv of `net`, apply the peft `config` to q and v of every block, re-enable the head."""
    if config.target_modules != QV_TARGET_REGEX:
        raise ValueError(f"target_modules must be {QV_TARGET_REGEX!r}, got {config.target_modules!r}")
    split_qkv(net)
    from peft import get_peft_model

    model = get_peft_model(net, config)
    adapted = [name for name, _ in model.named_modules() if name.endswith(".lora_dropout")]
    if len(adapted) != 2 * len(net.blocks) or any(not re.search(r"\.attn\.[qv]\.", name) for name in adapted):
        raise RuntimeError(f"expected adapters on attn.q and attn.v of every block, found {adapted}")
    net.get_classifier().requires_grad_(True)  # peft adapts `net` in place: it is the wrapped base model
    return model


def adalora_tuner(model: PeftModel) -> AdaLoraModel:
    """The AdaLoRA tuner inside a peft-wrapped model (owner of the rank allocator)."""
    tuner = model.base_model
    from peft.tuners.adalora import AdaLoraModel

    if not isinstance(tuner, AdaLoraModel):
        raise TypeError(f"expected an AdaLoRA model, got {type(tuner).__name__}")
    return tuner


def adalora_orthogonality(model: PeftModel) -> torch.Tensor:
    """R_orth: mean over trainable lora_A / lora_B of ‖A·Aᵀ − I‖_F and ‖Bᵀ·B − I‖_F (peft's own formula)."""
    tuner = adalora_tuner(model)
    adapter = tuner.trainable_adapter_name
    terms = []
    for name, param in tuner.model.named_parameters():
        if not param.requires_grad or f".{adapter}" not in name:
            continue
        if f"lora_A.{adapter}" in name:
            gram = param @ param.T
        elif f"lora_B.{adapter}" in name:
            gram = param.T @ param
        else:
            continue
        identity = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        terms.append(torch.linalg.matrix_norm(gram - identity, ord="fro"))
    if not terms:
        raise RuntimeError("no trainable AdaLoRA lora_A/lora_B matrices found")
    return torch.stack(terms).mean()


def adalora_update_and_allocate(model: PeftModel, global_step: int) -> None:
    """Update importance scores and mask pruned singular values; call after `optimizer.step()`, before zero_grad."""
    adalora_tuner(model).update_and_allocate(global_step)


def adalora_schedule(total_steps: int, tinit_fraction: float, tfinal_fraction: float) -> tuple[int, int]:
    """(tinit, tfinal) = round(fraction · total_steps), shrunk until peft's `tinit < total_steps - tfinal` holds.

    With the default fractions (0.1, 0.2) no shrinking is ever needed; larger user fractions on very short
    runs give up final steps first, then warm-up steps, so that a budgeting phase of at least one step remains.
    """
    if total_steps < 1:
        raise ValueError(f"AdaLoRA needs total_steps >= 1 (the number of optimizer steps), got {total_steps}")
    tinit, tfinal = round(tinit_fraction * total_steps), round(tfinal_fraction * total_steps)
    while tinit >= total_steps - tfinal:
        if tfinal > 0:
            tfinal -= 1
        else:
            tinit -= 1
    return tinit, tfinal
