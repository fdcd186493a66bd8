"""Orchestration: per-method efficiency profiles, memory-vs-resolution sweeps, the trainer's per-run
efficiency record and the CPU benchmark (`petlbench bench`).

Units in every record: memory in MiB (2^20 bytes, fields `*_mb`), FLOPs in GFLOPs per image with one
fused multiply-add = one FLOP (`flops_unit`), throughput in images/s, power in W, energy in J.
Estimated fields start with `est_`; measured fields start with `measured_`, `nvml_` or `train_images_`;
unavailable measurements are None with a reason, never zeros.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petlbench.core.atomic import write_text_atomic
from petlbench.core.environment import resolve_device
from petlbench.core.method import (
    BackboneSpec,
    BuildContext,
    Method,
    OneOffWork,
    PetlModel,
    get_method,
    parse_method_keys,
)
from petlbench.engine.build import build_model
from petlbench.engine.step import TrainStep, make_optimizer
from petlbench.profiling.flops import (
    FLOPS_RULE,
    FLOPS_UNIT,
    NO_ATTENTION_RULE,
    attention_macs,
    fvcore_forward,
    to_gflops_per_image,
    torch_forward,
)
from petlbench.profiling.memory_estimate import (
    KIND_FIELDS,
    MIB,
    estimate_model_memory,
    estimate_training_memory,
    select_memory_kind,
)
from petlbench.profiling.models import (
    BatchSpec,
    batch_spec,
    build_meta,
    make_context,
    materialize_cpu,
    meta_clone,
    resident_tensor_ids,
    structure_signature,
)

BENCH_FILES = ("bench.md", "bench.json")  # what `run_bench` writes in its output folder
ATTN_IMPL = {"fused": "sdpa", "explicit": "eager", "mixed": "mixed", "none": "none"}
_FWD_MEMO: dict[tuple[Any, ...], dict[str, Any]] = {}


# ----------------------------------------------------------------------------------------- helpers
def make_method(key: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> Method:
    """Method `key` with its `--opt` overrides from `options[key]`."""
    return get_method(key).from_overrides(dict((options or {}).get(key, {})))


def parse_mem(text: str | int | float | None) -> int | None:
    """Bytes from "48GB", "48GiB", "80 GB", "24576MB" or a number (GB = GiB = 2^30: GPU sizes are binary)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"memory size {text!r}: use e.g. 48GB, 80GiB or 24576MB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


class _OneOffAdapter(nn.Module):
    """`batch[view]` -> the one-off module's outputs as a tuple (fvcore traces tuple outputs)."""

    def __init__(self, work: OneOffWork) -> None:
        super().__init__()
        self.module = work.module
        self.view = work.view

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.module(batch[self.view])
        if isinstance(out, dict):
            return tuple(out[k] for k in sorted(out))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _forward_counts(model: PetlModel, spec1: BatchSpec) -> dict[str, Any]:
    """fvcore (+handles) and FlopCounterMode forward counts of a meta model at batch 1; consumes `model`."""
    torch_fwd = torch_forward(model, spec1.materialize("meta"))
    materialize_cpu(model)
    fv = fvcore_forward(model, spec1.materialize("cpu"))
    out: dict[str, Any] = {
        "fwd_gflops": to_gflops_per_image(fv["total"], 1),
        "torch_fwd_gflops": to_gflops_per_image(torch_fwd / 2, 1),
        "flops_by_operator": {k: to_gflops_per_image(v, 1) for k, v in sorted(fv["by_operator"].items())},
        "flops_skipped_ops": sorted(fv["skipped_ops"]),
        "flops_counter": "fvcore + petlbench handles (attention counted)",
        "fwd_gflops_no_attention": to_gflops_per_image(fv["total"] - attention_macs(fv["by_operator"]), 1),
        "flops_no_attention_rule": NO_ATTENTION_RULE,
    }
    work = model.one_off_work()
    if work is not None:
        images = {work.view: torch.zeros(1, 3, work.size, work.size)}
        one_off = fvcore_forward(_OneOffAdapter(work), images)
        out["preload_gflops_per_image"] = to_gflops_per_image(one_off["total"], 1)
        out["preload_gflops_per_image_no_attention"] = to_gflops_per_image(
            one_off["total"] - attention_macs(one_off["by_operator"]), 1
        )
    return out


def forward_flops(
    method: Method, backbone: BackboneSpec, res: int, num_classes: int = 5, attention: str = "auto"
) -> dict[str, Any]:
    """Forward GFLOPs per image (fvcore + handles; FlopCounterMode cross-check), memoised on the model's
    structure. For a model with one-off work once its data is prepared (FPT/FPT+ preloading: the LPM's
    feature-extraction forward), also that cost per image (`preload_gflops_per_image`)."""
    ctx = make_context(backbone, res, num_classes, attention)
    model, _ = build_meta(method, ctx)
    spec1 = batch_spec(model, method, res, 1, num_classes)
    key = structure_signature(model, spec1, method.resolved_options())
    if key not in _FWD_MEMO:
        _FWD_MEMO[key] = _forward_counts(model, spec1)
    return dict(_FWD_MEMO[key])


def _flops_fields(fwd: dict[str, Any], train_flops: dict[str, int] | None) -> dict[str, Any]:
    out = {k: v for k, v in fwd.items()}
    out["flops_unit"] = FLOPS_UNIT
    out["flops_rule"] = FLOPS_RULE
    if train_flops:
        batch = train_flops["batch_size"]
        out["bwd_gflops"] = to_gflops_per_image(train_flops["backward"] / 2, batch)
        out["train_step_gflops"] = fwd["fwd_gflops"] + out["bwd_gflops"]
        out["torch_train_step_gflops"] = to_gflops_per_image(train_flops["total"] / 2, batch)
    else:
        out["bwd_gflops"] = out["train_step_gflops"] = out["torch_train_step_gflops"] = None
    if fwd.get("preload_gflops_per_image") is not None:
        # Without preloading the LPM runs every step under no_grad: its forward is added, no backward.
        out["fwd_gflops_no_preload"] = fwd["fwd_gflops"] + fwd["preload_gflops_per_image"]
        if out["train_step_gflops"] is not None:
            out["train_step_gflops_no_preload"] = out["train_step_gflops"] + fwd["preload_gflops_per_image"]
    return out


def _params(method: Method, backbone: BackboneSpec, res: int, num_classes: int) -> dict[str, Any]:
    model, build = build_meta(method, make_context(backbone, res, num_classes))
    trainable, total = model.param_report()
    return {"trainable": trainable, "total": total, "ratio_pct": 100.0 * trainable / total, "param_build": build}


# ----------------------------------------------------------------------------------------- profile
def profile_methods(
    method_keys: str | Sequence[str],
    backbone: BackboneSpec,
    res: int,
    batch_size: int,
    num_classes: int = 5,
    measure: bool = False,
    device: str | torch.device = "auto",
    attention: str = "auto",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    target: str = "cuda",
    measure_steps: int = 3,
    measure_warmup: int = 2,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One efficiency record per method (see the module docstring for units).

    Always (no real memory, any machine): `method`, `name`, `trainable`, `total`, `ratio_pct`,
    `fwd_gflops`, `train_step_gflops`, `flops_unit`, `est_peak_mem_mb`, `est_breakdown_mb`, `attention`
    (+ `attn_impl`, FlopCounterMode cross-checks, estimator metadata). FPT/FPT+ with preloading add
    `preload_gflops_per_image`, `fwd_gflops_no_preload`, `train_step_gflops_no_preload` and
    `est_peak_mem_mb_no_preload`. With `measure`: a few real steps on `device`:
    `measured_peak_allocated_mb`, `measured_peak_reserved_mb`, `nvml_process_mem_mb`,
    `train_images_per_s`, `power` (None fields + reason off CUDA).
    """
    keys = parse_method_keys(method_keys)
    rows = []
    for key in keys:
        started = time.perf_counter()
        method = make_method(key, options)
        row: dict[str, Any] = {
            "method": key,
            "name": method.display_name,
            "backbone": backbone.name,
            "res": res,
            "batch_size": batch_size,
            "num_classes": num_classes,
            "options": method.resolved_options(),
        }
        row.update(_params(method, backbone, res, num_classes))
        est = estimate_training_memory(
            method, backbone, res, batch_size, num_classes, attention=attention, target=target, count_flops=True
        )
        row.update(est.to_dict())
        row["attn_impl"] = ATTN_IMPL.get(est.attention, est.attention)
        row.update(_flops_fields(forward_flops(method, backbone, res, num_classes, attention), est.train_flops))
        if row.get("preload_gflops_per_image") is not None:
            online = estimate_training_memory(
                method, backbone, res, batch_size, num_classes, attention=attention, target=target, prepared=False
            )
            row["est_peak_mem_mb_no_preload"] = online.peak_bytes / MIB
        if measure:
            row.update(
                measure_method(
                    method,
                    backbone,
                    res,
                    batch_size,
                    num_classes,
                    device,
                    attention,
                    steps=measure_steps,
                    warmup=measure_warmup,
                )
            )
        row["profile_seconds"] = time.perf_counter() - started
        if log is not None:
            log(f"{key}: {row['profile_seconds']:.1f}s")
        rows.append(row)
    return rows


def build_real(
    method: Method,
    backbone: BackboneSpec,
    res: int,
    batch_size: int,
    num_classes: int,
    device: torch.device,
    attention: str = "auto",
) -> tuple[PetlModel, dict[str, torch.Tensor], BatchSpec]:
    """A real (randomly initialised) model placed on `device` and one random batch on it, in the state a
    training run would have (FPT/FPT+ preloaded when their options say so)."""
    ctx = make_context(backbone, res, num_classes, attention, device=device)
    model = build_model(method, ctx)
    spec = batch_spec(model, method, res, batch_size, num_classes)  # switches FPT to preloaded mode
    model.place(device)
    batch = spec.materialize(device, random=True)
    return model, batch, spec


def measure_method(
    method: Method,
    backbone: BackboneSpec,
    res: int,
    batch_size: int,
    num_classes: int = 5,
    device: str | torch.device = "auto",
    attention: str = "auto",
    steps: int = 3,
    warmup: int = 2,
    train_step_fn: TrainStep | None = None,
) -> dict[str, Any]:
    """Real timed training steps of `method` on `device`: throughput, CUDA peaks, NVML memory, power."""
    from petlbench.profiling.timing import measure_steps as _measure

    device = resolve_device(device)
    model, batch, _ = build_real(method, backbone, res, batch_size, num_classes, device, attention)
    optimizer = make_optimizer(model.trainable_parameters())
    result = _measure(
        model, batch, optimizer, steps=steps, warmup=warmup, train_step_fn=train_step_fn, power=True, device=device
    )
    result["measure_device"] = str(device)
    result.pop("device", None)
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------- sweep
def memory_sweep(
    method_keys: str | Sequence[str],
    backbone: BackboneSpec,
    resolutions: Sequence[int],
    batch_size: int,
    gpu_mem_bytes: int | str | None = None,
    num_classes: int = 5,
    attention: str = "auto",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    target: str = "cuda",
    log: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Estimated training-step peak per method and resolution (fake-tensor replay, no real memory); with `jobs` > 1
    the methods are estimated in that many forked worker processes (the same exact values).

    Rows: `method`, `res`, `est_peak_mem_mb` (MiB), `exceeds_budget` (bool, None without a budget),
    `est_breakdown_mb`, `attention`, `est_peak_phase`, `batch_size`, `backbone`, `mem_unit`. A configuration
    that cannot be built (e.g. a resolution not divisible by the patch size) gives None + `error`. Every value is an
    exact estimate, memoised in this process with the planner's (`planner.exact_estimate`); the heap alive on entry
    is left out of garbage collection meanwhile (`planner.frozen_heap`).
    """
    from petlbench.profiling.planner import frozen_heap  # the planner imports this module
    from petlbench.profiling.workers import fork_map

    budget = parse_mem(gpu_mem_bytes)

    method_rows = functools.partial(
        _sweep_method,
        options=options,
        backbone=backbone,
        resolutions=[int(r) for r in resolutions],
        batch_size=batch_size,
        budget=budget,
        num_classes=num_classes,
        attention=attention,
        target=target,
    )
    rows = []
    with frozen_heap():  # frozen before forking, too: workers then share the frozen pages instead of copying them
        for cells in fork_map(method_rows, parse_method_keys(method_keys), jobs):
            for row in cells:
                if log is not None:
                    mem = row["est_peak_mem_mb"]
                    what = f"{mem:,.1f} MiB" if mem is not None else f"no estimate ({row.get('error')})"
                    log(f"{row['method']} @ {row['res']}px: {what} ({row['est_seconds']:.1f}s)")
                rows.append(row)
    return rows


def _sweep_method(
    key: str,
    *,
    options: Mapping[str, Mapping[str, Any]] | None,
    backbone: BackboneSpec,
    resolutions: list[int],
    batch_size: int,
    budget: int | None,
    num_classes: int,
    attention: str,
    target: str,
) -> list[dict[str, Any]]:
    """One method's row of the memory sweep (a module-level function: worker processes receive it pickled)."""
    method = make_method(key, options)
    return [
        _sweep_cell(key, method, backbone, res, batch_size, budget, num_classes, attention, target)
        for res in resolutions
    ]


def _sweep_cell(
    key: str,
    method: Method,
    backbone: BackboneSpec,
    res: int,
    batch_size: int,
    budget: int | None,
    num_classes: int,
    attention: str,
    target: str,
) -> dict[str, Any]:
    """One row of `memory_sweep`: the exact estimate of `method` at `res` (memoised), or None + `error`."""
    from petlbench.profiling.planner import exact_estimate

    started = time.perf_counter()
    row: dict[str, Any] = {"method": key, "res": res, "batch_size": batch_size, "backbone": backbone.name}
    try:
        est = exact_estimate(
            method, backbone, res, batch_size, num_classes=num_classes, attention=attention, target=target
        )
    except Exception as error:  # noqa: BLE001 - one bad cell must not stop the sweep
        row.update(
            {
                "est_peak_mem_mb": None,
                "exceeds_budget": None,
                "est_breakdown_mb": None,
                "error": f"{type(error).__name__}: {error}",
            }
        )
    else:
        d = est.to_dict()
        row.update(
            {
                "est_peak_mem_mb": d["est_peak_mem_mb"],
                "est_reserved_mem_mb": d["est_reserved_mem_mb"],
                "est_device_mem_mb": d["est_device_mem_mb"],
                "budget_memory_kind": select_memory_kind(d),
                "exceeds_budget": (None if budget is None else d[KIND_FIELDS[select_memory_kind(d)]] * MIB > budget),
                "est_breakdown_mb": d["est_breakdown_mb"],
                "attention": d["attention"],
                "est_peak_phase": d["est_peak_phase"],
                "batch_source": d["batch_source"],
                "mem_unit": d["mem_unit"],
            }
        )
    row["gpu_mem_mb"] = None if budget is None else budget / MIB
    row["est_seconds"] = time.perf_counter() - started
    return row


# ----------------------------------------------------------------------------------------- trainer
def run_efficiency(
    model: PetlModel,
    method: Method,
    ctx: BuildContext,
    batch_size: int,
    device: torch.device | str,
    *,
    target: str = "cuda",
    train_step_fn: TrainStep | None = None,
    flops: bool = True,
) -> dict[str, Any]:
    """Estimated peak memory and FLOPs of exactly this run's model and configuration (called once per run,
    after `prepare_data` and `place`). Works from a meta-device structural copy of `model`; the trainer's
    model is not touched. Keys: `est_peak_mem_mb`, `est_breakdown_mb`, `est_*` metadata, `attention`,
    `attn_impl`, `fwd_gflops`, `train_step_gflops`, `flops_unit` (+ `preload_gflops_per_image` for
    preloading FPT/FPT+), `efficiency_seconds`, and `efficiency_error` if something could not be computed.
    """
    started = time.perf_counter()
    out: dict[str, Any] = {"est_device": str(device)}

    def clone() -> tuple[PetlModel, str]:
        try:
            return meta_clone(model), "meta clone of the run's model"
        except Exception:  # noqa: BLE001 - fall back to a fresh meta build of the same configuration
            fresh, how = build_meta(method, ctx)
            return fresh, f"fresh build ({how})"

    try:
        est_model, how = clone()
        spec = batch_spec(est_model, method, ctx.res, batch_size, ctx.num_classes)
        resident, placement = resident_tensor_ids(est_model)
        est = estimate_model_memory(
            est_model,
            spec,
            attention="auto",
            target=target,
            count_flops=flops,
            train_step_fn=train_step_fn,
            resident=resident,
            placement=placement,
            build=how,
        )
        out.update(est.to_dict())
        out["attn_impl"] = ATTN_IMPL.get(est.attention, est.attention)
        if flops:
            fwd_model, _ = clone()
            spec1 = batch_spec(fwd_model, method, ctx.res, 1, ctx.num_classes)
            fwd = _forward_counts(fwd_model, spec1)
            out.update(_flops_fields(fwd, est.train_flops))
    except Exception as error:  # noqa: BLE001 - efficiency numbers must never fail a training run
        out["efficiency_error"] = f"{type(error).__name__}: {error}"
        out.setdefault("est_peak_mem_mb", None)
    out["efficiency_seconds"] = time.perf_counter() - started
    return out


# ----------------------------------------------------------------------------------------- bench
def run_bench(
    methods: str | Sequence[str] = "all",
    backbone: BackboneSpec | None = None,
    res: int = 224,
    batch_size: int = 8,
    num_classes: int = 5,
    steps: int = 3,
    warmup: int = 1,
    out: str | Path = "reports",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    log: Callable[[str], None] | None = None,
    bench_threads: int = 1,
) -> dict[str, Any]:
    """Efficiency comparison on this machine (CPU): ratios of every method to full fine-tuning.

    Per method: estimated peak (CUDA target, what a GPU run would allocate), measured CPU peak of one
    steady-state step (the CPU allocator's profiler events, single thread) next to the estimator's CPU-target
    prediction of the same quantity, train-step and forward GFLOPs, and real step throughput measured in
    this process. Writes the Markdown table and the rows to `out`/bench.md and bench.json. Runs with `bench_threads`
    intra-op threads (1: the CPU allocator comparison needs it, and timings on a shared 2-core machine are
    otherwise at the mercy of OpenMP oversubscription).
    """
    backbone = backbone or BackboneSpec("vit_tiny_patch16_224")
    device = torch.device("cpu")
    keys = parse_method_keys(methods)
    threads = torch.get_num_threads()
    torch.set_num_threads(bench_threads)  # one thread: immune to OpenMP oversubscription on shared machines
    try:
        rows = _bench_rows(keys, backbone, res, batch_size, num_classes, steps, warmup, options, device, log)
    finally:
        torch.set_num_threads(threads)
    base = next((r for r in rows if r["method"] == "full_ft"), rows[0] if rows else None)

    def ratio(row: dict[str, Any], field: str) -> float | None:
        a, b = row.get(field), base.get(field) if base else None
        return a / b if a is not None and b not in (None, 0) else None

    for row in rows:
        row["ratio_est_peak_mem"] = ratio(row, "est_peak_mem_mb")
        row["ratio_measured_cpu_mem"] = ratio(row, "measured_cpu_step_increase_mb")
        row["ratio_train_step_gflops"] = ratio(row, "train_step_gflops")
        row["ratio_train_images_per_s"] = ratio(row, "train_images_per_s")
    report = {
        "backbone": backbone.name,
        "res": res,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "device": "cpu",
        "threads": bench_threads,
        "baseline": base["method"] if base else None,
        "flops_unit": FLOPS_UNIT,
        "mem_unit": "MiB (2^20 bytes)",
        "torch": torch.__version__,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    out_md, out_json = (Path(out) / name for name in BENCH_FILES)
    write_text_atomic(out_json, json.dumps(report, indent=2, default=_json_default) + "\n")
    write_text_atomic(out_md, bench_markdown(report))
    report["paths"] = [str(out_md), str(out_json)]
    return report


def _bench_rows(
    keys: list[str],
    backbone: BackboneSpec,
    res: int,
    batch_size: int,
    num_classes: int,
    steps: int,
    warmup: int,
    options: Mapping[str, Mapping[str, Any]] | None,
    device: torch.device,
    log: Callable[[str], None] | None,
) -> list[dict[str, Any]]:
    from petlbench.engine.step import train_step
    from petlbench.profiling.memory_cuda import cpu_profiler_peak
    from petlbench.profiling.one_off_speed import one_off_speed
    from petlbench.profiling.timing import measure_steps as _measure

    rows = []
    for key in keys:
        started = time.perf_counter()
        method = make_method(key, options)
        row = profile_methods([key], backbone, res, batch_size, num_classes, options=options)[0]
        cpu_est = estimate_training_memory(method, backbone, res, batch_size, num_classes, target="cpu")
        row["est_cpu_step_increase_mb"] = cpu_est.step_peak_increase_bytes / MIB
        torch.manual_seed(0)
        model, batch, _ = build_real(method, backbone, res, batch_size, num_classes, device)
        optimizer = make_optimizer(model.trainable_parameters())
        timing = _measure(model, batch, optimizer, steps=steps, warmup=warmup, device=device)
        row["train_images_per_s"] = timing["train_images_per_s"]
        row["median_step_s"] = timing["median_step_s"]
        row["step_seconds"] = timing["step_seconds"]
        measured = cpu_profiler_peak(functools.partial(train_step, model, batch, optimizer, global_step=99))
        row["measured_cpu_step_increase_mb"] = measured["peak_bytes"] / MIB
        row.update(one_off_speed(model, batch_size, steps=steps, warmup=warmup) or {})
        row["bench_seconds"] = time.perf_counter() - started
        if log is not None:
            log(f"{key}: {row['bench_seconds']:.1f}s")
        rows.append(row)
    return rows


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def bench_markdown(report: dict[str, Any]) -> str:
    """The bench table (ratios to full fine-tuning) as Markdown."""
    lines = [
        f"# Efficiency bench: {report['backbone']} at {report['res']} px, batch {report['batch_size']}",
        "",
        f"Ratios are method / {report['baseline']}. Generated {report['generated']} on CPU "
        f"({report['threads']} thread{'s' if report['threads'] != 1 else ''}, torch {report['torch']}).",
        "",
        "- **Est. peak**: fake-tensor replay of one steady-state training step, CUDA target "
        "(what `max_memory_allocated` would report; no CUDA context or kernel workspaces), MiB.",
        "- **CPU step peak**: measured on this CPU: peak of the CPU allocator's `[memory]` events (torch.profiler) "
        "over one steady-state step, above what was live before it (1 thread), MiB; next to it the estimator's "
        "CPU-target prediction of the same quantity.",
        f"- **GFLOPs**: {report['flops_unit']}; train step = forward + backward.",
        "- **img/s**: median over timed steps of the real training step in this process (CPU smoke test: "
        "only the ratios are meaningful, never compare with GPU numbers).",
        "",
        "| Method | Trainable % | Attention | Est. peak (MiB) | × | CPU step peak (MiB) | est. (MiB) | × "
        "| Fwd GFLOPs | Train-step GFLOPs | × | img/s | × |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {_fmt(r['ratio_pct'], 3)} | {r.get('attention')} | {_fmt(r['est_peak_mem_mb'], 1)} "
            f"| {_fmt(r['ratio_est_peak_mem'], 3)} | {_fmt(r['measured_cpu_step_increase_mb'], 1)} "
            f"| {_fmt(r['est_cpu_step_increase_mb'], 1)} | {_fmt(r['ratio_measured_cpu_mem'], 3)} "
            f"| {_fmt(r['fwd_gflops'], 3)} | {_fmt(r['train_step_gflops'], 3)} "
            f"| {_fmt(r['ratio_train_step_gflops'], 3)} "
            f"| {_fmt(r['train_images_per_s'], 1)} | {_fmt(r['ratio_train_images_per_s'], 2)} |"
        )
    notes = [r for r in report["rows"] if r.get("preload_gflops_per_image") is not None]
    if notes:
        lines += ["", "FPT/FPT+ train with preloaded LPM features; the one-off preload cost is the LPM forward:"]
        for r in notes:
            lines.append(
                f"- {r['name']}: {_fmt(r['preload_gflops_per_image'], 3)} GFLOPs per image "
                f"(without preloading a step costs {_fmt(r.get('train_step_gflops_no_preload'), 3)})."
            )
    speed = [r for r in report["rows"] if r.get("one_off_vs_floor") is not None]
    if speed:
        lines += [
            "",
            "Preload / bare forward: images/s of the one-off preload pass (LPM forward, token scores, gathering) over "
            "images/s of the same frozen ViT's plain fused forward through the same blocks, on the same images, "
            "timed alternately (medians; 1.00 = preloading costs no more than the bare forward):",
            "",
            "| Method | Batch | Res | Preload img/s | Bare forward img/s | Preload / bare forward |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in speed:
            lines.append(
                f"| {r['name']} | {r['one_off_batch_size']} | {r['one_off_res']} "
                f"| {_fmt(r['one_off_images_per_s'], 2)} | {_fmt(r['one_off_floor_images_per_s'], 2)} "
                f"| {_fmt(r['one_off_vs_floor'], 3)} |"
            )
    return "\n".join(lines) + "\n"


__all__ = [
    "ATTN_IMPL",
    "build_real",
    "bench_markdown",
    "forward_flops",
    "make_method",
    "measure_method",
    "memory_sweep",
    "parse_mem",
    "parse_method_keys",
    "profile_methods",
    "resolve_device",
    "run_bench",
    "run_efficiency",
]
