"""Registry, options, config/run-id, atomic results store and metrics."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Literal

import numpy as np
import pytest
import torch

from petlbench.backbones.classifier import BackboneClassifier
from petlbench.backbones.vit import create_backbone
from petlbench.core.config import RunConfig
from petlbench.core.method import METHODS, BuildContext, Method, register_method
from petlbench.core.options import OptionError, build_options, option, parse_opt_flags
from petlbench.core.registry import Registry, RegistryError
from petlbench.core.results import FAILED, FINISHED, RUNNING, ResultStore
from petlbench.engine.metrics import auc_percent, classification_metrics, mean_std
from petlbench.engine.runner import RunRequest, execute, resolve
from petlbench.engine.training import cosine_factor, is_out_of_memory


def test_registry_duplicate_unknown_and_lazy() -> None:
    reg: Registry[object] = Registry("thing")
    reg.register("alpha", object())
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("alpha", object())
    reg.register_lazy("json_dumps", "json:dumps")
    assert reg.get("json_dumps") is json.dumps
    reg.register("beta", object())
    assert reg.names() == ["alpha", "json_dumps", "beta"]
    with pytest.raises(RegistryError, match="Did you mean alpha"):
        reg.get("alpah")


@dataclasses.dataclass(frozen=True)
class _Opts:
    r: int = option(16, "rank")
    alpha: float = option(16.0, "scale")
    layers: tuple[int, ...] = option((6, 7), "layers")
    mode: Literal["global", "class_token"] = option("global", "importance")
    flag: bool = option(True, "switch")
    limit: int | None = option(None, "optional")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError("r must be positive")


def test_options_coercion_and_errors() -> None:
    opts = build_options(
        _Opts, {"r": "8", "alpha": "0.5", "layers": "1,2,3", "mode": "class_token", "flag": "false", "limit": "3"}, "m"
    )
    assert (opts.r, opts.alpha, opts.layers, opts.mode, opts.flag, opts.limit) == (
        8,
        0.5,
        (1, 2, 3),
        "class_token",
        False,
        3,
    )
    with pytest.raises(OptionError, match="unknown option m.rank; valid options: m.r"):
        build_options(_Opts, {"rank": "8"}, "m")
    with pytest.raises(OptionError, match="not a valid int"):
        build_options(_Opts, {"r": "eight"}, "m")
    with pytest.raises(OptionError, match="not one of"):
        build_options(_Opts, {"mode": "cls"}, "m")
    with pytest.raises(OptionError, match="r must be positive"):
        build_options(_Opts, {"r": "0"}, "m")
    assert parse_opt_flags(["lora.r=8", "fpt_plus.token_ratio=0.3"]) == {
        "lora": {"r": "8"},
        "fpt_plus": {"token_ratio": "0.3"},
    }
    with pytest.raises(OptionError, match="METHOD.KEY=VALUE"):
        parse_opt_flags(["r=8"])


def test_run_id_depends_on_identity_fields_only() -> None:
    base = RunConfig(method="lora", dataset="d", dataset_fingerprint="f")
    assert base.run_id == RunConfig(method="lora", dataset="d", dataset_fingerprint="f", num_workers=4).run_id
    assert base.run_id != dataclasses.replace(base, seed=1).run_id
    assert base.run_id != dataclasses.replace(base, method_options={"r": 8}).run_id
    assert base.run_id.startswith("lora-")
    assert RunConfig.from_dict(base.to_dict()) == base


def test_store_statuses_index_and_collect(tmp_path) -> None:
    store = ResultStore(tmp_path)
    cfg = RunConfig(method="bitfit", dataset="d", dataset_fingerprint="f")
    record = store.mark_running(cfg.run_id, cfg.to_dict(), "BitFit")
    assert store.status(cfg.run_id) == RUNNING and not store.is_finished(cfg.run_id)
    record.update(status=FINISHED, metrics={"test_auc": 91.0, "val_auc": math.nan})
    store.save(record)
    other = RunConfig(method="lora", dataset="d", dataset_fingerprint="f")
    store.save({"run_id": other.run_id, "status": FAILED, "config": other.to_dict(), "error": "boom"})
    rows = store.rows()
    assert [r["status"] for r in rows] == [FINISHED, FAILED]
    assert rows[0]["val_auc"] is None  # NaN is stored as null
    (tmp_path / "runs.jsonl").unlink()
    assert store.collect() == 2 and len(store.table()) == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_auc_binary_multiclass_and_missing_class() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    assert auc_percent(labels, probs) == (100.0, None)
    three = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]])
    auc, note = auc_percent(np.array([0, 1, 2, 0]), three)
    assert auc == pytest.approx(100.0) and note is None
    auc, note = auc_percent(np.array([0, 1, 1, 0]), three)
    assert math.isfinite(auc) and "classes [2] absent" in note
    auc, note = auc_percent(np.array([1, 1, 1, 1]), three)
    assert math.isnan(auc) and "only class" in note
    metrics = classification_metrics(np.array([0, 1, 2, 0]), three)
    assert metrics["acc"] == 100.0


def test_mean_std_and_cosine() -> None:
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert cosine_factor(0, 10, 2) == 1.0
    assert cosine_factor(10, 10, 2) == pytest.approx(0.5)
    assert cosine_factor(20, 10, 2) == pytest.approx(0.0)


def test_every_subpackage_is_packaged() -> None:
    """A normal (non-editable) install ships every petlbench sub-package listed in pyproject.toml."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"petlbench", "petlbench.methods"}
    found |= {f"petlbench.{p.parent.name}" for p in (root / "petlbench").glob("*/__init__.py")}
    found |= {f"petlbench.datasets.{p.name}" for p in (root / "datasets").iterdir() if list(p.glob("*.yaml"))}
    assert found == listed


class _DenormalProbeModel(BackboneClassifier):
    """Records, at every forward, whether the CPU reads a denormal float as zero."""

    flushed: list[bool]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.flushed.append((torch.tensor([1e-39]) * 1.0).item() == 0.0)
        return super().forward(batch)


class _DenormalProbe(Method):
    key = "denormal_probe"
    display_name = "Denormal probe"
    model: _DenormalProbeModel | None = None

    def build(self, ctx: BuildContext) -> _DenormalProbeModel:
        model = _DenormalProbeModel(create_backbone(ctx.backbone, ctx.res, ctx.num_classes))
        model.flushed = []
        type(self).model = model
        return model


def test_denormals_are_flushed_inside_the_training_loop(tmp_path) -> None:
    """Training steps and evaluation run with denormals flushed, whatever the caller's setting."""
    torch.set_flush_denormal(False)
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # this CPU keeps denormals unless told otherwise
    resolved = resolve(
        RunRequest(
            methods="linear_probe", backbone="test_vit", res=32, epochs=1, batch_size=4, results=tmp_path, profile=False
        )
    )
    probe = register_method(_DenormalProbe)()
    cfg = dataclasses.replace(resolved.configs[0][1], method=probe.key)
    resolved.configs = [(probe, cfg)]
    try:
        (record,) = execute(resolved, ResultStore(tmp_path))
    finally:
        torch.set_flush_denormal(False)
        METHODS.unregister(probe.key)
    assert record["status"] == FINISHED, record.get("error")
    assert _DenormalProbe.model is not None and len(_DenormalProbe.model.flushed) > 2
    assert all(_DenormalProbe.model.flushed)


def test_cpu_and_cuda_out_of_memory_are_both_oom() -> None:
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.slow
def test_history_and_predictions_say_what_was_used(tmp_path) -> None:
    """History: the lr of each epoch's steps and the task loss without AdaLoRA's regulariser; predictions: every
    test image's probabilities, from which the stored AUC is recomputed."""
    request = RunRequest(methods="adalora", backbone="test_vit", res=32, epochs=2, batch_size=4, results=tmp_path)
    resolved = resolve(request)
    (record,) = execute(resolved, ResultStore(tmp_path))
    assert record["status"] == FINISHED, record.get("error")
    first, second = record["history"]
    lr = resolved.configs[0][1].lr
    assert first["lr"] == pytest.approx(lr) and first["lr_last"] < lr and second["lr"] < first["lr"]
    assert first["train_regulariser"] is not None and first["train_regulariser"] > 0
    test = record["predictions"]["test"]
    n_test = len(resolved.source.split("test"))
    assert len(test["probs"]) == len(test["labels"]) == len(set(test["sample_ids"])) == n_test
    assert np.allclose(np.sum(test["probs"], axis=1), 1.0, atol=1e-4)
    recomputed = classification_metrics(np.array(test["labels"]), np.array(test["probs"]))
    assert recomputed["auc"] == pytest.approx(record["metrics"]["test_auc"], abs=1e-3)
    assert len(record["predictions"]["val"]["probs"]) == len(resolved.source.split("val"))


def test_run_ids_change_exactly_when_results_can() -> None:
    """A field added for a knob that does not change results at its default keeps stored ids valid (pos_interp); a
    change of what training computes gives every run a new id: the first release's id for this configuration was
    lora-5d788a617603, computed with augmentation drawn from the global random stream."""
    cfg = RunConfig(method="lora", dataset="d", dataset_fingerprint="f")
    assert cfg.run_id != "lora-5d788a617603"
    assert dataclasses.replace(cfg, augmentation="global-stream").run_id == "lora-5d788a617603"
    assert dataclasses.replace(cfg, pos_interp="official").run_id != cfg.run_id
    assert dataclasses.replace(cfg, preset="paper", weights_path="/w.pt", num_workers=3).run_id == cfg.run_id


@pytest.mark.slow
def test_worker_count_changes_nothing(tmp_path) -> None:
    """`--workers 0` and `--workers 2` train on the same augmented images in the same order: identical results."""
    records = []
    for workers in (0, 2):
        request = RunRequest(
            methods="lora", backbone="test_vit", res=32, epochs=2, batch_size=4, workers=workers,
            results=tmp_path / f"w{workers}",
        )  # fmt: skip
        (record,) = execute(resolve(request), ResultStore(tmp_path / f"w{workers}"))
        assert record["status"] == FINISHED, record.get("error")
        records.append(record)
    zero, two = records
    assert zero["run_id"] == two["run_id"]
    assert [h["train_loss"] for h in zero["history"]] == [h["train_loss"] for h in two["history"]]
    assert zero["metrics"]["test_auc"] == two["metrics"]["test_auc"]
    assert zero["predictions"] == two["predictions"]


def test_filtered_stderr_drops_known_native_noise_and_keeps_the_rest(capfd: pytest.CaptureFixture[str]) -> None:
    import os

    from petlbench.core.native_output import filtered_stderr

    noise = (
        "USDT:2026-12-07 14:43:23 6674:6674 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
        "ERROR:2026-12-07 14:43:23 6674:6674 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n"
    )
    with filtered_stderr():
        os.write(2, noise.encode())
        os.write(2, b"ERROR: a real failure the user must see\n")
    assert capfd.readouterr().err == "ERROR: a real failure the user must see\n"
    with pytest.raises(RuntimeError, match="boom"), filtered_stderr():  # fd 2 comes back on error too
        os.write(2, b"written before the error\n")
        raise RuntimeError("boom")
    os.write(2, b"after the block\n")
    assert capfd.readouterr().err == "written before the error\nafter the block\n"


def test_torch_profiler_leaves_nothing_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    from petlbench.profiling.memory_cuda import cpu_profiler_peak

    capfd.readouterr()
    peak = cpu_profiler_peak(lambda: torch.ones(1000) + 1)
    assert peak["peak_bytes"] >= 4000
    assert capfd.readouterr().err == ""
