"""The attention-kernel switch of timm ViTs: fused `scaled_dot_product_attention` or explicit softmax(QKᵀ)V."""

from __future__ import annotations

from torch import nn

from petlbench.core.config import Attention

# Attention kernels a run can use: timm's fused SDPA, explicit softmax attention, or whatever the model defaults to.
ATTENTION_CHOICES: tuple[Attention, ...] = ("auto", "fused", "explicit")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with timm's boolean `fused_attn` switch (timm `Attention` and look-alikes)."""
    return [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def set_attention(model: nn.Module, attention: str = "auto") -> str:
    """Apply `attention` to every attention module and return what the model now runs.

    "fused" sets `fused_attn=True` (F.scaled_dot_product_attention), "explicit" sets False (softmax(QKᵀ)V
    with the map materialised), "auto" leaves the model as built (timm's default is fused unless
    TIMM_FUSED_ATTN=0). Returns "fused", "explicit", "mixed" or "none" (no such module).
    Blocks that a method always evaluates explicitly (the FPT/FPT+ LPM blocks whose attention map is
    needed) do so regardless of the flag; their matmuls are counted either way.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not {attention!r}")
    if attention != "auto":
        for module in attention_modules(model):
            # setattr: nn.Module's __setattr__ is typed for tensors and modules, and `fused_attn` is a plain bool
            setattr(module, "fused_attn", attention == "fused")  # noqa: B010
    return describe_attention(model)


def describe_attention(model: nn.Module) -> str:
    """ "fused", "explicit", "mixed" or "none", from the modules' `fused_attn` flags."""
    flags = {m.fused_attn for m in attention_modules(model)}
    if not flags:
        return "none"
    if len(flags) == 2:
        return "mixed"
    return "fused" if flags.pop() else "explicit"
