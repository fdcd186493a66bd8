"""Split timm's fused `attn.qkv` projection into separate `q`, `k`, `v` Linear layers, and merge it back.

peft can only target whole modules, so LoRA/AdaLoRA on "query and value only" needs the three projections
as separate layers. `split_qkv` must run after the pretrained weights are
loaded, because it changes the state-dict keys (`blocks.i.attn.qkv.*` -> `blocks.i.attn.{q,k,v}.*`);
`merge_qkv` restores timm's layout for exporting checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, maybe_add_mask, resolve_self_attn_mask
from torch import nn


class SplitQKVAttention(nn.Module):
    """timm `Attention` with the fused qkv Linear split into `q`, `k`, `v`; same function, same outputs.

    `fused_attn` is a plain attribute: set it to False to compute the attention matrix explicitly (for FLOP
    counters that skip `scaled_dot_product_attention`).
    """

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads: int = attn.num_heads
        self.head_dim: int = attn.head_dim
        self.attn_dim: int = attn.attn_dim
        self.scale: float = attn.scale
        self.fused_attn: bool = bool(attn.fused_attn)
        self.q = _slice_linear(attn.qkv, 0, attn.attn_dim)
        self.k = _slice_linear(attn.qkv, 1, attn.attn_dim)
        self.v = _slice_linear(attn.qkv, 2, attn.attn_dim)
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.gate = attn.gate
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Multi-head self-attention of `x` [B, N, C] (accepts the keywords timm's `Block` passes)."""
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
            )
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            scores = maybe_add_mask(scores, resolve_self_attn_mask(tokens, scores, attn_mask, is_causal))
            x = self.attn_drop(scores.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _slice_linear(fused: nn.Linear, index: int, width: int) -> nn.Linear:
    """A Linear holding output rows [index*width, (index+1)*width) of `fused` (weight and bias)."""
    rows = slice(index * width, (index + 1) * width)
    layer = nn.Linear(
        fused.in_features,
        width,
        bias=fused.bias is not None,
        device=fused.weight.device,
        dtype=fused.weight.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(fused.weight[rows])
        if fused.bias is not None:
            layer.bias.copy_(fused.bias[rows])
    layer.requires_grad_(fused.weight.requires_grad)
    return layer


def _replace_children(root: nn.Module, kind: type[nn.Module], convert: Any) -> int:
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, convert(child))
                replaced += 1
    return replaced


def split_qkv(model: nn.Module) -> int:
    """Replace every timm `Attention` in `model` by a `SplitQKVAttention`; returns how many were replaced."""
    replaced = _replace_children(model, Attention, SplitQKVAttention)
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no timm Attention module with a fused qkv projection")
    return replaced


def _fuse(split: SplitQKVAttention) -> Attention:
    """The timm `Attention` equivalent to `split` (plain Linear q/k/v only)."""
    for name in ("q", "k", "v"):
        if type(getattr(split, name)) is not nn.Linear:
            raise TypeError(
                f"attn.{name} is a {type(getattr(split, name)).__name__}, not a plain Linear; merge adapters "
                "into the weights first (peft: merge_and_unload())"
            )
    weight = split.q.weight
    fused = Attention(
        split.q.in_features,
        num_heads=split.num_heads,
        attn_head_dim=split.head_dim,
        dim_out=split.proj.out_features,
        qkv_bias=split.q.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        fused.qkv.weight.copy_(torch.cat([split.q.weight, split.k.weight, split.v.weight]))
        if split.q.bias is not None:
            fused.qkv.bias.copy_(torch.cat([split.q.bias, split.k.bias, split.v.bias]))
    fused.qkv.requires_grad_(weight.requires_grad)
    # timm declares fused_attn Final (a TorchScript constant), yet it is a per-instance switch meant to be set.
    fused.fused_attn = split.fused_attn  # type: ignore[misc]
    for name in ("q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
        setattr(fused, name, getattr(split, name))
    return fused


def merge_qkv(model: nn.Module) -> int:
    """Undo `split_qkv`: put back timm's fused `Attention` (state-dict keys as timm's); returns the count."""
    return _replace_children(model, SplitQKVAttention, _fuse)
