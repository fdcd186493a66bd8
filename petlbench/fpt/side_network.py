"""The trainable half of FPT/FPT+: a small ViT (the side network) and the modules that feed it LPM knowledge.

Fusion modules turn the LPM features of each fed layer into a few side-width tokens
`[L, B, T, D_s]`; `side_forward` appends layer ℓ's tokens after the patch tokens before side block ℓ
and drops them after it, so the side's final norm and head only see class + patches.

* `FinePromptFusion` (FPT+, §3.5): prompts in the LPM width, shared LayerNorm as the query map,
  cross-attention to the LPM keys/values, raw-prompt residual *before* the shared out-projector.
* `SidePromptFusion` (FPT, §4): prompts in the side width, shared in-projector to the LPM width,
  cross-attention, shared out-projector, raw-prompt residual *after* it.
* `MLPFusion` (component ablation "LPM knowledge through an MLP", paper §3.4 / Fig. 7): the LPM
  block's output tokens go through a shared LayerNorm + 2-layer MLP into the side width and are
  appended to the side sequence as they are (no prompts, no cross-attention).
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from petlbench.fpt.lpm import KEYS, TOKENS, VALUES, explicit_block_forward

PROMPT_INIT_STD = 1e-6


def build_side_vit(
    img_size: int,
    patch_size: int,
    width: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    num_classes: int,
    qkv_bias: bool = True,
) -> VisionTransformer:
    """A randomly initialised timm ViT (class token, token pooling, no dropout) with the spec's init."""
    if width % num_heads:
        raise ValueError(f"side width {width} is not divisible by the {num_heads} heads inherited from the LPM")
    side = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        global_pool="token",
        embed_dim=width,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        class_token=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
    )
    init_side_weights(side)
    return side


def init_side_weights(side: VisionTransformer) -> None:
    """Official (HF-style) init: Linear/patch-conv weights and cls/pos trunc-normal 0.02, biases 0, LN 1/0."""
    for module in side.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for table in (side.cls_token, side.pos_embed):
        if table is not None:
            trunc_normal_(table, std=0.02)


def _embed(side: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    return side.norm_pre(side.patch_drop(side._pos_embed(side.patch_embed(images))))


def side_forward(side: VisionTransformer, images: torch.Tensor, extras: torch.Tensor | None) -> torch.Tensor:
    """Logits of the side network; `extras` `[L_S, B, T, D_s]` ride along for one block each, then are dropped."""
    if extras is not None and extras.shape[0] != len(side.blocks):
        raise ValueError(f"{extras.shape[0]} layers of fused tokens for {len(side.blocks)} side blocks")
    x = _embed(side, images)
    for layer, block in enumerate(side.blocks):
        if extras is None:
            x = block(x)
        else:
            extra = extras[layer].to(x.dtype)
            x = block(torch.cat([x, extra], dim=1))[:, : -extra.shape[1]]
    return side.forward_head(side.norm(x))


@torch.no_grad()
def side_attention_to_extras(side: VisionTransformer, images: torch.Tensor, extras: torch.Tensor) -> list[torch.Tensor]:
    """Per side block, the attention the class+patch tokens pay to the appended tokens `[B, H, N, T]`."""
    x = _embed(side, images)
    maps = []
    for layer, block in enumerate(side.blocks):
        extra = extras[layer].to(x.dtype)
        out, _, _, weights = explicit_block_forward(block, torch.cat([x, extra], dim=1))
        assert weights is not None
        tokens = x.shape[1]
        maps.append(weights[:, :, :tokens, tokens:])
        x = out[:, :tokens]
    return maps


def cross_attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt cross-attention per layer and head: queries `[L, B|1, H, P, d]`, K/V `[B, L, H, n, d]`.

    Returns the merged context `[L, B, P, H*d]` and the softmax map `[L, B, H, P, n]`.
    """
    keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [L, B, H, n, d]
    scale = queries.shape[-1] ** -0.5
    weights = (queries * scale) @ keys.transpose(-2, -1)  # [L, B, H, P, n]
    weights = weights.softmax(dim=-1)
    context = weights @ values  # [L, B, H, P, d]
    layers, batch, heads, prompts, dim = context.shape
    return context.permute(0, 1, 3, 2, 4).reshape(layers, batch, prompts, heads * dim), weights


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[L, P, H*d]` -> `[L, 1, H, P, d]` (head h owns channels h*d ... h*d+d-1, like the LPM keys)."""
    layers, prompts, width = x.shape
    return x.reshape(layers, prompts, heads, width // heads).transpose(1, 2).unsqueeze(1)


class FinePromptFusion(nn.Module):
    """FPT+ fusion: one module serving every fed layer.

    Parameters: `prompts` `[L, P, D]` ~ N(0, 1e-6²); `norm` LayerNorm(D) and `out_proj` Linear(D→D_s),
    both shared by all layers. Per layer: c = CA(LN(p), K, V); f = Dropout(out_proj(c + p)).
    """

    def __init__(
        self, layers: int, num_prompts: int, lpm_width: int, side_width: int, heads: int, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.heads = heads
        self.prompts = nn.Parameter(torch.randn(layers, num_prompts, lpm_width) * PROMPT_INIT_STD)
        self.norm = nn.LayerNorm(lpm_width)
        self.out_proj = nn.Linear(lpm_width, side_width)
        self.dropout = nn.Dropout(dropout)

    def queries(self) -> torch.Tensor:
        """Per-head prompt queries `[L, 1, H, P, d]` in the LPM key space."""
        return _split_heads(self.norm(self.prompts), self.heads)

    def attention(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Attention the prompts pay to the LPM tokens `[L, B, H, P, n]` (paper Fig. 9)."""
        return cross_attend(self.queries(), features[KEYS], features[VALUES])[1]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused prompts `[L, B, P, D_s]` from LPM keys/values `[B, L, H, n, d]`."""
        context, _ = cross_attend(self.queries(), features[KEYS], features[VALUES])
        return self.dropout(self.out_proj(context + self.prompts.unsqueeze(1)))


class SidePromptFusion(nn.Module):
    """FPT fusion: side-width prompts, shared in/out projectors, residual after out_proj.

    Parameters: `prompts` `[L, P, D_s]` ~ N(0, 1e-6²); `in_proj` Linear(D_s→D) and `out_proj`
    Linear(D→D_s), shared by all layers. Per layer: f = Dropout(out_proj(CA(in_proj(p), K, V)) + p).
    """

    def __init__(
        self, layers: int, num_prompts: int, lpm_width: int, side_width: int, heads: int, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.heads = heads
        self.prompts = nn.Parameter(torch.randn(layers, num_prompts, side_width) * PROMPT_INIT_STD)
        self.in_proj = nn.Linear(side_width, lpm_width)
        self.out_proj = nn.Linear(lpm_width, side_width)
        self.dropout = nn.Dropout(dropout)

    def queries(self) -> torch.Tensor:
        """Per-head prompt queries `[L, 1, H, P, d]` in the LPM key space."""
        return _split_heads(self.in_proj(self.prompts), self.heads)

    def attention(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Attention the prompts pay to the LPM tokens `[L, B, H, P, n]`."""
        return cross_attend(self.queries(), features[KEYS], features[VALUES])[1]

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused prompts `[L, B, P, D_s]` from LPM keys/values `[B, L, H, n, d]`."""
        context, _ = cross_attend(self.queries(), features[KEYS], features[VALUES])
        return self.dropout(self.out_proj(context) + self.prompts.unsqueeze(1))


class MLPFusion(nn.Module):
    """Ablation fusion: LPM block outputs through a shared LayerNorm + MLP, appended as side tokens.

    Parameters: `norm` LayerNorm(D), `mlp` = Linear(D→D_s), GELU, Linear(D_s→D_s), all shared by the
    fed layers. Per layer: f = Dropout(mlp(norm(z_M))) for every kept LPM token (n of them).
    """

    def __init__(self, lpm_width: int, side_width: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(lpm_width)
        self.mlp = nn.Sequential(nn.Linear(lpm_width, side_width), nn.GELU(), nn.Linear(side_width, side_width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Side-width tokens `[L, B, n, D_s]` from LPM hidden states `[B, L, n, D]`."""
        return self.dropout(self.mlp(self.norm(features[TOKENS].transpose(0, 1))))
