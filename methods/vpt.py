"""Prompt tuning, VPT-deep: a fresh set of learnable prompt tokens before every block."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from petlbench.backbones.classifier import HEAD_PATTERN, freeze_except, name_matcher
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import Batch, BuildContext, Method, PetlModel, register_method
from petlbench.core.options import option


@dataclass(frozen=True)
class PromptTuningOptions:
    """Options of VPT-deep."""

    num_prompts: int = option(16, "prompt tokens inserted before every block")
    dropout: float = option(0.0, "dropout on the prompt tokens before insertion (VPT's default 0)")

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class DeepPrompts(nn.Module):
    """One set of prompt tokens per block, `embeddings` [depth, P, D], uniform in ±sqrt(6 / (3·patch area + D))."""

    def __init__(self, depth: int, num_prompts: int, dim: int, patch_area: int) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch_area + dim))
        self.embeddings = nn.Parameter(torch.empty(depth, num_prompts, dim).uniform_(-bound, bound))


class PromptedViT(PetlModel):
    """A frozen ViT whose blocks each see [prefix tokens, their own P prompts, patches]; head reads the class token.

    Prompts get no position embedding; before block 0 they are inserted after the prefix tokens (class token,
    registers), before every later block they replace the previous block's prompt outputs; after the last block
    the prompt outputs are dropped, so the final norm and the head see exactly the backbone's tokens.
    """

    def __init__(self, net: VisionTransformer, num_prompts: int, dropout: float) -> None:
        super().__init__()
        self.net = net
        patch_h, patch_w = net.patch_embed.patch_size
        self.prompt = DeepPrompts(len(net.blocks), num_prompts, net.embed_dim, patch_h * patch_w)
        self.prompt_dropout = nn.Dropout(dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B, C] of `batch["image"]`."""
        net = self.net
        x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(batch["image"]))))
        prefix, num_prompts = net.num_prefix_tokens, self.prompt.embeddings.shape[1]
        for index, block in enumerate(net.blocks):
            prompts = self.prompt_dropout(self.prompt.embeddings[index].expand(x.shape[0], -1, -1))
            rest = x[:, prefix:] if index == 0 else x[:, prefix + num_prompts :]
            x = block(torch.cat([x[:, :prefix], prompts.to(x.dtype), rest], dim=1))
        x = torch.cat([x[:, :prefix], x[:, prefix + num_prompts :]], dim=1)
        return net.forward_head(net.norm(x))


@register_method
class PromptTuning(Method):
    """VPT-deep: train the per-block prompts and the head; the backbone is frozen."""

    key = "vpt"
    rank = 30
    display_name = "Prompt-tuning"
    Options = PromptTuningOptions

    def build(self, ctx: BuildContext) -> PromptedViT:
        """The frozen backbone (trainable head) wrapped with deep prompts."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        freeze_except(net, name_matcher([HEAD_PATTERN]))
        return PromptedViT(net, self.options.num_prompts, self.options.dropout)
