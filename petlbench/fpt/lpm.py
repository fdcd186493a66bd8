"""The frozen large pre-trained model (LPM) of FPT/FPT+: per-layer keys/values of its most-attended tokens.

timm's fused attention never materialises the attention map, and neither does the LPM: a fed block runs
the fused kernel for its output (`scored_block_forward`) and scores the tokens without ever holding a whole
`[B, H, N, N]` map (`attention_importance`); the keys/values of the chosen tokens are then gathered.
`explicit_block_forward` (the map itself) serves introspection.

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


def _attention_inputs(
    block: nn.Module, x: torch.Tensor
) -> tuple[Attention, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A plain timm block's attention module, output gate (or None) and q, k, v `[B, H, N, d]` for input `x`."""
    attn = block.attn
    if type(block) is not Block or type(attn) is not Attention:
        raise TypeError(f"FPT/FPT+ need plain timm ViT blocks, got {type(block).__name__}/{type(attn).__name__}")
    batch, tokens, _ = x.shape
    h = block.norm1(x)
    gate_proj: nn.Module | None = getattr(attn, "gate", None)  # timm versions before the gated option lack it
    gate = gate_proj(h).sigmoid() if gate_proj is not None else None
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn, gate, attn.q_norm(q), attn.k_norm(k), v


def _block_output(block: nn.Module, x: torch.Tensor, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The rest of a plain timm block (checked by `_attention_inputs`) once the context `o` `[B, H, N, d]` is known."""
    assert type(block) is Block and type(block.attn) is Attention
    attn = block.attn
    batch, tokens, _ = x.shape
    o = attn.norm(o.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    if gate is not None:
        o = o * gate
    o = attn.proj_drop(attn.proj(o))
    x = x + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def explicit_block_forward(
    block: nn.Module, x: torch.Tensor, need_attention: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One timm ViT block with attention computed explicitly: (output, k, v, softmax map or None).

    `block` must be a plain timm `Block` with a plain timm `Attention` (TypeError otherwise).
    k and v are `[B, H, N, d]` (qkv bias included, k not scaled); the map is `[B, H, N, N]` when
    `need_attention`, otherwise the block uses the fused kernel and returns None for it.
    """
    attn, gate, q, k, v = _attention_inputs(block, x)
    if need_attention:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        o = attn.attn_drop(weights) @ v
    else:
        weights = None
        o = F.scaled_dot_product_attention(q, k, v)
    return _block_output(block, x, o, gate), k, v, weights


def importance_scores(weights: torch.Tensor, mode: Importance) -> torch.Tensor:
    """Per-head token importance `[B, H, N]` from a softmax map `[B, H, N, N]`."""
    if mode == "global":
        return weights.mean(dim=-2)  # average attention all queries (class token and j itself too) pay to j
    if mode == "class_token":
        return weights[:, :, 0, :]
    raise ValueError(f"unknown importance mode {mode!r} (use global or class_token)")


# The CPU flash-attention kernel behind F.scaled_dot_product_attention; unlike the public call it also returns
# the per-query log-sum-exp, which turns the global importance into one more fused pass (absent: chunked path).
_FLASH_CPU: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# Map elements (over all B * H heads) the chunked path scores at once: 64 MiB of float32 per chunk.
SCORE_CHUNK_ELEMENTS = 1 << 24


def attention_importance(
    q: torch.Tensor, k: torch.Tensor, mode: Importance, query_chunk: int | None = None
) -> torch.Tensor:
    """Per-head importance `[B, H, N]` of `importance_scores`, from q, k `[B, H, N, d]`, `query_chunk` rows at once.

    Only `[B, H, query_chunk, N]` of the map exists at a time (default: SCORE_CHUNK_ELEMENTS in all).
    """
    batch, heads, tokens, dim = q.shape
    scale = dim**-0.5
    if mode == "class_token":
        return ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
    if mode != "global":
        raise ValueError(f"unknown importance mode {mode!r} (use global or class_token)")
    if query_chunk is None:
        query_chunk = max(1, SCORE_CHUNK_ELEMENTS // (batch * heads * tokens))
    if query_chunk < 1:
        raise ValueError(f"query_chunk {query_chunk} must be >= 1")
    keys_t = k.contiguous().transpose(-2, -1)  # k is a strided view of qkv: copied once, not once per chunk
    total = q.new_zeros(batch, heads, tokens)
    for start in range(0, tokens, query_chunk):
        total += ((q[:, :, start : start + query_chunk] * scale) @ keys_t).softmax(dim=-1).sum(dim=-2)
    return total / tokens


def flash_global_importance(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fused attention context `[B, H, N, d]`, global importance `[B, H, N]`) by two CPU flash passes, or None.

    None where the kernel does not apply (not float32 on CPU, or a torch without it); callers then take
    F.scaled_dot_product_attention and `attention_importance`.
    """
    if _FLASH_CPU is None or q.device.type != "cpu" or not q.dtype == k.dtype == v.dtype == torch.float32:
        return None
    context, lse = _FLASH_CPU(q, k, v)  # what F.scaled_dot_product_attention computes on CPU, plus lse_i
    # The mean Z_j / N over queries of the map's column j, sum_i exp(s_ij - lse_i) / N, is exp of the log-sum-exp
    # of the transposed attention (key j attends to queries i) with logits s_ij - lse_i - log N; that per-query
    # bias rides in an extra head dimension because the kernel's broadcast-mask path is twice as slow.
    *lead, dim = q.shape
    keys_as_queries, queries_as_keys = k.new_empty(*lead, dim + 1), q.new_empty(*lead, dim + 1)
    keys_as_queries[..., :dim] = k  # slice writes: a third of torch.cat's time here
    keys_as_queries[..., dim] = -1.0
    torch.mul(q, dim**-0.5, out=queries_as_keys[..., :dim])
    torch.add(lse, math.log(lead[-1]), out=queries_as_keys[..., dim])
    _, column_lse = _FLASH_CPU(keys_as_queries, queries_as_keys, queries_as_keys, scale=1.0)  # its output unused
    return context, column_lse.exp_()


def scored_block_forward(
    block: nn.Module, x: torch.Tensor, mode: Importance, query_chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One timm ViT block on the fused kernel plus its token importance: (output, k, v, scores `[B, H, N]`).

    Same block/k/v contract as `explicit_block_forward`; the scores are `importance_scores` of its map
    (up to float32 rounding), and `query_chunk` forces the chunked path with that many query rows at once.
    """
    if torch.jit.is_tracing():
        # fvcore traces the LPM to count its FLOPs: the explicit map holds the algorithm's multiply-adds (Q·Kᵀ and
        # P·V once each), not the kernels' second pass over Q·Kᵀ for the scores (nor a private op without a handle).
        out, k, v, weights = explicit_block_forward(block, x)
        assert weights is not None
        return out, k, v, importance_scores(weights, mode)
    _, gate, q, k, v = _attention_inputs(block, x)
    fast = flash_global_importance(q, k, v) if mode == "global" and query_chunk is None else None
    if fast is not None:
        context, scores = fast
    else:
        context = F.scaled_dot_product_attention(q, k, v)
        scores = attention_importance(q, k, mode, query_chunk)
    return _block_output(block, x, context, gate), k, v, scores


class FrozenLPM(nn.Module):
    """A frozen timm ViT that returns, for chosen blocks, the features the FPT/FPT+ fusion reads.

    `feature="kv"`: keys and values of the block's self-attention for the selected tokens, each
    `[B, L, H, n, d]`, plus the per-head token indices `[B, L, H, n]`.
    `feature="hidden"` (the MLP-fusion ablation): the block's output hidden states `[B, L, n, D]` of the
    tokens ranked highest by the head-averaged score, plus their indices `[B, L, n]`.
    With `token_ratio=None` every token is kept (n = N) and no indices are returned.
    `query_chunk` forces the chunked scoring path (`attention_importance`) with that many query rows at once.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        layers: Sequence[int],
        token_ratio: float | None = 0.2,
        importance: Importance = "global",
        feature: FeatureKind = "kv",
        query_chunk: int | None = None,
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
        self.query_chunk = query_chunk
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
            outputs: dict[str, torch.Tensor] = {}
            if select:
                x, k, v, scores = scored_block_forward(block, x, self.importance, self.query_chunk)  # [B, H, N]
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
            else:
                x, k, v, _ = explicit_block_forward(block, x, need_attention=False)
                if self.feature == "kv":
                    outputs[KEYS], outputs[VALUES] = k, v
                else:
                    outputs[TOKENS] = x
            for name, tensor in outputs.items():
                per_layer.setdefault(name, []).append(tensor)
        return {name: torch.stack(tensors, dim=1) for name, tensors in per_layer.items()}


class BareForward(nn.Module):
    """The LPM's frozen ViT through the blocks the LPM runs, on timm's own fused blocks, and nothing else: the
    floor of the preload pass (same embedding and blocks, no token scores, no gathering)."""

    def __init__(self, lpm: FrozenLPM) -> None:
        super().__init__()
        self.lpm = lpm

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The hidden states after the last block the LPM feeds from."""
        vit = self.lpm.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[: self.lpm.layers[-1] + 1]:
            x = block(x)
        return x
