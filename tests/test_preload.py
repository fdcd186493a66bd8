"""The FPT/FPT+ feature cache: equality with online features, reuse, invalidation, crash safety."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import run_prepare
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from petlbench.core.method import BackboneSpec, BuildContext, View, get_method
from petlbench.core.options import OptionError
from petlbench.data.source import DatasetSource, Sample, sample_id_for
from petlbench.data.views import ViewDataset
from petlbench.fpt.cache import CACHE_SUBDIR, MANIFEST, CacheSpec, build_cache, ensure_cache
from petlbench.fpt.common import SideTuningModel, preload

torch.set_num_threads(1)

TINY = BackboneSpec("test_vit")
RES = 64


def make_source(root: Path, count: int = 5) -> DatasetSource:
    """Small PNGs of odd sizes split 2/1/2 into train/val/test."""
    rng = np.random.default_rng(1)
    splits = ["train", "train", "val", "test", "test"]
    samples = []
    for i in range(count):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"x{i // 2}.png"  # x0.png exists in both class folders
        Image.fromarray(rng.integers(0, 256, size=(30 + 9 * i, 47, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, i % 2, splits[i], sample_id_for(path, root)))
    return DatasetSource("tiny", root, ["c0", "c1"], samples, "official")


def build(
    tmp: Path, res: int = RES, seed: int = 0, key: str = "fpt_plus", **opts: str
) -> tuple[Any, SideTuningModel, BuildContext]:
    """Method, model and context (tiny ViT, side 32 px, preload workers 0), logging into `ctx.messages`."""
    opts = {"side_res": "32", "preload_workers": "0", "preload_batch_size": "2", **opts}
    method = get_method(key).from_overrides(opts)
    messages: list[str] = []
    ctx = BuildContext(backbone=TINY, num_classes=2, res=res, cache_dir=tmp / "cache", log=messages.append)
    ctx.messages = messages  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    return method, method.build(ctx), ctx


def prepare(tmp: Path, source: DatasetSource, **kwargs: Any) -> tuple[SideTuningModel, dict[str, Any], BuildContext]:
    """Build a model and run its preloading over the three splits."""
    method, model, ctx = build(tmp, **kwargs)
    views = method.views(ctx.res)
    splits = {
        name: ViewDataset(source.split(name), views, train=(name == "train"), mean=source.mean, std=source.std)
        for name in ("train", "val", "test")
    }
    return model, run_prepare(model, splits, ctx), ctx


def cache_folders(tmp: Path) -> list[Path]:
    """Completed cache folders."""
    root = tmp / "cache" / CACHE_SUBDIR
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


def test_cached_features_equal_online_features(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    model, splits, ctx = prepare(tmp_path, source)
    info = model.preload_info
    assert info["preloaded"] and not info["cache_reused"] and info["cache_bytes"] > 0
    assert info["preload_seconds"] >= 0 and Path(info["cache_path"]).is_dir()
    assert any("preloading LPM features into" in m for m in ctx.messages)
    lpm_view = ViewDataset(source.split("test"), {"lpm": View(RES, augment=False)}, False, source.mean, source.std)
    online = model.lpm(default_collate([lpm_view[i] for i in range(len(lpm_view))])["lpm"])
    cached = default_collate([splits["test"][i] for i in range(len(splits["test"]))])
    assert cached["lpm_keys"].dtype == torch.float16
    assert torch.equal(cached["lpm_indices"], online["indices"])
    for name in ("keys", "values"):
        torch.testing.assert_close(cached[f"lpm_{name}"].float(), online[name], atol=2e-3, rtol=1e-3)
    assert set(cached) == {"side", "label", "index", "lpm_keys", "lpm_values", "lpm_indices"}  # no LPM view decoded


def test_cache_layout_and_manifest(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    model, _, _ = prepare(tmp_path, source)
    (folder,) = cache_folders(tmp_path)
    assert folder.name.startswith("test_vit-64px-")
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "indices.npy", "keys.npy", MANIFEST, "values.npy"]
    manifest = json.loads((folder / MANIFEST).read_text())
    n = 3  # floor(0.2 * 17)
    assert manifest["arrays"]["keys"] == {"shape": [5, 6, 2, n, 32], "dtype": "float16"}
    assert manifest["arrays"]["indices"] == {"shape": [5, 6, 2, n], "dtype": "int32"}
    assert manifest["config"]["res"] == RES and manifest["config"]["token_ratio"] == 0.2
    for name, entry in manifest["files"].items():
        assert (folder / name).stat().st_size == entry["bytes"] and len(entry["sha256"]) == 64
    assert len(json.loads((folder / "index.json").read_text())) == 5  # same-stem files get distinct ids
    assert model.preload_info["cache_bytes"] == sum(e["bytes"] for e in manifest["files"].values())
    keys = np.load(folder / "keys.npy", mmap_mode="r")
    assert isinstance(keys, np.memmap)


def test_cache_is_reused_without_running_the_lpm(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    first, _, _ = prepare(tmp_path, source)
    method, model, ctx = build(tmp_path)
    calls: list[int] = []
    model.lpm.register_forward_hook(lambda *_: calls.append(1))
    views = method.views(RES)
    splits = {
        n: ViewDataset(source.split(n), views, n == "train", source.mean, source.std) for n in ("train", "val", "test")
    }
    run_prepare(model, splits, ctx)
    assert calls == [] and model.preload_info["cache_reused"] is True
    assert model.preload_info["cache_path"] == first.preload_info["cache_path"]
    assert any(m.startswith("reusing preloaded features from") for m in ctx.messages)


def test_other_resolution_or_ratio_gets_its_own_cache(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    base, _, _ = prepare(tmp_path, source)
    other_res, _, _ = prepare(tmp_path, source, res=96)
    other_ratio, _, _ = prepare(tmp_path, source, token_ratio="0.5")
    for model in (other_res, other_ratio):
        assert not model.preload_info["cache_reused"]
        assert model.preload_info["cache_path"] != base.preload_info["cache_path"]
    assert len(cache_folders(tmp_path)) == 3
    method, model, ctx = build(tmp_path)
    with torch.no_grad():
        model.lpm.vit.blocks[0].norm1.weight.add_(0.5)  # other LPM weights: the weights digest differs
    views = method.views(RES)
    run_prepare(
        model,
        {
            n: ViewDataset(source.split(n), views, n == "train", source.mean, source.std)
            for n in ("train", "val", "test")
        },
        ctx,
    )
    assert not model.preload_info["cache_reused"] and len(cache_folders(tmp_path)) == 4


def test_cache_of_another_configuration_in_place_is_rejected_and_rebuilt(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    low, _, _ = prepare(tmp_path, source)
    high, _, _ = prepare(tmp_path, source, res=96)
    low_path, high_path = Path(low.preload_info["cache_path"]), Path(high.preload_info["cache_path"])
    shutil.rmtree(high_path)
    shutil.copytree(low_path, high_path)  # a 64-px cache sitting where the 96-px one belongs
    again, splits, ctx = prepare(tmp_path, source, res=96)
    assert not again.preload_info["cache_reused"]
    assert any("built for another configuration (differs in: " in m and "res" in m for m in ctx.messages)
    assert json.loads((high_path / MANIFEST).read_text())["config"]["res"] == 96
    assert splits["train"][0]["lpm_keys"].shape[-2] == 7  # floor(0.2 * 37)


def test_truncated_data_file_is_detected_and_rebuilt(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    first, _, _ = prepare(tmp_path, source)
    keys = Path(first.preload_info["cache_path"]) / "values.npy"
    size = keys.stat().st_size
    with open(keys, "r+b") as handle:
        handle.truncate(size - 100)
    again, splits, ctx = prepare(tmp_path, source)
    assert not again.preload_info["cache_reused"]
    assert any("values.npy has" in m and "truncated" in m for m in ctx.messages)
    assert keys.stat().st_size == size
    assert splits["val"][0]["lpm_values"].shape == (6, 2, 3, 32)


def test_corrupted_file_is_caught_by_checksum_verification(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    first, _, _ = prepare(tmp_path, source, cache_verify="checksum")
    keys = Path(first.preload_info["cache_path"]) / "keys.npy"
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0xFF
    keys.write_bytes(bytes(data))
    again, _, ctx = prepare(tmp_path, source, cache_verify="checksum")
    assert not again.preload_info["cache_reused"]
    assert any("does not match its checksum" in m for m in ctx.messages)


def test_interrupted_build_is_never_used(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    first, _, _ = prepare(tmp_path, source)
    folder = Path(first.preload_info["cache_path"])
    (folder / MANIFEST).unlink()  # as if the process died before the manifest was written
    again, _, ctx = prepare(tmp_path, source)
    assert not again.preload_info["cache_reused"]
    assert any("no manifest" in m for m in ctx.messages)
    assert (folder / MANIFEST).is_file()


def test_failing_build_leaves_no_cache_and_no_temp_folder(tmp_path: Path) -> None:
    spec = CacheSpec(config={"x": 1}, arrays={"keys": ((2, 3), "float")}, sample_ids=("a", "b", "c"))

    def produce():
        yield ["a"], {"keys": np.ones((1, 2, 3))}
        raise KeyboardInterrupt  # killed half-way

    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        ensure_cache(root, spec, produce, log=lambda _: None)
    assert [p for p in (root / CACHE_SUBDIR).glob(f"*{spec.key}*") if p.suffix != ".lock"] == []
    # a temporary folder left by a killed process is not a cache, and is cleaned by the next build
    leftover = root / CACHE_SUBDIR / f".{spec.folder_name()}.tmp-999999"
    leftover.mkdir()

    def complete():
        yield ["c", "a", "b"], {"keys": np.arange(18).reshape(3, 2, 3)}

    store, info = ensure_cache(root, spec, complete, log=lambda _: None)
    assert not leftover.exists() and not info["cache_reused"]
    assert store.read(store.row("c"))["keys"].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(Exception, match="skipped 1 of 3"):
        build_cache(
            tmp_path / "other", spec, lambda: iter([(["a", "b"], {"keys": np.zeros((2, 2, 3))})]), log=lambda _: None
        )
    assert not (tmp_path / "other").exists()


def test_float32_cache_matches_online_exactly(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    model, splits, _ = prepare(tmp_path, source, cache_dtype="float32")
    item = splits["train"][0]
    assert item["lpm_keys"].dtype == torch.float32
    lpm_view = ViewDataset(source.split("train"), {"lpm": View(RES, augment=False)}, False, source.mean, source.std)
    online = model.lpm(lpm_view[0]["lpm"][None])
    torch.testing.assert_close(item["lpm_keys"], online["keys"][0])


def test_store_pickles_without_data_and_loads_in_workers(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    _, splits, _ = prepare(tmp_path, source)
    store = splits["train"].store
    store.array("keys")
    assert len(pickle.dumps(store)) < 4096  # the memmap is reopened in each worker, never copied
    batches = list(DataLoader(splits["test"], batch_size=2, num_workers=1))
    assert batches[0]["lpm_keys"].shape == (2, 6, 2, 3, 32)


def test_preload_function_feeds_a_later_training_run(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    method = get_method("fpt_plus").from_overrides({"side_res": "32", "preload_workers": "0"})
    messages: list[str] = []
    torch.manual_seed(0)
    info = preload(method, source, RES, TINY, tmp_path / "cache", log=messages.append)
    assert not info["cache_reused"] and info["num_images"] == 5 and info["cache_bytes"] > 0
    model, _, _ = prepare(tmp_path, source)
    assert model.preload_info["cache_reused"] and model.preload_info["cache_path"] == info["cache_path"]
    torch.manual_seed(0)  # side-network options (side_res, workers) are not part of the key: reused
    assert preload("fpt_plus", source, RES, TINY, tmp_path / "cache", log=messages.append)["cache_reused"] is True
    with pytest.raises(OptionError, match="FPT and FPT"):
        preload(_NotSideTuning(), source, RES, TINY, tmp_path / "cache")  # type: ignore[arg-type]
    no_lpm = get_method("fpt_plus").from_overrides({"use_lpm": "false"})
    with pytest.raises(OptionError, match="no cacheable"):
        preload(no_lpm, source, RES, TINY, tmp_path / "cache")


class _NotSideTuning:
    """Stands in for a method without LPM features."""


def test_fpt_and_mlp_fusion_caches(tmp_path: Path) -> None:
    source = make_source(tmp_path / "data")
    fpt, splits, _ = prepare(tmp_path, source, key="fpt")
    assert splits["train"][0]["lpm_keys"].shape == (6, 2, 3, 32)
    mlp, splits, _ = prepare(tmp_path, source, fusion="mlp")
    item = splits["train"][0]
    assert item["lpm_tokens"].shape == (6, 3, 64) and item["lpm_indices"].shape == (6, 3)
    assert mlp.preload_info["cache_path"] != fpt.preload_info["cache_path"]
    mlp.eval()
    batch = default_collate([item])
    with torch.no_grad():
        assert mlp(batch).shape == (1, 2)


def test_default_verification_catches_same_size_corruption_and_hashes_once(tmp_path: Path, monkeypatch) -> None:
    """Overwriting keys.npy and values.npy in place with other bytes of the same size is caught by default; an
    unchanged cache is hashed once per process; a forced run (`recheck`) hashes it again."""
    import petlbench.fpt.cache as cache

    source = make_source(tmp_path / "data")
    first, _, _ = prepare(tmp_path, source)
    hashed: list[str] = []
    real = cache._sha256_file
    monkeypatch.setattr(cache, "_sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    again, _, _ = prepare(tmp_path, source)
    assert again.preload_info["cache_reused"] and hashed == []  # hashed when it was built, unchanged since
    folder = Path(first.preload_info["cache_path"])
    for name in ("keys.npy", "values.npy"):
        data = bytearray((folder / name).read_bytes())
        data[-64:] = bytes(64)  # same size, other content
        (folder / name).write_bytes(bytes(data))
    corrupted, _, ctx = prepare(tmp_path, source)
    assert not corrupted.preload_info["cache_reused"]
    assert any("does not match its checksum" in m for m in ctx.messages)
    hashed.clear()
    method, model, ctx = build(tmp_path)
    ctx.recheck = True
    views = method.views(ctx.res)
    splits = {
        n: ViewDataset(source.split(n), views, n == "train", source.mean, source.std) for n in ("train", "val", "test")
    }
    run_prepare(model, splits, ctx)
    assert model.preload_info["cache_reused"] and "keys.npy" in hashed
