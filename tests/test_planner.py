"""The planner (`petlbench plan`): answers equal exhaustive scans of exact estimates, the memory model fits exact
estimates it did not see, the memory kind is chosen as documented, outputs carry their fields, and the estimator's
memoisation changes no result."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import petlbench.profiling.memory_estimate as memory_estimate
from petlbench.core.method import BackboneSpec
from petlbench.profiling import allocator, planner
from petlbench.profiling.memory_estimate import MIB, estimate_training_memory
from petlbench.profiling.planner import (
    KIND_FIELDS,
    PolyFit,
    backbone_geometry,
    exact_estimate,
    largest_fitting,
    memory_mb,
    plan_for,
    plan_markdown,
    plan_methods,
    select_memory_kind,
    token_feature,
)
from petlbench.profiling.profile import make_method, memory_sweep
from petlbench.reports.plan_figure import write_plan

torch.set_num_threads(1)
TINY = BackboneSpec("test_vit")
PATCH = 16
MAX_RES = 192  # exhaustive scans: every multiple of the patch size up to here ...
MAX_BATCH = 16  # ... and every batch size up to here
BATCH, RES = 4, 128  # the plan's fixed batch size (resolution search) and resolution (batch-size search)


def _scan_res(key: str, kind: str, gpu: str | None = None) -> dict[int, float]:
    method = make_method(key)
    return {r: memory_mb(exact_estimate(method, TINY, r, BATCH), kind, gpu) for r in range(PATCH, MAX_RES + 1, PATCH)}


def _scan_batch(key: str, kind: str, gpu: str | None = None) -> dict[int, float]:
    method = make_method(key)
    return {b: memory_mb(exact_estimate(method, TINY, RES, b), kind, gpu) for b in range(1, MAX_BATCH + 1)}


def _exhaustive(scan: dict[int, float], budget_mb: float) -> int | None:
    return max((x for x, mem in scan.items() if mem <= budget_mb), default=None)


def _budgets(*scans: dict[int, float]) -> list[float]:
    """Budgets (MiB) whose boundaries fall inside the scanned ranges, between neighbouring values and on them."""
    values = sorted({v for scan in scans for v in scan.values()})
    picks = [values[int(q * (len(values) - 1))] for q in (0.15, 0.4, 0.65, 0.9)]
    between = [(a + b) / 2 for a, b in zip(values[3::7], values[4::7], strict=False)]
    return sorted({*picks, *between, values[0] / 2, values[-1] * 2})


# ----------------------------------------------------------------------------------------- exact answers
@pytest.mark.parametrize("key", ["full_ft", "lora", "fpt_plus"])
@pytest.mark.parametrize("kind", ["reserved", "allocated"])
def test_planner_equals_exhaustive_search(key: str, kind: str) -> None:
    by_res, by_batch = _scan_res(key, kind), _scan_batch(key, kind)
    for budget_mb in _budgets(by_res, by_batch):
        budget = math.ceil(budget_mb * MIB)
        plan = plan_for(
            key,
            TINY,
            budget,
            batch_size=BATCH,
            res=RES,
            max_res=MAX_RES,
            max_batch=MAX_BATCH,
            kind=kind,
            throughput=False,
        )
        expected = (_exhaustive(by_res, budget / MIB), _exhaustive(by_batch, budget / MIB))
        assert (plan.max_res, plan.max_batch) == expected, (budget_mb, plan.to_dict()["search"])
        assert plan.memory_kind == kind
        assert plan.res_plan is not None and plan.res_plan.capped == (plan.max_res == MAX_RES)
        if plan.max_res is not None:
            assert plan.res_plan.mem_mb == by_res[plan.max_res] <= budget / MIB
        if plan.max_res is not None and plan.max_res < MAX_RES:
            assert plan.res_plan.next_mem_mb == by_res[plan.max_res + PATCH] > budget / MIB


@pytest.mark.parametrize("key", ["full_ft", "lora", "fpt_plus"])
def test_single_axis_plans_equal_exhaustive_search(key: str) -> None:
    """One axis alone, as `run --res auto` / `run --batch-size auto` ask for it (the batch search then starts from
    the default batch size, 16). Allocated memory is nondecreasing: the answers equal exhaustive scans. Reserved
    memory at this tiny scale is not (the simulated allocator changes regime as tensors cross its 1 MiB and 10 MiB
    thresholds, and can need less memory for a larger batch): the answers are exact boundaries (the answer fits,
    the step past it does not)."""
    by_res, by_batch = _scan_res(key, "allocated"), _scan_batch(key, "allocated")
    for budget_mb in _budgets(by_res, by_batch):
        budget = math.ceil(budget_mb * MIB)
        res_only = plan_for(key, TINY, budget, batch_size=BATCH, max_res=MAX_RES, kind="allocated", throughput=False)
        batch_only = plan_for(key, TINY, budget, res=RES, max_batch=MAX_BATCH, kind="allocated", throughput=False)
        assert (res_only.max_res, res_only.batch_plan) == (_exhaustive(by_res, budget / MIB), None)
        assert (batch_only.max_batch, batch_only.res_plan) == (_exhaustive(by_batch, budget / MIB), None)
    by_batch = _scan_batch(key, "reserved")
    for budget_mb in _budgets(by_batch):
        found = plan_for(
            key, TINY, math.ceil(budget_mb * MIB), res=RES, max_batch=MAX_BATCH, throughput=False
        ).max_batch
        if found is not None:
            assert by_batch[found] <= budget_mb and (found == MAX_BATCH or by_batch[found + 1] > budget_mb)
        else:
            assert by_batch[1] > budget_mb


def test_nothing_fits_is_null_everywhere(tmp_path: Path) -> None:
    plan = plan_for("full_ft", TINY, 2**20, batch_size=BATCH, res=RES, max_res=MAX_RES, max_batch=MAX_BATCH)
    assert plan.max_res is None and plan.max_batch is None
    record = plan.to_dict()
    assert record["max_res"] is None and record["max_batch"] is None
    assert record["max_res_mem_mb"] is None and record["throughput"] == {}
    assert "none fits" in plan_markdown([plan])
    # the smallest resolution and batch size were estimated and did not fit
    assert [PATCH, 1] == [min(x for x, _ in record["search"][axis]["exact_probes"]) for axis in ("res", "batch_size")]


def test_search_limit_that_fits_is_reported_as_capped() -> None:
    plan = plan_for("linear_probe", TINY, "1GB", batch_size=BATCH, res=RES, max_res=MAX_RES, max_batch=MAX_BATCH)
    assert (plan.max_res, plan.max_batch) == (MAX_RES, MAX_BATCH)
    assert plan.to_dict()["max_res_capped"] is True and plan.to_dict()["max_batch_capped"] is True
    assert "search limit" in plan_markdown([plan])


# ----------------------------------------------------------------------------------------- the search itself
def _exhaustive_fn(fn: Callable[[int], float], n: int, budget: float) -> int | None:
    return max((i for i in range(1, n + 1) if fn(i) <= budget), default=None)


@pytest.mark.parametrize(
    "name, fn, degree",
    [
        ("quadratic in tokens", lambda k: 300.0 + 2.0 * (k * k + 1) + 0.01 * (k * k + 1) ** 2, 2),
        ("linear in batch", lambda b: 1200.0 + 37.5 * b, 1),
        ("stepped (allocator granularity)", lambda k: 20.0 * math.ceil((50.0 + 3.0 * k * k) / 20.0), 2),
        ("isolated spikes", lambda k: 100.0 + 5.0 * k * k + (400.0 if k in (17, 29, 41) else 0.0), 2),
    ],
)
def test_largest_fitting_equals_exhaustive_on_known_functions(
    name: str, fn: Callable[[int], float], degree: int
) -> None:
    n = 64
    feature = token_feature(1) if degree == 2 else (lambda b: b)
    # the floor of a spiky function: its trend (what a point would need without its spike)
    trend: Callable[[int], float] = (lambda k: 100.0 + 5.0 * k * k) if name == "isolated spikes" else fn
    for budget in np.linspace(fn(1) * 0.9, fn(n) * 1.1, 97):
        calls: list[int] = []

        def evaluate(i: int, calls: list[int] = calls) -> float:
            calls.append(i)
            return fn(i)

        found = largest_fitting(evaluate, float(budget), n, feature, degree, seeds=[8], floor=trend)
        assert found.index == _exhaustive_fn(fn, n, float(budget)), (name, budget, calls)
        assert len(calls) == len(set(calls)) <= 12, (name, budget, calls)


def test_largest_fitting_confirms_the_answer_and_the_step_past_it() -> None:
    fn = lambda k: 10.0 + k * k  # noqa: E731
    found = largest_fitting(fn, 410.0, 100, token_feature(0), 2, seeds=[5])
    probed = {p.index: p.mem_mb for p in found.probes}
    assert found.index == 20 and probed[20] <= 410.0 < probed[21]
    assert len(found.probes) <= 5


# ----------------------------------------------------------------------------------------- the memory model
@pytest.mark.parametrize("key", ["full_ft", "lora", "vpt", "linear_probe"])
def test_polynomial_fit_is_within_one_percent_at_unseen_points(key: str) -> None:
    method = make_method(key)
    by_res = {r // PATCH: exact_estimate(method, TINY, r, 8).peak_bytes / MIB for r in range(64, 321, 32)}
    seen = (4, 12, 20)  # 64, 192 and 320 px
    fit = PolyFit(token_feature(backbone_geometry(TINY.name)[1]), [(k, by_res[k]) for k in seen], 2)
    errors = [abs(float(fit(k)) / mem - 1) for k, mem in by_res.items() if k not in seen]
    assert len(errors) >= 5 and max(errors) < 0.01, errors
    by_batch = {b: exact_estimate(method, TINY, 128, b).peak_bytes / MIB for b in (2, 3, 5, 8, 13, 21, 32)}
    line = PolyFit(lambda b: b, [(2, by_batch[2]), (8, by_batch[8])], 1)
    errors = [abs(float(line(b)) / mem - 1) for b, mem in by_batch.items() if b not in (2, 8)]
    assert max(errors) < 0.01, errors


def test_plans_report_the_fit_error_at_points_they_did_not_fit() -> None:
    plan = plan_for("full_ft", TINY, 40 * MIB, batch_size=8, res=RES, max_res=512, max_batch=64, kind="allocated")
    record = plan.to_dict()["search"]
    for axis in ("res", "batch_size"):
        assert record[axis]["max_rel_error_unseen"] is None or record[axis]["max_rel_error_unseen"] < 0.05


# ----------------------------------------------------------------------------------------- memory kinds
def test_memory_kind_selection_prefers_device_then_reserved_then_allocated() -> None:
    base = {"est_peak_mem_mb": 10.0, "est_reserved_mem_mb": 12.0, "est_device_mem_mb": 512.0}
    assert select_memory_kind(base) == "device"
    assert select_memory_kind(base | {"est_device_mem_mb": None}) == "reserved"
    assert select_memory_kind(base | {"est_device_mem_mb": None, "est_reserved_mem_mb": None}) == "allocated"
    assert KIND_FIELDS == {
        "device": "est_device_mem_mb",
        "reserved": "est_reserved_mem_mb",
        "allocated": "est_peak_mem_mb",
    }


def test_plan_uses_reserved_memory_without_a_measured_context() -> None:
    plan = plan_for("lora", TINY, 30 * MIB, batch_size=BATCH, res=RES, max_res=MAX_RES, max_batch=MAX_BATCH)
    assert plan.memory_kind == "reserved" and "CUDA context" in plan.memory_kind_reason
    assert plan.max_res == _exhaustive(_scan_res("lora", "reserved"), 30.0)


def test_plan_uses_device_memory_when_the_context_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(allocator.CUDA_CONTEXT_MB, "Test GPU", 8.0)
    plan = plan_for(
        "lora", TINY, 30 * MIB, batch_size=BATCH, res=RES, max_res=MAX_RES, max_batch=MAX_BATCH, gpu="Test GPU"
    )
    assert plan.memory_kind == "device" and plan.to_dict()["memory_field"] == "est_device_mem_mb"
    by_res, by_batch = _scan_res("lora", "device", "Test GPU"), _scan_batch("lora", "device", "Test GPU")
    assert (plan.max_res, plan.max_batch) == (_exhaustive(by_res, 30.0), _exhaustive(by_batch, 30.0))
    # the context counts: device memory = reserved + 8 MiB, so less fits than with reserved memory
    reserved = plan_for("lora", TINY, 30 * MIB, batch_size=BATCH, res=RES, max_res=MAX_RES, max_batch=MAX_BATCH)
    assert plan.max_res is not None and reserved.max_res is not None and plan.max_res <= reserved.max_res
    with pytest.raises(ValueError, match="device"):
        plan_for("lora", TINY, 30 * MIB, batch_size=BATCH, max_res=MAX_RES, kind="device")  # no GPU named


# ----------------------------------------------------------------------------------------- outputs
def _cli(args: list[str]) -> object:
    from petlbench.cli.plan import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:
        """Test app."""

    return CliRunner().invoke(app, ["plan", *args])


def test_cli_json_has_the_documented_fields_and_writes_the_figure(tmp_path: Path) -> None:
    result = _cli(
        [
            "--gpu-mem",
            "24MB",
            "--backbone",
            "test_vit",
            "--methods",
            "full_ft,fpt_plus",
            "--batch-size",
            str(BATCH),
            "--res",
            str(RES),
            "--max-res",
            str(MAX_RES),
            "--max-batch",
            str(MAX_BATCH),
            "--jobs",
            "1",
            "--json",
            "--out",
            str(tmp_path),
        ]
    )
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    rows = json.loads(result.stdout)  # type: ignore[attr-defined]
    assert [r["method"] for r in rows] == ["full_ft", "fpt_plus"]
    for row in rows:
        for name in ("method", "max_res", "max_batch", "memory_kind", "batch_size", "res", "gpu_mem_bytes"):
            assert name in row
        assert row["memory_kind"] == "reserved" and row["memory_field"] == "est_reserved_mem_mb"
        assert row["max_res"] % PATCH == 0 and row["batch_size"] == BATCH and row["res"] == RES
        for point in row["throughput"].values():
            assert point["kind"] == "train_gflops_per_image" and point["value"] > 0 and "FLOPs" in point["label"]
    assert rows[1]["max_res"] > rows[0]["max_res"]  # FPT+ fits larger images than full fine-tuning
    stem = "plan_test_vit_24MiB_b4_r128"
    for suffix in (".md", ".json", ".png", ".pdf"):
        assert (tmp_path / f"{stem}{suffix}").stat().st_size > 0
    assert json.loads((tmp_path / f"{stem}.json").read_text()) == rows
    table = (tmp_path / f"{stem}.md").read_text()
    assert "reserved memory" in table and "GFLOPs" in table and "| Full fine-tuning |" in table


def test_cli_rejects_a_resolution_off_the_patch_grid(tmp_path: Path) -> None:
    result = _cli(["--gpu-mem", "1GB", "--backbone", "test_vit", "--methods", "lora", "--res", "100"])
    assert result.exit_code == 2 and "patch size" in result.output  # type: ignore[attr-defined]


def test_throughput_is_predicted_from_a_measured_reference(tmp_path: Path) -> None:
    reference = {
        "schema": "petlbench-validate/1",
        "device": {"name": "Test GPU", "slug": "test-gpu"},
        "config": {"backbone": "test_vit", "res": RES, "batch_size": 2},
        "checks": {"throughput": {"train": {"lora": {"train_images_per_s": 250.0}}}},
    }
    (tmp_path / "test-gpu.json").write_text(json.dumps(reference))
    plan = plan_for(
        "lora", TINY, "1GB", batch_size=BATCH, res=RES, max_res=MAX_RES, max_batch=MAX_BATCH, gpu="Test GPU",
        reference_dir=tmp_path,
    )  # fmt: skip
    at_batch, at_res = plan.throughput["at_max_batch"], plan.throughput["at_max_res"]
    assert at_batch["kind"] == at_res["kind"] == "predicted_train_images_per_s"
    # same resolution as the reference: FLOPs per image are the same, so is the predicted rate
    assert at_batch["value"] == pytest.approx(250.0) and "test-gpu.json" in at_batch["label"]
    assert at_res["value"] < 250.0  # larger images, more FLOPs per image
    other = plan_for("lora", TINY, "1GB", batch_size=BATCH, res=RES, max_res=MAX_RES, max_batch=MAX_BATCH)
    assert other.throughput["at_max_batch"]["kind"] == "train_gflops_per_image"  # no GPU named: FLOPs


def test_worker_processes_give_the_same_plans_and_a_failing_method_gives_an_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dict(batch_size=BATCH, res=RES, max_res=MAX_RES, max_batch=MAX_BATCH)
    serial = plan_methods("lora,fpt_plus", TINY, 20 * MIB, **settings)  # type: ignore[arg-type]
    forked = plan_methods("lora,fpt_plus", TINY, 20 * MIB, jobs=2, **settings)  # type: ignore[arg-type]
    assert [p.to_dict()["search"] for p in forked] == [p.to_dict()["search"] for p in serial]
    assert [(p.max_res, p.max_batch) for p in forked] == [(p.max_res, p.max_batch) for p in serial]

    real = planner.plan_for

    def flaky(key: str, *args: object, **kwargs: object) -> object:
        if key == "lora":
            raise RuntimeError("cannot build")
        return real(key, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(planner, "plan_for", flaky)
    plans = plan_methods("lora,fpt_plus", TINY, 20 * MIB, **settings)  # type: ignore[arg-type]
    assert plans[0].error == "RuntimeError: cannot build" and plans[0].max_res is None
    assert plans[1].error is None and plans[1].max_res == serial[1].max_res
    paths = write_plan(plans, tmp_path)
    assert all(path.stat().st_size > 0 for path in paths) and len(paths) == 4
    assert "cannot build" in paths[0].read_text() and json.loads(paths[1].read_text())[0]["memory_kind"] == "n/a"


# ----------------------------------------------------------------------------------------- memoisation
def test_exact_estimates_are_memoised_and_identical_to_the_estimator() -> None:
    method = make_method("adalora")
    first = exact_estimate(method, TINY, 96, 3)
    assert exact_estimate(make_method("adalora"), TINY, 96, 3) is first
    fresh = estimate_training_memory(method, TINY, 96, 3)
    assert (first.peak_bytes, first.reserved_peak_bytes, first.breakdown_bytes, first.peak_phase) == (
        fresh.peak_bytes,
        fresh.reserved_peak_bytes,
        fresh.breakdown_bytes,
        fresh.peak_phase,
    )
    counted = exact_estimate(method, TINY, 96, 3, flops=True)
    assert counted.train_flops is not None and counted.peak_bytes == first.peak_bytes


@pytest.mark.parametrize("key", ["full_ft", "adalora", "fpt"])
def test_meta_op_memo_changes_no_estimate(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def record(**kwargs: object) -> dict[str, object]:
        est = estimate_training_memory(make_method(key), TINY, 80, 3, count_flops=True, **kwargs)  # type: ignore[arg-type]
        out = est.to_dict()
        out.pop("est_seconds")
        return out | {"flops": est.train_flops, "start": est.step_start_bytes}

    memory_estimate.clear_memos()
    cold, warm = record(), record()  # the second runs on templates only
    explicit = record(attention="explicit")
    monkeypatch.setattr(memory_estimate, "_memo_meta_call", lambda func, args, kwargs: func(*args, **kwargs))
    assert cold == warm == record()
    assert explicit == record(attention="explicit")


def test_memory_sweep_values_are_exact_estimates() -> None:
    rows = memory_sweep("lora", TINY, [64, 96], 2, gpu_mem_bytes="48GB")
    for row in rows:
        fresh = estimate_training_memory(make_method("lora"), TINY, row["res"], 2)
        assert row["est_peak_mem_mb"] == fresh.peak_bytes / MIB and row["exceeds_budget"] is False
    assert (
        memory_sweep("lora", TINY, [64, 96], 2, gpu_mem_bytes="48GB")[0]["est_peak_mem_mb"]
        == rows[0]["est_peak_mem_mb"]
    )


# ----------------------------------------------------------------------------------------- run --res/--batch-size auto
def _auto_request(tmp_path: Path, **sizes: object) -> object:
    from petlbench.engine.runner import RunRequest

    base = {"methods": "lora,fpt_plus", "results": tmp_path, "backbone": "test_vit", "epochs": 1, "device": "cpu"}
    return RunRequest(**{**base, **sizes})  # type: ignore[arg-type]


@pytest.mark.parametrize("axis", ["res", "batch_size"])
def test_run_auto_sizes_are_the_planners_answers_and_keep_the_run_id(tmp_path: Path, axis: str) -> None:
    """`run --res auto` / `--batch-size auto`: every method gets what `plan_for` answers for it at the run's other
    size; the choice is stored with the run, and the run id is the one of the same sizes given explicitly."""
    from petlbench.engine.runner import resolve

    budget = "96MB"
    sizes = {"res": "auto", "batch_size": BATCH} if axis == "res" else {"res": RES, "batch_size": "auto"}
    resolved = resolve(_auto_request(tmp_path, **sizes), log=lambda _: None, size_planner=planner.size_planner(budget))  # type: ignore[arg-type]
    assert [cfg.method for _, cfg in resolved.configs] == ["lora", "fpt_plus"]
    for method, cfg in resolved.configs:
        plan = plan_for(
            method, TINY, budget, num_classes=resolved.source.num_classes, throughput=False, **sizes_for(axis)
        )
        expected = (plan.max_res, BATCH) if axis == "res" else (RES, plan.max_batch)
        assert (cfg.res, cfg.batch_size) == expected and None not in expected
        assert cfg.size_plan.startswith(f"--{axis.replace('_', '-')} auto = ") and "96 MiB" in cfg.size_plan
        explicit = resolve(
            _auto_request(tmp_path, methods=cfg.method, res=cfg.res, batch_size=cfg.batch_size),
            log=lambda _: None,  # type: ignore[arg-type]
        )
        assert explicit.configs[0][1].run_id == cfg.run_id and explicit.configs[0][1].size_plan == ""
        assert any(note.startswith(f"{cfg.method}: --") for note in resolved.notes)


def sizes_for(axis: str) -> dict[str, int]:
    """The fixed size of a single-axis plan."""
    return {"batch_size": BATCH} if axis == "res" else {"res": RES}


@pytest.mark.parametrize(
    ("sizes", "gpu_mem", "message"),
    [
        ({"res": "auto", "batch_size": "auto"}, "1GB", "fix one of them"),
        ({"res": "big"}, "1GB", "give a positive integer or 'auto'"),
        ({"res": "auto"}, None, "no GPU budget: the run trains on cpu; give --gpu-mem"),
        ({"res": "auto", "batch_size": BATCH}, "1MB", "nothing fits 1 MiB"),
        ({"res": RES, "batch_size": "auto"}, "0GB", "--gpu-mem '0GB': give a positive size"),
    ],
)
def test_run_auto_sizes_refuse_what_they_cannot_answer(
    tmp_path: Path, sizes: dict[str, object], gpu_mem: str | None, message: str
) -> None:
    from petlbench.engine.runner import RunRequestError, resolve

    with pytest.raises(RunRequestError, match=message.replace("(", r"\(")):
        resolve(_auto_request(tmp_path, **sizes), log=lambda _: None, size_planner=planner.size_planner(gpu_mem))  # type: ignore[arg-type]


def test_run_cli_auto_without_budget_on_cpu_exits_2_before_any_work(tmp_path: Path) -> None:
    from petlbench.cli import app

    result = CliRunner().invoke(
        app,
        [
            "run",
            "--methods",
            "lora",
            "--backbone",
            "test_vit",
            "--res",
            "auto",
            "--device",
            "cpu",
            "--results",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "--res auto for lora: no GPU budget" in result.output
    assert not list(tmp_path.glob("*/result.json"))


def test_memory_sweep_in_worker_processes_gives_the_same_rows() -> None:
    def values(jobs: int) -> list[dict[str, object]]:
        rows = memory_sweep(["lora", "fpt_plus"], TINY, [32, 64], 2, gpu_mem_bytes="4MB", jobs=jobs)
        return [{k: v for k, v in row.items() if k != "est_seconds"} for row in rows]

    forked = values(2)
    assert [(r["method"], r["res"]) for r in forked] == [("lora", 32), ("lora", 64), ("fpt_plus", 32), ("fpt_plus", 64)]
    assert forked == values(1)
