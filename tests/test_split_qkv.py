"""Splitting timm's fused qkv into q, k, v layers is exact, honours the attention keywords, and merges back."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from timm.layers import Attention

from petlbench.backbones.peft_adapters import QV_TARGET_REGEX
from petlbench.backbones.split_qkv import SplitQKVAttention, merge_qkv, split_qkv
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BackboneSpec

torch.set_num_threads(1)


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """The tiny timm ViT at 32 px, 3 classes, eval mode."""
    torch.manual_seed(seed)
    return create_backbone(BackboneSpec("test_vit"), 32, 3).eval()


def batch(seed: int = 1) -> torch.Tensor:
    """Four random 32-px images."""
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    """Switch every attention module between fused and explicit attention."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


@pytest.mark.parametrize("fused", [True, False])
def test_split_model_equals_fused_model(fused: bool) -> None:
    reference = tiny_vit()
    split = copy.deepcopy(reference)
    assert split_qkv(split) == 6
    assert all(isinstance(block.attn, SplitQKVAttention) for block in split.blocks)
    set_fused(reference, fused)
    set_fused(split, fused)
    x = batch()
    with torch.no_grad():
        difference = (split(x) - reference(x)).abs().max().item()
    assert difference <= 1e-6


def test_split_attention_accepts_mask_and_causal_keywords() -> None:
    attn = tiny_vit().blocks[0].attn
    split = SplitQKVAttention(copy.deepcopy(attn))
    tokens = torch.randn(2, 5, 64)
    mask = torch.zeros(2, 1, 5, 5)
    mask[..., -1] = float("-inf")
    for fused in (True, False):
        attn.fused_attn = split.fused_attn = fused
        with torch.no_grad():
            for kwargs in ({"attn_mask": mask}, {"is_causal": True}):
                assert torch.allclose(split(tokens, **kwargs), attn(tokens, **kwargs), atol=1e-6)


def test_split_copies_the_fused_rows() -> None:
    reference = tiny_vit()
    split = copy.deepcopy(reference)
    split_qkv(split)
    qkv = reference.blocks[2].attn.qkv
    attn = split.blocks[2].attn
    for index, layer in enumerate((attn.q, attn.k, attn.v)):
        rows = slice(64 * index, 64 * (index + 1))
        assert torch.equal(layer.weight, qkv.weight[rows]) and torch.equal(layer.bias, qkv.bias[rows])


def test_merge_restores_timm_layout() -> None:
    reference = tiny_vit()
    model = copy.deepcopy(reference)
    split_qkv(model)
    assert merge_qkv(model) == 6
    assert all(type(block.attn) is Attention for block in model.blocks)
    expected = reference.state_dict()
    merged = model.state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[key], expected[key]) for key in expected)


def test_merge_after_lora_merge_and_unload() -> None:
    net = tiny_vit()
    split_qkv(net)
    lora = get_peft_model(net, LoraConfig(r=4, lora_alpha=4, target_modules=QV_TARGET_REGEX)).eval()
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()
        expected = lora(batch())
    with pytest.raises(TypeError, match="merge_and_unload"):
        merge_qkv(lora)
    plain = lora.merge_and_unload()
    merge_qkv(plain)
    with torch.no_grad():
        assert torch.allclose(plain(batch()), expected, atol=1e-5)
    assert "blocks.0.attn.qkv.weight" in plain.state_dict()


def test_split_requires_timm_attention() -> None:
    with pytest.raises(ValueError, match="no timm Attention"):
        split_qkv(torch.nn.Linear(2, 2))
