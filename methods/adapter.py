"""Bottleneck adapters: AdaptFormer's parallel adapter (default) or two sequential Houlsby adapters per block.

Default: one `blocks.i.adapter` per block reading the residual stream before `norm2`,
added next to the MLP branch, down 768→96, ReLU, dropout 0.1, up 96→768, times a fixed 0.1. Option
`style=houlsby`: `blocks.i.adapter_attn` and `blocks.i.adapter_mlp` on the attention and MLP outputs (before the
residual add), each h + up(GELU(down(h))) with bottleneck 48. Up projections start at zero in both styles, so the
adapted network equals the pretrained one at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from timm.models.vision_transformer import Block
from torch import nn

from petlbench.backbones.classifier import HEAD_PATTERN, BackboneClassifier, freeze_except, name_matcher
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BuildContext, Method, register_method
from petlbench.core.options import option

DEFAULT_BOTTLENECK: dict[str, int] = {"parallel": 96, "houlsby": 48}
DEFAULT_SCALE: dict[str, float] = {"parallel": 0.1, "houlsby": 1.0}


@dataclass(frozen=True)
class AdapterOptions:
    """Options of the adapter baseline; unset bottleneck/scale take the style's default."""

    style: Literal["parallel", "houlsby"] = option(
        "parallel", "parallel (AdaptFormer, one adapter per block) or houlsby (two per block)"
    )
    bottleneck: int | None = option(None, "adapter width (default 96 for parallel, 48 for houlsby)")
    scale: float | None = option(None, "fixed output scale (default 0.1 for parallel, 1.0 for houlsby)")
    dropout: float = option(0.1, "dropout after the activation inside every adapter")

    def __post_init__(self) -> None:
        if self.style not in DEFAULT_BOTTLENECK:
            raise ValueError(f"style must be one of {', '.join(DEFAULT_BOTTLENECK)}, got {self.style!r}")
        if self.bottleneck is None:
            object.__setattr__(self, "bottleneck", DEFAULT_BOTTLENECK[self.style])
        if self.scale is None:
            object.__setattr__(self, "scale", DEFAULT_SCALE[self.style])
        if self.width < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def width(self) -> int:
        """The adapter width: `bottleneck`, or the style's default when unset."""
        return DEFAULT_BOTTLENECK[self.style] if self.bottleneck is None else self.bottleneck

    @property
    def output_scale(self) -> float:
        """The fixed output scale: `scale`, or the style's default when unset."""
        return DEFAULT_SCALE[self.style] if self.scale is None else self.scale


class BottleneckAdapter(nn.Module):
    """scale · up(dropout(act(down(x)))), with `up` initialised to zero (so it outputs 0 at step 0)."""

    def __init__(self, dim: int, bottleneck: int, activation: type[nn.Module], dropout: float, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)  # weight: PyTorch's Kaiming-uniform (a = sqrt(5))
        self.act = activation()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for tokens `x` [B, N, D]."""
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale


class ParallelAdapterBlock(Block):
    """timm `Block` plus an AdaptFormer adapter on the pre-`norm2` residual stream, added beside the MLP."""

    adapter: BottleneckAdapter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x + attn(norm1(x)), then + mlp(norm2(x)) + adapter(x)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.adapter(x)


class HoulsbyAdapterBlock(Block):
    """timm `Block` with a residual Houlsby adapter on the attention output and on the MLP output."""

    adapter_attn: BottleneckAdapter
    adapter_mlp: BottleneckAdapter

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Each sub-layer output h becomes h + adapter(h) before its residual add."""
        h = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(h + self.adapter_attn(h)))
        h = self.mlp(self.norm2(x))
        return x + self.drop_path2(self.ls2(h + self.adapter_mlp(h)))


def add_adapters(blocks: nn.Sequential, options: AdapterOptions, dim: int) -> None:
    """Give every timm `Block` its adapter(s) and switch its forward to the adapted one (weights untouched)."""
    for block in blocks:
        if type(block) is not Block:
            raise TypeError(f"adapters need timm's plain Block, got {type(block).__name__}")
        weight = block.get_parameter("norm1.weight")
        device, dtype = weight.device, weight.dtype
        names: tuple[str, ...]
        activation: type[nn.Module]
        block_class: type[Block]
        if options.style == "parallel":
            names, activation, block_class = ("adapter",), nn.ReLU, ParallelAdapterBlock
        else:
            names, activation, block_class = ("adapter_attn", "adapter_mlp"), nn.GELU, HoulsbyAdapterBlock
        for name in names:
            adapter = BottleneckAdapter(dim, options.width, activation, options.dropout, options.output_scale)
            block.add_module(name, adapter.to(device=device, dtype=dtype))
        block.__class__ = block_class


@register_method
class Adapter(Method):
    """Train the adapters and the head; the backbone is frozen."""

    key = "adapter"
    rank = 50
    display_name = "Adapter"
    Options = AdapterOptions

    def build(self, ctx: BuildContext) -> BackboneClassifier:
        """The frozen backbone (trainable head) with adapters in every block."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        freeze_except(net, name_matcher([HEAD_PATTERN]))
        add_adapters(net.blocks, self.options, net.embed_dim)
        return BackboneClassifier(net)
