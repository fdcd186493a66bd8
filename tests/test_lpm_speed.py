"""The LPM's fast preload path: fused attention plus chunked or two-pass scores, checked against the full softmax map.

The reference below is the straightforward algorithm (methods spec §3.4): the whole `[B, H, N, N]` map, its mean
over queries (or the class-token row), per-head top-k, gathered keys/values. The fixture's attention is sharpened
so that no two scores lie within float32 rounding of each other: token indices must then match exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils._python_dispatch import TorchDispatchMode

from petlbench.fpt.lpm import (
    FrozenLPM,
    _attention_inputs,
    attention_importance,
    flash_global_importance,
    num_selected_tokens,
    scored_block_forward,
)

torch.set_num_threads(1)

RES, BATCH, HEADS, HEAD_DIM = 96, 2, 2, 32
TOKENS = (RES // 16) ** 2 + 1  # 37: prime, so no chunk size but 1 and >= 37 divides it
CHUNKS = [1, 5, 16, 36, 37, 100]
MODES = ["global", "class_token"]


def sharp_vit() -> VisionTransformer:
    """A tiny timm ViT (width 64, 4 blocks, 2 heads) whose q/k weights are tripled: distinct, trained-like scores."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=RES, patch_size=16, embed_dim=HEADS * HEAD_DIM, depth=4, num_heads=HEADS, mlp_ratio=3.0, num_classes=0
    ).eval()
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight[: 2 * HEADS * HEAD_DIM] *= 3.0
    return vit


def images() -> torch.Tensor:
    """Fixed random inputs."""
    return torch.randn(BATCH, 3, RES, RES, generator=torch.Generator().manual_seed(1))


def reference_block(block: Any, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Block output, k, v and scores from the whole softmax map (output = map @ v) of a plain timm block."""
    attn = block.attn
    qkv = attn.qkv(block.norm1(x)).reshape(*x.shape[:2], 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]
    scores = weights.mean(dim=-2) if mode == "global" else weights[:, :, 0, :]
    x = x + attn.proj((weights @ v).transpose(1, 2).reshape(x.shape))
    return x + block.mlp(block.norm2(x)), k, v, scores


def reference_features(vit: VisionTransformer, layers: list[int], mode: str, ratio: float) -> dict[str, torch.Tensor]:
    """The LPM's kv features by the reference algorithm, plus the scores and the smallest relative score gap."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images())))
    n = num_selected_tokens(ratio, x.shape[1])
    out: dict[str, list[torch.Tensor]] = {"keys": [], "values": [], "indices": [], "scores": [], "gap": []}
    for index, block in enumerate(vit.blocks[: layers[-1] + 1]):
        x, k, v, scores = reference_block(block, x, mode)
        if index in layers:
            idx = scores.topk(n, dim=-1).indices
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            ranked = scores.sort(dim=-1, descending=True).values
            out["gap"].append(((ranked[..., :-1] - ranked[..., 1:]) / ranked[..., :-1]).min().reshape(1))
            for name, tensor in (("keys", k.gather(2, gather)), ("values", v.gather(2, gather))):
                out[name].append(tensor)
            out["indices"].append(idx)
            out["scores"].append(scores)
    stacked = {name: torch.stack(tensors, dim=1) for name, tensors in out.items() if name != "gap"}
    stacked["gap"] = torch.cat(out["gap"]).min()
    return stacked


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [None, *CHUNKS])
def test_lpm_features_match_the_full_map_reference(mode: str, chunk: int | None) -> None:
    vit = sharp_vit()
    layers = [1, 2, 3]
    ref = reference_features(vit, layers, mode, 0.3)
    assert ref["gap"] > 2e-6  # fixture precondition: every score ranks apart by far more than float32 rounding
    got = FrozenLPM(vit, layers, 0.3, mode, query_chunk=chunk)(images(), return_scores=True)
    assert got["indices"].shape == (BATCH, len(layers), HEADS, 11)
    assert torch.equal(got["indices"], ref["indices"])
    torch.testing.assert_close(got["scores"], ref["scores"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got["keys"], ref["keys"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["values"], ref["values"], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_scores_match_the_full_map_for_any_chunk(mode: str, chunk: int) -> None:
    vit = sharp_vit()
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images())))
    for block in vit.blocks:
        _, _, q, k, _ = _attention_inputs(block, x)
        x_ref, _, _, scores = reference_block(block, x, mode)
        got = attention_importance(q, k, mode, query_chunk=chunk)
        torch.testing.assert_close(got, scores, rtol=1e-5, atol=1e-8)
        assert torch.equal(got.topk(11, dim=-1).indices, scores.topk(11, dim=-1).indices)
        x = x_ref


@torch.no_grad()
def test_flash_pass_matches_sdpa_and_the_map() -> None:
    vit = sharp_vit()
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images())))
    block = vit.blocks[1]
    _, _, q, k, v = _attention_inputs(block, x)
    fast = flash_global_importance(q, k, v)
    if fast is None:
        pytest.skip("this torch has no CPU flash-attention kernel")
    context, scores = fast
    assert torch.equal(context, F.scaled_dot_product_attention(q, k, v))  # timm's fused path, bit for bit
    weights = ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    torch.testing.assert_close(context, weights @ v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, weights.mean(dim=-2), rtol=1e-5, atol=1e-8)
    out, _, _, _ = scored_block_forward(block, x, "global")
    torch.testing.assert_close(out, block(x), rtol=0, atol=1e-6)


@torch.no_grad()
def test_hidden_feature_uses_the_fused_block_output() -> None:
    vit = sharp_vit()
    got = FrozenLPM(vit, [1, 3], 0.3, "global", feature="hidden")(images())
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images())))
    for index, block in enumerate(vit.blocks):
        x, _, _, scores = reference_block(block, x, "global")
        if index in (1, 3):
            idx = scores.mean(dim=1).topk(11, dim=-1).indices
            layer = [1, 3].index(index)
            assert torch.equal(got["indices"][:, layer], idx)
            torch.testing.assert_close(got["tokens"][:, layer], x.gather(1, idx.unsqueeze(-1).expand(-1, -1, 64)))


class LargestTensor(TorchDispatchMode):
    """Records the largest element count of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@torch.no_grad()
@pytest.mark.parametrize(("mode", "chunk"), [("global", None), ("global", 5), ("class_token", None)])
def test_no_whole_attention_map_is_held(mode: str, chunk: int | None) -> None:
    torch.manual_seed(0)
    res, width, hidden = 128, HEADS * HEAD_DIM, 3 * HEADS * HEAD_DIM  # 257 tokens: the map outgrows all else
    vit = VisionTransformer(
        img_size=res, patch_size=8, embed_dim=width, depth=2, num_heads=HEADS, mlp_ratio=3.0, num_classes=0
    )
    lpm = FrozenLPM(vit, [0, 1], 0.2, mode, query_chunk=chunk)
    tokens = lpm.num_tokens(res)
    with LargestTensor() as probe:
        lpm(torch.randn(BATCH, 3, res, res))
    # the largest tensors are the qkv and MLP activations [B, N, 3 * width]; a map chunk is [B, H, 5, N]
    assert probe.largest == BATCH * tokens * hidden < BATCH * HEADS * tokens * tokens // 2


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [None, 5])
def test_cuda_path_matches_the_cpu_reference(mode: str, chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 in the patch embedding too
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    vit = sharp_vit()
    ref = reference_features(vit, [1, 2, 3], mode, 0.3)
    got = FrozenLPM(vit.cuda(), [1, 2, 3], 0.3, mode, query_chunk=chunk)(images().cuda(), return_scores=True)
    assert torch.equal(got["indices"].cpu(), ref["indices"])
    torch.testing.assert_close(got["keys"].cpu(), ref["keys"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["scores"].cpu(), ref["scores"], rtol=1e-4, atol=1e-7)


def test_bare_forward_is_timms_forward_through_the_same_blocks() -> None:
    """The bench's floor of the preload pass: timm's own fused blocks, the ones the LPM runs, and nothing else."""
    from petlbench.fpt.lpm import BareForward

    vit = sharp_vit()
    with torch.no_grad():
        full = vit.forward_features(images())
        assert torch.equal(vit.norm(BareForward(FrozenLPM(vit, [1, 3]))(images())), full)
        partial = BareForward(FrozenLPM(vit, [0, 1]))(images())
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images())))
        assert torch.equal(partial, vit.blocks[1](vit.blocks[0](x)))


def test_one_off_speed_times_the_work_and_its_floor_and_only_where_there_is_one() -> None:
    from petlbench.core.method import BackboneSpec
    from petlbench.profiling.one_off_speed import one_off_speed
    from petlbench.profiling.profile import build_real, make_method

    speeds = {}
    for key in ("fpt_plus", "lora"):
        model, _, _ = build_real(make_method(key), BackboneSpec("test_vit"), 64, 2, 3, torch.device("cpu"))
        speeds[key] = one_off_speed(model, 2, steps=2, warmup=1)
    fpt = speeds["fpt_plus"]
    assert speeds["lora"] is None and fpt is not None
    assert (fpt["one_off_floor"], fpt["one_off_batch_size"], fpt["one_off_res"]) == ("BareForward", 2, 64)
    ratio = fpt["one_off_images_per_s"] / fpt["one_off_floor_images_per_s"]
    assert fpt["one_off_vs_floor"] == pytest.approx(ratio) and fpt["one_off_vs_floor"] > 0
