"""FPT+ and FPT: shapes, frozen LPM, token selection, parameter counts, ablation switches, introspection.

What every method must do (freezing, steps, state dicts, attention, memory estimate) is in test_contract.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import run_prepare
from PIL import Image
from test_contract import CASES
from torch.utils.data import default_collate

from petlbench.core.method import BackboneSpec, BuildContext, View, get_method
from petlbench.core.options import OptionError
from petlbench.data.source import DatasetSource, Sample, sample_id_for
from petlbench.data.views import ViewDataset
from petlbench.fpt.common import SideTuningModel, fusion_attention_maps, resolve_side_res
from petlbench.fpt.lpm import FrozenLPM, explicit_block_forward, importance_scores, num_selected_tokens
from petlbench.fpt.side_network import FinePromptFusion, MLPFusion, SidePromptFusion
from petlbench.methods.fpt import FPT
from petlbench.methods.fpt_plus import ABLATION_ROWS, FPTPlus

torch.set_num_threads(1)

TINY = BackboneSpec("test_vit")  # width 64, 6 blocks, 2 heads, patch 16, MLP ratio 3
LPM_RES, SIDE_RES, CLASSES = 96, 32, 3
LPM_TOKENS = (LPM_RES // 16) ** 2 + 1  # 37


def make_source(root: Path, count: int = 6) -> DatasetSource:
    """A few small PNGs (odd sizes, RGB and grey) split 3/1/2 into train/val/test."""
    rng = np.random.default_rng(0)
    splits = ["train", "train", "train", "val", "test", "test"]
    samples = []
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "img.png" if i < 2 else folder / f"img{i}.png"  # same stem in both classes
        shape = (41 + 7 * i, 53 + 5 * i) + (() if i % 3 == 2 else (3,))
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path)
        samples.append(Sample(path, i % 2, splits[i % len(splits)], sample_id_for(path, root)))
    return DatasetSource("tiny", root, ["a", "b"], samples, "official")


def make_splits(source: DatasetSource, views: dict[str, View]) -> dict[str, ViewDataset]:
    """The trainer's split datasets for a method's views."""
    return {
        name: ViewDataset(source.split(name), views, train=(name == "train"), mean=source.mean, std=source.std)
        for name in ("train", "val", "test")
    }


def batch_of(dataset: Any, count: int | None = None) -> dict[str, Any]:
    """The first `count` items of a dataset collated into one batch."""
    count = len(dataset) if count is None else count
    return default_collate([dataset[i] for i in range(count)])


def build(
    key: str = "fpt_plus",
    res: int = LPM_RES,
    tmp: Path | None = None,
    seed: int = 0,
    classes: int = CLASSES,
    **opts: str,
) -> tuple[Any, SideTuningModel, BuildContext]:
    """Method, model and context for the tiny ViT (side 32 px unless overridden)."""
    if opts.get("asymmetric", "true") == "true":
        opts.setdefault("side_res", str(SIDE_RES))
    method = get_method(key).from_overrides(opts)
    ctx = BuildContext(
        backbone=TINY, num_classes=classes, res=res, cache_dir=(tmp or Path(".")) / "cache", log=lambda _: None
    )
    torch.manual_seed(seed)
    return method, method.build(ctx), ctx


def random_batch(model: SideTuningModel, views: dict[str, View], batch: int = 2) -> dict[str, torch.Tensor]:
    """Random images for every view."""
    out: dict[str, torch.Tensor] = {name: torch.randn(batch, 3, v.size, v.size) for name, v in views.items()}
    out["label"] = torch.zeros(batch, dtype=torch.long)
    return out


def side_block_input_lengths(model: SideTuningModel, batch: dict[str, Any]) -> list[int]:
    """Sequence length entering every side block during one forward."""
    lengths: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1])) for b in model.side.blocks]
    model(batch)
    for hook in hooks:
        hook.remove()
    return lengths


# --- shapes and the frozen LPM ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["fpt_plus", "fpt"])
def test_output_shapes_at_odd_resolutions(key: str) -> None:
    method, model, _ = build(key)
    views = method.views(LPM_RES)
    assert views == {"lpm": View(LPM_RES, augment=False), "side": View(SIDE_RES, augment=True)}
    batch = random_batch(model, views, batch=3)
    features = model.lpm(batch["lpm"])
    n = math.floor(0.2 * LPM_TOKENS)
    assert features["keys"].shape == (3, 6, 2, n, 32) == features["values"].shape
    assert features["indices"].shape == (3, 6, 2, n)
    assert model(batch).shape == (3, CLASSES)
    assert side_block_input_lengths(model, batch) == [(SIDE_RES // 16) ** 2 + 1 + 16] * 6


def test_explicit_block_matches_timm_block() -> None:
    _, model, _ = build()
    block = model.lpm.vit.blocks[2]
    x = torch.randn(2, LPM_TOKENS, 64)
    out, k, v, weights = explicit_block_forward(block, x)
    torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)
    assert k.shape == v.shape == (2, 2, LPM_TOKENS, 32)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, LPM_TOKENS))


def test_lpm_frozen_eval_no_grad() -> None:
    method, model, _ = build()
    model.train()
    assert not model.lpm.training and not model.lpm.vit.training
    assert model.side.training and model.fusion.training
    assert all(not p.requires_grad for p in model.lpm.parameters())
    batch = random_batch(model, method.views(LPM_RES))
    calls = []
    model.lpm.register_forward_hook(lambda *_: calls.append(1))
    model(batch).sum().backward()
    assert calls == [1]  # online mode does run it
    assert all(p.grad is None for p in model.lpm.parameters())
    assert all(p.grad is not None for p in model.side.parameters())
    assert model.fusion.prompts.grad is not None


def test_random_init_lpm_is_fixed_but_the_side_follows_the_seed() -> None:
    _, first, _ = build(seed=0)
    _, second, _ = build(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first.lpm.parameters(), second.lpm.parameters(), strict=True))
    assert not torch.equal(first.side.pos_embed, second.side.pos_embed)


def test_side_network_spec_init_and_heads() -> None:
    _, model, _ = build()
    side = model.side
    assert side.embed_dim == 64 // 8 and side.blocks[0].attn.num_heads == 2
    assert side.pos_embed.shape == (1, (SIDE_RES // 16) ** 2 + 1, 8)
    assert side.blocks[0].mlp.fc1.out_features == 24  # the LPM's MLP ratio (3 for test_vit)
    assert torch.all(side.blocks[0].attn.qkv.bias == 0) and torch.all(side.norm.weight == 1)
    assert model.fusion.prompts.abs().max() < 1e-4


# --- token selection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "expected"), [(0.2, 7), (0.29, 10), (0.5, 18), (1.0, 37), (0.01, 1)])
def test_fused_token_count_is_floor_ratio_times_tokens(ratio: float, expected: int) -> None:
    assert num_selected_tokens(ratio, LPM_TOKENS) == expected == max(1, math.floor(ratio * LPM_TOKENS + 1e-9))
    method, model, _ = build(token_ratio=str(ratio))
    seen = []
    model.fusion.register_forward_pre_hook(lambda _m, args: seen.append(args[0]["keys"].shape[3]))
    model(random_batch(model, method.views(LPM_RES)))
    assert seen == [expected]
    assert num_selected_tokens(0.2, 1025) == 205 and num_selected_tokens(0.2, 1601) == 320


@pytest.mark.parametrize("mode", ["global", "class_token"])
def test_per_head_selection_uses_the_block_attention(mode: str) -> None:
    _, model, _ = build(importance=mode)
    lpm = model.lpm
    images = torch.randn(2, 3, LPM_RES, LPM_RES)
    features = lpm(images, return_scores=True)
    vit = lpm.vit
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    for layer, block in enumerate(vit.blocks):
        x, k, _, weights = explicit_block_forward(block, x)
        scores = weights.mean(dim=-2) if mode == "global" else weights[:, :, 0, :]
        torch.testing.assert_close(importance_scores(weights, mode), scores)
        top = scores.topk(7, dim=-1).indices
        # The untrained LPM scores every token near 1/N and runs the fused kernel: ranks may swap only between
        # scores equal up to float32 rounding, so the chosen tokens' scores must be the top 7, in order.
        chosen = features["indices"][:, layer]
        torch.testing.assert_close(features["scores"][:, layer], scores, rtol=1e-6, atol=0)
        torch.testing.assert_close(scores.gather(-1, chosen), scores.gather(-1, top), rtol=1e-6, atol=0)
        gathered = torch.stack([k[b, h, chosen[b, h]] for b in range(2) for h in range(2)]).reshape(2, 2, 7, 32)
        torch.testing.assert_close(features["keys"][:, layer], gathered)


# --- parameter counts ----------------------------------------------------------------------------------------


def vit_block(width: int, mlp_ratio: float) -> int:
    """b(w) = (4 + 2r)w² + (9 + r)w."""
    return int((4 + 2 * mlp_ratio) * width**2 + (9 + mlp_ratio) * width)


def closed_form(
    variant: str,
    width: int,
    depth: int,
    mlp_ratio: float,
    patch: int,
    res: int,
    side_res: int,
    k: int,
    side_layers: int,
    prompts: int,
    classes: int,
) -> tuple[int, int]:
    """(trainable, total) from the class docstrings' closed forms."""
    ds = width // k
    tokens, side_tokens = (res // patch) ** 2 + 1, (side_res // patch) ** 2 + 1
    side = (3 * patch**2 + 1) * ds + ds + side_tokens * ds + side_layers * vit_block(ds, mlp_ratio) + 2 * ds
    side += (ds + 1) * classes
    if variant == "fpt_plus":
        fusion = side_layers * prompts * width + 2 * width + width * ds + ds
    else:
        fusion = side_layers * prompts * ds + (ds * width + width) + (width * ds + ds)
    lpm = (3 * patch**2 + 1) * width + width + tokens * width + depth * vit_block(width, mlp_ratio) + 2 * width
    return side + fusion, side + fusion + lpm


@pytest.mark.parametrize("key", ["fpt_plus", "fpt"])
def test_parameter_counts_tiny_match_closed_form(key: str) -> None:
    _, model, _ = build(key)
    assert model.param_report() == closed_form(key, 64, 6, 3, 16, LPM_RES, SIDE_RES, 8, 6, 16, CLASSES)
    _, model, _ = build(key, num_prompts="4", reduction="4", side_layers="3")
    assert model.param_report() == closed_form(key, 64, 6, 3, 16, LPM_RES, SIDE_RES, 4, 3, 4, CLASSES)


def test_parameter_counts_vit_b_512_match_closed_form_and_case_table() -> None:
    """The class docstrings' closed forms give the counts of the contract tests' case table (built on meta)."""
    ctx = BuildContext(backbone=BackboneSpec("vit_base_patch16_224"), num_classes=5, res=512, log=lambda _: None)
    with torch.device("meta"):
        plus, fpt = FPTPlus().build(ctx), FPT().build(ctx)
    assert plus.param_report() == closed_form("fpt_plus", 768, 12, 4, 16, 512, 128, 8, 6, 16, 5)
    assert plus.param_report() == CASES["fpt_plus"].vit_b
    assert plus.side.pos_embed.shape == (1, 65, 96) and plus.lpm.layers == (6, 7, 8, 9, 10, 11)
    assert fpt.param_report() == closed_form("fpt", 768, 12, 4, 16, 512, 224, 8, 12, 16, 5)
    assert fpt.param_report() == CASES["fpt"].vit_b
    assert fpt.side.pos_embed.shape == (1, 197, 96) and fpt.lpm.layers == tuple(range(12))


# --- ablation switches (one test each) -----------------------------------------------------------------------


def test_switch_use_lpm_false_is_side_network_alone() -> None:
    method, model, _ = build(use_lpm="false")
    assert model.lpm is None and model.fusion is None
    assert method.views(LPM_RES) == {"side": View(SIDE_RES, augment=True)}
    trainable, total = model.param_report()
    assert (
        trainable
        == total
        == closed_form("fpt_plus", 64, 6, 3, 16, LPM_RES, SIDE_RES, 8, 6, 0, CLASSES)[0] - (2 * 64 + 64 * 8 + 8)
    )
    batch = random_batch(model, method.views(LPM_RES))
    assert model(batch).shape == (2, CLASSES)
    assert side_block_input_lengths(model, batch) == [5] * 6


def test_switch_fusion_mlp_appends_projected_lpm_tokens() -> None:
    method, model, _ = build(fusion="mlp")
    assert isinstance(model.fusion, MLPFusion) and model.lpm.feature == "hidden"
    batch = random_batch(model, method.views(LPM_RES))
    assert side_block_input_lengths(model, batch) == [5 + 7] * 6  # n LPM tokens, no prompts
    _, full, _ = build(fusion="mlp", token_selection="false")
    assert side_block_input_lengths(full, batch) == [5 + LPM_TOKENS] * 6
    trainable, _ = model.param_report()
    side_only = build(use_lpm="false")[1].param_report()[0]
    assert trainable - side_only == 2 * 64 + 64 * 8 + 8 + 8 * 8 + 8


def test_switch_fusion_cross_attention_is_the_default() -> None:
    _, plus, _ = build()
    _, fpt, _ = build("fpt")
    assert isinstance(plus.fusion, FinePromptFusion) and plus.fusion.prompts.shape == (6, 16, 64)
    assert isinstance(fpt.fusion, SidePromptFusion) and fpt.fusion.prompts.shape == (6, 16, 8)
    assert plus.lpm.feature == fpt.lpm.feature == "kv"


def test_switch_asymmetric_false_shares_the_high_resolution_input(tmp_path: Path) -> None:
    method, model, ctx = build(asymmetric="false", tmp=tmp_path)
    views = method.views(LPM_RES)
    assert views == {"image": View(LPM_RES, augment=True)}  # one augmented image for both networks
    assert model.side.pos_embed.shape[1] == LPM_TOKENS
    batch = random_batch(model, views)
    assert side_block_input_lengths(model, batch) == [LPM_TOKENS + 16] * 6
    source = make_source(tmp_path / "data")
    splits = run_prepare(model, make_splits(source, views), ctx)
    assert not model.preload_info["preloaded"] and "asymmetric=false" in model.preload_info["reason"]
    assert not (tmp_path / "cache").exists()
    assert "lpm_keys" not in splits["train"][0]
    with pytest.raises(OptionError, match="side_res needs asymmetric"):
        FPTPlus.from_overrides({"asymmetric": "false", "side_res": "32"})


def test_switch_token_selection_false_keeps_all_tokens() -> None:
    method, model, _ = build(token_selection="false")
    assert model.lpm.token_ratio is None
    features = model.lpm(torch.randn(2, 3, LPM_RES, LPM_RES))
    assert features["keys"].shape == (2, 6, 2, LPM_TOKENS, 32) and "indices" not in features
    assert model(random_batch(model, method.views(LPM_RES))).shape == (2, CLASSES)


def test_switch_preload_false_runs_the_lpm_online(tmp_path: Path) -> None:
    method, model, ctx = build(preload="false", tmp=tmp_path)
    source = make_source(tmp_path / "data")
    splits = run_prepare(model, make_splits(source, method.views(LPM_RES)), ctx)
    assert model.preload_info["preloaded"] is False and not (tmp_path / "cache").exists()
    batch = batch_of(splits["train"], 2)
    assert "lpm" in batch and "lpm_keys" not in batch
    calls = []
    model.lpm.register_forward_hook(lambda *_: calls.append(1))
    model.place(torch.device("cpu"))
    model(batch)
    assert calls == [1]


def test_switch_importance_class_token_changes_selection() -> None:
    _, glob, _ = build(importance="global")
    _, cls, _ = build(importance="class_token")
    images = torch.randn(2, 3, LPM_RES, LPM_RES)
    assert not torch.equal(glob.lpm(images)["indices"], cls.lpm(images)["indices"])


def test_switches_size_knobs() -> None:
    _, model, _ = build(num_prompts="4", reduction="4", side_layers="2", lpm_layers="1,4", side_res="48")
    assert model.fusion.prompts.shape == (2, 4, 64) and model.side.embed_dim == 16
    assert len(model.side.blocks) == 2 and model.lpm.layers == (1, 4)
    assert model.side.pos_embed.shape == (1, 10, 16)
    _, top, _ = build(side_layers="3")
    assert top.lpm.layers == (3, 4, 5)  # top L_S blocks by default
    with pytest.raises(OptionError, match="lpm_layers lists 2 blocks"):
        FPTPlus.from_overrides({"side_layers": "3", "lpm_layers": "1,2"})
    with pytest.raises(ValueError, match="exceeds the LPM depth"):
        build(side_layers="7")


def test_ablation_rows_are_valid_option_sets() -> None:
    for overrides in ABLATION_ROWS.values():
        method = FPTPlus.from_overrides(overrides)
        torch.manual_seed(0)
        model = method.build(BuildContext(backbone=TINY, num_classes=2, res=64, log=lambda _: None))
        assert model(random_batch(model, method.views(64))).shape == (2, 2)


def test_side_res_rule() -> None:
    assert resolve_side_res(None, 512, 16, 128, True) == 128  # FPT+ default
    assert resolve_side_res(None, 512, 16, 224, True) == 224  # FPT default
    assert resolve_side_res(None, 640, 16, 128, True) == 128  # LPM-resolution sweep keeps the side at 128
    assert resolve_side_res(None, 96, 16, 128, True) == 32  # 96 * 128 / 512 = 24 -> nearest multiple of 16
    assert resolve_side_res(None, 64, 16, 128, True) == 16
    assert resolve_side_res(None, 64, 16, 224, True) == 32
    assert resolve_side_res(None, 512, 14, 128, True) == 126
    assert resolve_side_res(64, 512, 16, 128, True) == 64
    assert resolve_side_res(None, 512, 16, 128, False) == 512
    with pytest.raises(ValueError, match="multiple of the patch"):
        resolve_side_res(40, 512, 16, 128, True)
    assert FPTPlus().views(64) == {"lpm": View(64, augment=False), "side": View(16, augment=True)}


# --- online versus preloaded, introspection ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["fpt_plus", "fpt"])
def test_online_and_preloaded_eval_logits_agree(key: str, tmp_path: Path) -> None:
    method, model, ctx = build(key, tmp=tmp_path)
    source = make_source(tmp_path / "data")
    online_splits = make_splits(source, method.views(LPM_RES))
    model.eval()
    with torch.no_grad():
        online = model(batch_of(online_splits["test"]))
    splits = run_prepare(model, online_splits, ctx)
    assert model.preloaded
    model.place(torch.device("cpu"))
    model.eval()
    batch = batch_of(splits["test"])
    assert "lpm" not in batch and batch["lpm_keys"].dtype == torch.float16
    with torch.no_grad():
        preloaded = model(batch)
    torch.testing.assert_close(preloaded, online, atol=2e-3, rtol=2e-3)


def test_cached_training_step_never_calls_the_lpm(tmp_path: Path) -> None:
    method, model, ctx = build(tmp=tmp_path)
    source = make_source(tmp_path / "data")
    splits = run_prepare(model, make_splits(source, method.views(LPM_RES)), ctx)
    model.place(torch.device("cpu"))
    calls = []
    model.lpm.register_forward_hook(lambda *_: calls.append("lpm"))
    for block in model.lpm.vit.blocks:
        block.register_forward_hook(lambda *_: calls.append("block"))
    model.train()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    batch = batch_of(splits["train"], 2)
    loss = torch.nn.functional.cross_entropy(model(batch), batch["label"])
    loss.backward()
    optimizer.step()
    assert calls == []
    assert all(p.grad is None and not p.requires_grad for p in model.lpm.parameters())
    assert model.fusion.out_proj.weight.grad is not None
    del batch["lpm_keys"], batch["lpm_values"], batch["lpm_indices"]
    with pytest.raises(RuntimeError, match="preloaded but this batch carries none"):
        model(batch)


def test_place_keeps_a_preloaded_lpm_off_the_device(tmp_path: Path) -> None:
    method, model, ctx = build(tmp=tmp_path)
    model.place(torch.device("meta"))  # online: the LPM goes where training runs
    assert next(model.lpm.parameters()).is_meta and next(model.side.parameters()).is_meta
    method, model, ctx = build(tmp=tmp_path)
    online = model.example_batch(method.views(LPM_RES), 2)
    assert set(online) == {"lpm", "side", "label"} and model(online).shape == (2, CLASSES)
    run_prepare(model, make_splits(make_source(tmp_path / "data"), method.views(LPM_RES)), ctx)
    probe = model.example_batch(method.views(LPM_RES), 2)
    assert probe["lpm_keys"].shape == (2, 6, 2, 7, 32) and "lpm" not in probe
    assert model(probe).shape == (2, CLASSES)
    model.place(torch.device("meta"))
    assert next(model.lpm.parameters()).device.type == "cpu"
    assert next(model.side.parameters()).is_meta and next(model.fusion.parameters()).is_meta


def test_fusion_attention_maps(tmp_path: Path) -> None:
    method, model, ctx = build(tmp=tmp_path)
    batch = random_batch(model, method.views(LPM_RES), batch=2)
    maps = fusion_attention_maps(model, batch)
    assert maps["lpm_layers"] == [0, 1, 2, 3, 4, 5] and maps["grid"] == 6 and maps["num_prefix_tokens"] == 1
    assert maps["selected_indices"].shape == (2, 6, 2, 7)
    assert maps["prompt_attention"].shape == (2, 6, 2, 16, 7)
    torch.testing.assert_close(maps["prompt_attention"].sum(-1), torch.ones(2, 6, 2, 16))
    assert maps["side_attention"].shape == (2, 6, 2, 5, 16)
    assert maps["side_attention_mass"].shape == (6,)
    assert torch.all((maps["side_attention_mass"] > 0) & (maps["side_attention_mass"] < 1))
    # the same maps come from preloaded features (indices are cached too)
    source = make_source(tmp_path / "data")
    splits = run_prepare(model, make_splits(source, method.views(LPM_RES)), ctx)
    cached = fusion_attention_maps(model, batch_of(splits["val"]))
    assert cached["selected_indices"].shape == (1, 6, 2, 7)
    with pytest.raises(ValueError, match="need the LPM"):
        fusion_attention_maps(build(use_lpm="false")[1], batch)


def test_frozen_lpm_rejects_bad_layers() -> None:
    _, model, _ = build()
    with pytest.raises(ValueError, match="distinct, increasing"):
        FrozenLPM(model.lpm.vit, [3, 1])
