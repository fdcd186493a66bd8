"""The frozen large pre-trained model (LPM) of FPT/FPT+: per-layer keys/values of its most-attended tokens.

timm's fused attention never materialises the attention map, so the blocks whose features are extracted
are evaluated explicitly (`explicit_block_forward`): the softmax map gives the token-importance score,
the keys/values of the chosen tokens are gathered, and the map is freed before the next block.

Token-selection rule (methods spec §3.4): the sequence has N tokens *including* the class token; the
LPM keeps n = max(1, floor(token_ratio * N)) of them (`num_selected_tokens`), chosen separately by each
head from that head's scores. Score of token j ("global" importance): the mean over all N query rows of
A[h, query, j]; "class_token" importance uses the class-token row A[h, 0, j] instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

Importance = Literal["global", "class_token"]
FeatureKind = Literal["kv", "hidden"]

# Names of the tensors the LPM produces, as stored in the preload cache and carried in batches.
KEYS, VALUES, TOKENS, INDICES = "keys", "values", "tokens", "indices"


def num_selected_tokens(token_ratio: float | None, num_tokens: int) -> int:
    """Tokens kept per head: max(1, floor(ratio * N)), N incl. the class token; all N when ratio is None."""
    if token_ratio is None:
        return num_tokens
    # The epsilon keeps decimal ratios exact (0.29 * 100 is 28.999999999999996 in binary floating point).
    return max(1, min(num_tokens, math.floor(token_ratio * num_tokens + 1e-9)))


def explicit_block_forward(
    block: nn.Module, x: torch.Tensor, need_attention: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One timm ViT block with attention computed explicitly: (output, k, v, softmax map or None).

    `block` must be a plain timm `Block` with a plain timm `Attention` (TypeError otherwise).
    k and v are `[B, H, N, d]` (qkv bias included, k not scaled); the map is `[B, H, N, N]` when
    `need_attention`, otherwise the block uses the fused kernel and returns None for it.
    """
    attn = block.attn
    if type(block) is not Block or type(attn) is not Attention:
        raise TypeError(f"FPT/FPT+ need plain timm ViT blocks, got {type(block).__name__}/{type(attn).__name__}")
    batch, tokens, _ = x.shape
    h = block.norm1(x)
    gate_proj: nn.Module | None = getattr(attn, "gate", None)  # timm versions before the gated option lack it
    gate = gate_proj(h).sigmoid() if gate_proj is not None else None
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if need_attention:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        o = attn.attn_drop(weights) @ v
    else:
        weights = None
        o = F.scaled_dot_product_attention(q, k, v)
    o = attn.norm(o.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    if gate is not None:
        o = o * gate
    o = attn.proj_drop(attn.proj(o))
    x = x + block.drop_path1(block.ls1(o))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, k, v, weights


def importance_scores(weights: torch.Tensor, mode: Importance) -> torch.Tensor:
    """Per-head token importance `[B, H, N]` from a softmax map `[B, H, N, N]`."""
    if mode == "global":
        return weights.mean(dim=-2)  # average attention all queries (class token and j itself too) pay to j
    if mode == "class_token":
        return weights[:, :, 0, :]
    raise ValueError(f"unknown importance mode {mode!r} (use global or class_token)")


class FrozenLPM(nn.Module):
    """A frozen timm ViT that returns, for chosen blocks, the features the FPT/FPT+ fusion reads.

    `feature="kv"`: keys and values of the block's self-attention for the selected tokens, each
    `[B, L, H, n, d]`, plus the per-head token indices `[B, L, H, n]`.
    `feature="hidden"` (the MLP-fusion ablation): the block's output hidden states `[B, L, n, D]` of the
    tokens ranked highest by the head-averaged score, plus their indices `[B, L, n]`.
    With `token_ratio=None` every token is kept (n = N) and no indices are returned.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        layers: Sequence[int],
        token_ratio: float | None = 0.2,
        importance: Importance = "global",
        feature: FeatureKind = "kv",
    ) -> None:
        super().__init__()
        depth = len(vit.blocks)
        if not layers or any(not 0 <= i < depth for i in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"LPM layers {list(layers)} must be distinct, increasing indices in 0..{depth - 1}")
        if token_ratio is not None and not 0.0 < token_ratio <= 1.0:
            raise ValueError(f"token_ratio {token_ratio} must lie in (0, 1]")
        self.vit = vit
        self.layers = tuple(int(i) for i in layers)
        self.token_ratio = token_ratio
        self.importance = importance
        self.feature = feature
        vit.requires_grad_(False)
        vit.eval()

    @property
    def embed_dim(self) -> int:
        """LPM width D."""
        return int(self.vit.embed_dim)

    @property
    def num_heads(self) -> int:
        """LPM attention heads H."""
        attn: Any = self.vit.blocks[0].attn  # timm Attention or a look-alike: the class varies with the model
        return int(attn.num_heads)

    @property
    def head_dim(self) -> int:
        """LPM head width d."""
        attn: Any = self.vit.blocks[0].attn  # timm Attention or a look-alike: the class varies with the model
        return int(attn.head_dim)

    def num_tokens(self, res: int) -> int:
        """Sequence length N (prefix tokens included) for a square `res` input."""
        grid = res // int(self.vit.patch_embed.patch_size[0])
        return grid * grid + int(self.vit.num_prefix_tokens)

    def num_selected(self, res: int) -> int:
        """Tokens passed to the fusion per head and layer at input size `res`."""
        return num_selected_tokens(self.token_ratio, self.num_tokens(res))

    def feature_shapes(self, res: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-image shape and kind ("float"/"index") of every output tensor at input size `res`."""
        n, layers = self.num_selected(res), len(self.layers)
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        if self.feature == "kv":
            per_head = (layers, self.num_heads, n)
            shapes[KEYS] = ((*per_head, self.head_dim), "float")
            shapes[VALUES] = ((*per_head, self.head_dim), "float")
            if self.token_ratio is not None:
                shapes[INDICES] = (per_head, "index")
        else:
            shapes[TOKENS] = ((layers, n, self.embed_dim), "float")
            if self.token_ratio is not None:
                shapes[INDICES] = ((layers, n), "index")
        return shapes

    def train(self, mode: bool = True) -> FrozenLPM:
        """The LPM is frozen: it stays in eval mode whatever the caller asks."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, return_scores: bool = False) -> dict[str, torch.Tensor]:
        """Features of the chosen layers for `images` `[B, 3, res, res]` (see the class docstring)."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        wanted = set(self.layers)
        select = self.token_ratio is not None
        n = num_selected_tokens(self.token_ratio, x.shape[1])
        per_layer: dict[str, list[torch.Tensor]] = {}
        for index, block in enumerate(vit.blocks[: self.layers[-1] + 1]):
            if index not in wanted:
                x = block(x)
                continue
            x, k, v, weights = explicit_block_forward(block, x, need_attention=select)
            outputs: dict[str, torch.Tensor] = {}
            if select:
                assert weights is not None
                scores = importance_scores(weights, self.importance)  # [B, H, N]
                del weights  # free the N x N map before the next block
                if self.feature == "kv":
                    idx = scores.topk(n, dim=-1).indices  # [B, H, n], each head its own tokens
                    gather = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
                    outputs[KEYS], outputs[VALUES] = k.gather(2, gather), v.gather(2, gather)
                else:
                    idx = scores.mean(dim=1).topk(n, dim=-1).indices  # [B, n], heads averaged
                    outputs[TOKENS] = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                outputs[INDICES] = idx
                if return_scores:
                    outputs["scores"] = scores
            elif self.feature == "kv":
                outputs[KEYS], outputs[VALUES] = k, v
            else:
                outputs[TOKENS] = x
            for name, tensor in outputs.items():
                per_layer.setdefault(name, []).append(tensor)
        return {name: torch.stack(tensors, dim=1) for name, tensors in per_layer.items()}
