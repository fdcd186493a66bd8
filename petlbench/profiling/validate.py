"""`petlbench validate` (`make gpu-check`): every check that needs a GPU, in one command that fits a few minutes.

Checks (each a plain function taking a device; run in this order, each within its share of `--budget-s`):

1. `cuda_context`: the device-level memory of a process that has initialised CUDA and allocated nothing. A child
   process (so that nothing of this one counts) creates the primary context (`torch.cuda.synchronize`) without
   allocating, then reads its own used memory from NVML's per-process list (`nvmlDeviceGetComputeRunningProcesses`,
   source `nvml_process`); where NVML cannot see the process (PID namespaces) the NVML device-level used memory
   after minus before the initialisation (source `nvml_device_delta`). Named per device
   (`torch.cuda.get_device_name`); the line to add to `allocator.CUDA_CONTEXT_MB` is printed and stored.
2. `power`: a fixed workload (fp32 matmuls) for ~20 s under `PowerSampler`; the trapezoid integral of its power
   samples against the GPU's own energy counter (`nvmlDeviceGetTotalEnergyConsumption`) over the same window,
   relative error.
3. `throughput`: real training throughput (median img/s over timed steps after warm-up) of FPT+ and full
   fine-tuning and their ratio; the FPT+ preload pass (the LPM's feature extraction, images/s) against the bare
   fused forward of the same ViT, ratio.
4. `memory`: for every method and both attention kernels, measured peaks over steady-state steps after warm-up
   (`torch.cuda.max_memory_allocated` / `max_memory_reserved`, via `measure_cuda_step_peak`) against the
   estimator's allocated (`est_peak_mem_mb`) and reserved (`est_reserved_mem_mb`) predictions; relative error
   (estimate / measured - 1) per cell. Also NVML's per-process memory after the steps, from which the context after
   a step (NVML - `memory_reserved`) and the device-level prediction (estimated reserved + measured context) follow.

Results: `<out>/<gpu-slug>.json` (every number, the device, driver, CUDA, library versions) and `<out>/<gpu-slug>.md`
(summary tables), both written atomically after every check and every memory cell, so a run cut short leaves what it
measured. FLOPs are not needed: nothing here imports fvcore.

`--device cpu --quick` rehearses the same code path on CPU with a tiny ViT: memory cells compare the CPU allocator's
step peak (torch.profiler events) with the estimator's CPU target, power reports "not available", throughput runs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from petlbench.backbones.attention import describe_attention, set_attention
from petlbench.core.atomic import write_json_atomic, write_text_atomic
from petlbench.core.method import BackboneSpec, parse_method_keys
from petlbench.engine.step import make_optimizer, train_step
from petlbench.profiling.memory_cuda import cpu_profiler_peak, measure_cuda_step_peak
from petlbench.profiling.memory_estimate import estimate_training_memory
from petlbench.profiling.power import PowerSampler, unavailable_power
from petlbench.profiling.profile import build_real, make_method
from petlbench.profiling.timing import StepTimer, measure_steps

MIB = 2**20
SCHEMA = "petlbench-validate/1"
DEFAULT_BUDGET_S = 480.0
DEFAULT_OUT = Path("results/reference")
QUICK_OUT = Path("results/validate-quick")

EXIT_OK = 0  # every check ran to the end (a check may report "unavailable", e.g. power without NVML)
EXIT_CHECK_FAILED = 1  # a check raised an error; results (with the error) are written
EXIT_USAGE = 2  # bad options
EXIT_NO_CUDA = 3  # no CUDA device: nothing measured, nothing written
EXIT_BUDGET = 4  # the time budget ran out before every check or configuration ran; partial results are written
EXIT_CODES = (
    "Exit status: 0 every check ran; 1 a check failed (its error is in the results, which are written); 2 bad "
    "options; 3 no CUDA device visible (nothing measured, nothing written; --dry-run works anywhere); 4 the time "
    "budget ran out before every check or configuration ran (partial results written)."
)

CHECK_ORDER = ("cuda_context", "power", "throughput", "memory")
CONTEXT_MIN_S = 60.0  # the context probe may run this long even after a slow start (later checks absorb it)
# Shares of the default 480 s budget; `memory` gets what is left. Scaled with --budget-s.
BUDGET_SHARES = {"startup": 20.0, "cuda_context": 30.0, "power": 45.0, "throughput": 80.0, "write": 10.0}

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


# ----------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ValidateConfig:
    """What the checks run: the GPU reference configuration by default, a tiny one with `quick_config()`."""

    backbone: str = "vit_base_patch16_224"
    res: int = 512
    batch_size: int = 16
    num_classes: int = 5
    methods: tuple[str, ...] = ()  # memory check; empty = every registered method
    attentions: tuple[str, ...] = ("fused", "explicit")
    mem_warmup: int = 2
    mem_steps: int = 2
    power_seconds: float = 20.0
    power_warmup_s: float = 3.0
    power_interval_s: float = 0.1
    power_matmul: int = 8192
    throughput_methods: tuple[str, str] = ("fpt_plus", "full_ft")
    throughput_warmup: int = 3
    throughput_steps: int = 10
    preload_warmup: int = 2
    preload_batches: int = 8
    quick: bool = False
    # estimated seconds (one H200-class GPU for the default configuration; a 2-core CPU for the quick one)
    est_startup_s: float = 15.0
    est_context_s: float = 12.0
    est_throughput_s: float = 30.0
    est_cell_s: float = 6.0
    est_write_s: float = 1.0

    def backbone_spec(self) -> BackboneSpec:
        """The ViT (random init: weights do not change memory or speed)."""
        return BackboneSpec(self.backbone)

    def method_keys(self) -> list[str]:
        """The memory check's methods, in rank order (all registered ones by default)."""
        return parse_method_keys(list(self.methods) if self.methods else "all")

    def cells(self) -> list[tuple[str, str]]:
        """(method, attention) of every memory cell."""
        return [(key, attention) for key in self.method_keys() for attention in self.attentions]

    def est_power_s(self) -> float:
        """Estimated seconds of the power check (warm-up + window + set-up)."""
        return self.power_warmup_s + self.power_seconds + 3.0


def quick_config(methods: Sequence[str] = ()) -> ValidateConfig:
    """The CPU rehearsal: test_vit at 64 px, batch 2, two methods, short windows."""
    return ValidateConfig(
        backbone="test_vit",
        res=64,
        batch_size=2,
        methods=tuple(methods) or ("full_ft", "fpt_plus"),
        mem_warmup=1,
        mem_steps=1,
        power_seconds=2.0,
        power_warmup_s=0.5,
        power_matmul=1024,
        throughput_warmup=1,
        throughput_steps=3,
        preload_warmup=1,
        preload_batches=2,
        quick=True,
        est_startup_s=5.0,
        est_context_s=5.0,
        est_throughput_s=3.0,
        est_cell_s=1.5,
        est_write_s=0.5,
    )


# ----------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PlanItem:
    """One step of the plan: what runs, its configurations, estimated seconds and time budget."""

    check: str
    description: str
    configurations: tuple[str, ...]
    estimate_s: float
    budget_s: float


def budgets(total_s: float) -> dict[str, float]:
    """Time budget per plan step: fixed shares of 480 s scaled to `total_s`; `memory` gets the rest."""
    scale = total_s / DEFAULT_BUDGET_S
    shares = {name: share * scale for name, share in BUDGET_SHARES.items()}
    shares["memory"] = total_s - sum(shares.values())
    return shares


def build_plan(config: ValidateConfig, budget_s: float = DEFAULT_BUDGET_S) -> list[PlanItem]:
    """Every step of a validate run in execution order, with its configurations, estimate and budget."""
    share = budgets(budget_s)
    cells = config.cells()
    setup = f"{config.backbone} (random init), {config.res} px, batch {config.batch_size}"
    fpt, full = config.throughput_methods
    return [
        PlanItem("startup", "imports, CUDA initialisation", (), config.est_startup_s, share["startup"]),
        PlanItem(
            "cuda_context",
            "CUDA context: a child process initialises CUDA and allocates nothing; NVML per-process used memory "
            "(fallback: NVML device used memory after - before)",
            ("torch.cuda.synchronize() in a fresh process, torch.cuda.memory_reserved() == 0",),
            config.est_context_s,
            share["cuda_context"],
        ),
        PlanItem(
            "power",
            "NVML power vs energy counter: trapezoid integral of PowerSampler's samples against "
            "nvmlDeviceGetTotalEnergyConsumption over the same window",
            (
                f"fp32 {config.power_matmul}x{config.power_matmul} matmuls: {config.power_warmup_s:g} s warm-up + "
                f"{config.power_seconds:g} s window, sampled every {config.power_interval_s:g} s",
            ),
            config.est_power_s(),
            share["power"],
        ),
        PlanItem(
            "throughput",
            f"training img/s of {fpt} and {full} (median over timed steps) and their ratio; {fpt} preload pass "
            "(LPM feature extraction) vs the bare fused forward of the same ViT",
            (
                f"{fpt}, {full}: {setup}, attention auto, {config.throughput_warmup} warm-up + "
                f"{config.throughput_steps} timed steps",
                f"{fpt} preload: LPM pass vs fused forward, {config.preload_warmup} warm-up + "
                f"{config.preload_batches} timed batches of the preload batch size",
            ),
            config.est_throughput_s,
            share["throughput"],
        ),
        PlanItem(
            "memory",
            f"measured vs estimated allocated and reserved peaks, {len(config.method_keys())} methods x "
            f"{len(config.attentions)} attention kernels = {len(cells)} cells, {setup}, {config.mem_warmup} warm-up + "
            f"{config.mem_steps} measured steps each",
            tuple(f"{key} / {attention}" for key, attention in cells),
            config.est_cell_s * len(cells),
            share["memory"],
        ),
        PlanItem(
            "write", "<out>/<gpu-slug>.json and .md (also after every check)", (), config.est_write_s, share["write"]
        ),
    ]


def format_plan(plan: Sequence[PlanItem], config: ValidateConfig, budget_s: float, device_line: str) -> str:
    """The plan as text: every check, its configurations, estimated seconds and time budget."""
    lines = [
        f"petlbench validate plan ({'quick CPU rehearsal' if config.quick else 'GPU reference'}): budget "
        f"{budget_s:.0f} s; device: {device_line}",
        f"{'step':<13} {'estimate':>9} {'budget':>8}  what",
    ]
    for item in plan:
        lines.append(f"{item.check:<13} {item.estimate_s:>7.0f} s {item.budget_s:>6.0f} s  {item.description}")
        per_cell = f" (~{config.est_cell_s:.0f} s each)" if item.check == "memory" else ""
        for i, configuration in enumerate(item.configurations, 1):
            prefix = f"[{i}/{len(item.configurations)}]" if item.check == "memory" else "-"
            lines.append(f"{'':<32}{prefix} {configuration}{per_cell if i == 1 else ''}")
    total = sum(item.estimate_s for item in plan)
    lines.append(
        f"total: ~{total:.0f} s estimated of {budget_s:.0f} s; a check that reaches its budget stops (memory: "
        "between cells) and the results so far are written"
    )
    if total > budget_s:
        lines.append("warning: the estimate exceeds the budget; the last memory cells will be skipped")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- small pure helpers
def rel_error(estimate: float | None, measured: float | None) -> float | None:
    """estimate / measured - 1 (positive: the estimate is too high); None when either is missing or measured is 0."""
    if estimate is None or measured is None or measured == 0:
        return None
    return estimate / measured - 1.0


def gpu_slug(name: str) -> str:
    """A file-name slug for a device name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def device_slug(device: torch.device, quick: bool) -> str:
    """The results' file stem: the GPU's slug, or cpu-quick-<machine> for the CPU rehearsal."""
    if device.type == "cuda":
        return gpu_slug(torch.cuda.get_device_name(device))
    return gpu_slug(f"cpu-{'quick-' if quick else ''}{platform.machine() or 'unknown'}")


def context_line(device_name: str, context_mb: float, source_file: str, source: str) -> str:
    """The entry to add inside `CUDA_CONTEXT_MB = {...}` in petlbench/profiling/allocator.py."""
    return f'    "{device_name}": {context_mb:.1f},  # {source_file} (petlbench validate, {source})'


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _max_abs(values: Sequence[float | None]) -> float | None:
    finite = [abs(v) for v in values if v is not None]
    return max(finite) if finite else None


# ----------------------------------------------------------------------------------------- check 1: CUDA context
CONTEXT_PROBE = r"""
import json, os, sys, time
out = {"pid": os.getpid()}
try:
    import torch
    index = int(sys.argv[1])
    if not torch.cuda.is_available():
        out["error"] = "no CUDA device visible"
    else:
        props = torch.cuda.get_device_properties(index)
        out["device_name"] = torch.cuda.get_device_name(index)
        uuid = str(getattr(props, "uuid", "") or "")
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) or not uuid else "GPU-" + uuid
        nvml = handle = None
        try:
            import pynvml
            pynvml.nvmlInit()
            nvml = pynvml
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else nvml.nvmlDeviceGetHandleByIndex(index)
            out["nvml_device_used_before_bytes"] = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception as error:
            out["nvml_error"] = f"{type(error).__name__}: {error}"
            nvml = None
        started = time.perf_counter()
        torch.cuda.set_device(index)
        torch.cuda.init()
        torch.cuda.synchronize(index)  # creates the primary context; allocates nothing
        free, total = torch.cuda.mem_get_info(index)
        out["init_seconds"] = time.perf_counter() - started
        out["mem_get_info_used_bytes"] = int(total - free)
        out["total_bytes"] = int(total)
        out["torch_allocated_bytes"] = int(torch.cuda.memory_allocated(index))
        out["torch_reserved_bytes"] = int(torch.cuda.memory_reserved(index))
        time.sleep(0.5)
        if nvml is not None:
            out["nvml_device_used_after_bytes"] = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            pids = {int(p.pid): p.usedGpuMemory for p in procs}
            out["nvml_pids"] = sorted(pids)
            used = pids.get(os.getpid())
            out["nvml_process_used_bytes"] = int(used) if used is not None else None
            nvml.nvmlShutdown()
except Exception as error:
    out["error"] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
"""


def context_from_probe(probe: Mapping[str, Any]) -> dict[str, Any]:
    """The context size (MiB) and its source from the probe's raw readings; status "unavailable" with a reason."""
    out: dict[str, Any] = {"probe": dict(probe), "device_name": probe.get("device_name")}
    if probe.get("error"):
        return out | {"status": "unavailable", "context_mb": None, "source": None, "reason": probe["error"]}
    before, after = probe.get("nvml_device_used_before_bytes"), probe.get("nvml_device_used_after_bytes")
    per_process = probe.get("nvml_process_used_bytes")
    out["mem_get_info_used_mb"] = (
        probe["mem_get_info_used_bytes"] / MIB if probe.get("mem_get_info_used_bytes") is not None else None
    )
    out["nvml_device_delta_mb"] = (after - before) / MIB if before is not None and after is not None else None
    out["nvml_process_mb"] = per_process / MIB if per_process is not None else None
    if probe.get("torch_reserved_bytes"):
        out["warning"] = f"torch reserved {probe['torch_reserved_bytes']} bytes in the probe (expected 0)"
    if per_process is not None:
        source = "nvml_process"
        out["source_detail"] = "NVML per-process used memory (nvmlDeviceGetComputeRunningProcesses) of the probe"
        value = out["nvml_process_mb"]
    elif out["nvml_device_delta_mb"] is not None:
        source = "nvml_device_delta"
        out["source_detail"] = (
            "NVML device used memory after - before CUDA initialisation in the probe (this process is not in NVML's "
            "process list, e.g. a PID namespace; other processes' changes would count)"
        )
        value = out["nvml_device_delta_mb"]
    else:
        reason = probe.get("nvml_error") or "NVML reported neither the process nor the device's used memory"
        return out | {"status": "unavailable", "context_mb": None, "source": None, "reason": reason}
    return out | {"status": "ok", "context_mb": value, "source": source, "reason": None}


def check_cuda_context(
    device: torch.device, timeout_s: float = 60.0, python: str = sys.executable, script: str = CONTEXT_PROBE
) -> dict[str, Any]:
    """Check 2: device-level memory of a fresh process with CUDA initialised and nothing allocated (child process)."""
    if device.type != "cuda":
        return {"status": "unavailable", "context_mb": None, "reason": f"device {device} is not a CUDA device"}
    index = device.index if device.index is not None else 0
    try:
        proc = subprocess.run(
            [python, "-c", script, str(index)], capture_output=True, text=True, timeout=max(1.0, timeout_s)
        )
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "context_mb": None, "reason": f"probe took longer than {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "error", "context_mb": None, "reason": f"probe exit {proc.returncode}: {' | '.join(tail)}"}
    return context_from_probe(json.loads(lines[-1]))


# ----------------------------------------------------------------------------------------- check 3: power
Sample = tuple[float, float, Any]  # PowerSampler's (time s, power mW, process memory)


def trapezoid_energy_j(samples: Sequence[Sample]) -> float | None:
    """Energy (J) of power samples (mW) by the trapezoid rule over their own time span; None with < 2 samples."""
    ordered = sorted(samples, key=lambda s: s[0])
    if len(ordered) < 2:
        return None
    return sum((a[1] + b[1]) / 2000.0 * (b[0] - a[0]) for a, b in zip(ordered, ordered[1:], strict=False))


def compare_energy(samples: Sequence[Sample], record: Mapping[str, Any]) -> dict[str, Any]:
    """Sampled-power energy vs the energy counter of a PowerSampler record; relative error = sampled / counter - 1."""
    ordered = sorted(samples, key=lambda s: s[0])
    poll_j = trapezoid_energy_j(ordered)
    span = ordered[-1][0] - ordered[0][0] if len(ordered) >= 2 else None
    counter_j = record.get("energy_j") if record.get("energy_source") == "nvml_energy_counter" else None
    duration = record.get("duration_s")
    out: dict[str, Any] = {
        "counter_energy_j": counter_j,
        "counter_window_s": duration,
        "sampled_energy_j": poll_j,
        "sampled_window_s": span,
        "n_samples": len(ordered),
        "max_gap_s": max((b[0] - a[0] for a, b in zip(ordered, ordered[1:], strict=False)), default=None),
        "counter_avg_w": counter_j / duration if counter_j is not None and duration else None,
        "sampled_avg_w": poll_j / span if poll_j is not None and span else None,
        "sampled_peak_w": max(s[1] for s in ordered) / 1000.0 if ordered else None,
        "power_field": record.get("power_peak_field"),
    }
    out["rel_err_energy"] = rel_error(poll_j, counter_j)
    out["rel_err_avg_power"] = rel_error(out["sampled_avg_w"], out["counter_avg_w"])
    if counter_j is None:
        out["reason"] = "no energy counter (nvmlDeviceGetTotalEnergyConsumption unsupported: pre-Volta GPU?)"
    elif poll_j is None:
        out["reason"] = "fewer than 2 power samples"
    else:
        out["reason"] = None
    return out


def matmul_workload(device: torch.device, n: int = 8192) -> Callable[[float], int]:
    """A fixed GPU load: fp32 n x n matmuls until a `time.monotonic()` deadline; returns the number run."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)

    def run(until: float) -> int:
        count = 0
        while time.monotonic() < until:
            for _ in range(4):
                torch.mm(a, b, out=c)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            count += 4
        return count

    return run


def check_power(
    device: torch.device,
    seconds: float = 20.0,
    warmup_s: float = 3.0,
    interval_s: float = 0.1,
    *,
    nvml: Any = None,
    workload: Callable[[float], Any] | None = None,
    matmul: int = 8192,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Check 3: a fixed workload for `seconds` under a PowerSampler, sampled energy vs the counter (fakes: `nvml`)."""
    if device.type != "cuda" and nvml is None:
        reason = f"device {device} is not a CUDA device; NVML measures NVIDIA GPUs"
        return {"status": "unavailable", "reason": reason, "power": unavailable_power(reason, interval_s)}
    work = workload or matmul_workload(device, matmul)
    if warmup_s > 0:
        work(time.monotonic() + warmup_s)  # to a steady power draw before the window opens
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    sampler = PowerSampler(index, interval_s=interval_s, nvml=nvml, sync=sync)
    sampler.start()
    iterations = None
    try:
        if sampler.reason is None:
            iterations = work(time.monotonic() + seconds)
    finally:
        record = sampler.stop()
    out: dict[str, Any] = {"power": record, "workload_seconds": seconds, "warmup_s": warmup_s}
    out["workload"] = f"fp32 {matmul}x{matmul} matmuls" if workload is None else "custom"
    out["workload_iterations"] = iterations
    if not record.get("available"):
        return out | {"status": "unavailable", "reason": record.get("reason")}
    comparison = compare_energy(list(sampler.samples), record)
    status = "ok" if comparison["rel_err_energy"] is not None else "unavailable"
    return out | comparison | {"status": status, "gpu_shared": record.get("gpu_shared")}


# ----------------------------------------------------------------------------------------- check 4: throughput
def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_batches(
    fn: Callable[[], Any], n_images: int, warmup: int, batches: int, device: torch.device
) -> dict[str, Any]:
    """Median images/s of `batches` synchronised calls of `fn` after `warmup` calls (no gradients)."""
    timer = StepTimer(warmup_steps=warmup, device=device)
    with torch.no_grad():
        for _ in range(warmup + batches):
            timer.start_step()
            fn()
            timer.end_step(n_images)
    summary = timer.summary()
    return {
        "images_per_s": summary["train_images_per_s"],
        "median_batch_s": summary["median_step_s"],
        "batches_timed": summary["steps_timed"],
        "batch_size": n_images,
        "spread_pct": summary["spread_pct"],
    }


def throughput_summary(
    train: Mapping[str, Mapping[str, Any]], preload: Mapping[str, Any] | None, pair: Sequence[str]
) -> dict[str, Any]:
    """Ratios: FPT+ / full fine-tuning training img/s, LPM preload pass / bare fused forward img/s."""
    fpt, full = pair
    a = (train.get(fpt) or {}).get("train_images_per_s")
    b = (train.get(full) or {}).get("train_images_per_s")
    out: dict[str, Any] = {
        f"{fpt}_train_images_per_s": a,
        f"{full}_train_images_per_s": b,
        "train_ratio": a / b if a is not None and b else None,
        "train_ratio_meaning": f"{fpt} / {full} training images per second",
    }
    if preload:
        p, f = preload.get("lpm_pass", {}).get("images_per_s"), preload.get("fused_forward", {}).get("images_per_s")
        out["preload_images_per_s"] = p
        out["fused_forward_images_per_s"] = f
        out["preload_ratio"] = p / f if p is not None and f else None
        out["preload_ratio_meaning"] = "LPM preload pass / bare fused forward of the same ViT, images per second"
    return out


def measure_preload(model: Any, device: torch.device, batch_size: int, warmup: int, batches: int) -> dict[str, Any]:
    """Images/s of the model's one-off work (the FPT/FPT+ LPM pass) and of the bare fused forward of its ViT."""
    work = model.one_off_work()
    if work is None:
        return {"reason": "the model has no one-off preload work (preload disabled?)"}
    lpm = work.module.to(device)
    images = torch.randn(batch_size, 3, work.size, work.size, device=device)
    attention = describe_attention(lpm)
    lpm_pass = time_batches(lambda: lpm(images), batch_size, warmup, batches, device)
    vit = lpm.vit
    set_attention(vit, "fused")
    vit.eval()
    fused = time_batches(lambda: vit(images), batch_size, warmup, batches, device)
    out = {
        "lpm_pass": lpm_pass | {"attention": f"{attention} (fed blocks explicit: their softmax map is needed)"},
        "fused_forward": fused | {"attention": describe_attention(vit), "what": "vit(images), no gradients"},
        "res": work.size,
        "layers": list(getattr(lpm, "layers", [])),
    }
    return out


def check_throughput(
    device: torch.device, config: ValidateConfig, stop_at: float = math.inf, log: Log = _quiet
) -> dict[str, Any]:
    """Check 4: training img/s of FPT+ and full fine-tuning (ratio); FPT+ preload pass vs bare fused forward."""
    backbone = config.backbone_spec()
    train: dict[str, dict[str, Any]] = {}
    preload: dict[str, Any] | None = None
    status, reason = "ok", None
    fpt = config.throughput_methods[0]
    for key in config.throughput_methods:
        if time.monotonic() > stop_at:
            status, reason = "partial", f"time budget reached before {key}"
            break
        started = time.perf_counter()
        method = make_method(key)
        torch.manual_seed(0)
        model, batch, _ = build_real(method, backbone, config.res, config.batch_size, config.num_classes, device)
        optimizer = make_optimizer(model.trainable_parameters())
        timing = measure_steps(
            model, batch, optimizer, steps=config.throughput_steps, warmup=config.throughput_warmup, device=device
        )
        train[key] = {
            "train_images_per_s": timing["train_images_per_s"],
            "median_step_s": timing["median_step_s"],
            "steps_timed": timing["steps_timed"],
            "warmup_steps": config.throughput_warmup,
            "spread_pct": timing["spread_pct"],
            "attention": describe_attention(model),
            "measured_peak_allocated_mb": timing.get("measured_peak_allocated_mb"),
        }
        del optimizer, batch
        if key == fpt and time.monotonic() <= stop_at:
            size = int(getattr(method.options, "preload_batch_size", config.batch_size))
            preload = measure_preload(model, device, size, config.preload_warmup, config.preload_batches)
        del model
        _free(device)
        train[key]["seconds"] = time.perf_counter() - started
        log(f"throughput {key}: {train[key]['train_images_per_s']:.1f} img/s ({train[key]['seconds']:.1f} s)")
    out: dict[str, Any] = {"status": status, "reason": reason, "train": train, "preload": preload}
    out["attention_note"] = "attention auto: as the models are built (timm default: fused SDPA)"
    return out | {"summary": throughput_summary(train, preload, config.throughput_methods)}


# ----------------------------------------------------------------------------------------- check 1: memory
def compare_memory(estimate: Mapping[str, Any], measured: Mapping[str, Any]) -> dict[str, Any]:
    """One memory cell's comparison from the estimator's record and the measurement (MiB; errors est/meas - 1)."""
    row = {
        "est_allocated_mb": estimate.get("est_allocated_mb"),
        "measured_allocated_mb": measured.get("measured_allocated_mb"),
        "est_reserved_mb": estimate.get("est_reserved_mb"),
        "measured_reserved_mb": measured.get("measured_reserved_mb"),
    }
    row["rel_err_allocated"] = rel_error(row["est_allocated_mb"], row["measured_allocated_mb"])
    row["rel_err_reserved"] = rel_error(row["est_reserved_mb"], row["measured_reserved_mb"])
    return row


def memory_cell(key: str, attention: str, config: ValidateConfig, device: torch.device) -> dict[str, Any]:
    """Estimate and measure one (method, attention) cell on `device` (CUDA peaks, or the CPU allocator's step peak)."""
    backbone = config.backbone_spec()
    method = make_method(key)
    cuda = device.type == "cuda"
    row: dict[str, Any] = {"method": key, "attention_requested": attention, "status": "ok", "error": None}
    started = time.perf_counter()
    target = "cuda" if cuda else "cpu"
    est = estimate_training_memory(
        method, backbone, config.res, config.batch_size, config.num_classes, attention=attention, target=target
    )
    record = est.to_dict()
    row["est_seconds"] = time.perf_counter() - started
    row["attention"] = record["attention"]
    row["est_peak_phase"] = record["est_peak_phase"]
    if cuda:
        estimate = {"est_allocated_mb": record["est_peak_mem_mb"], "est_reserved_mb": record["est_reserved_mem_mb"]}
        row["kind"] = "absolute peaks: max_memory_allocated / max_memory_reserved over the measured steps"
    else:
        estimate = {"est_allocated_mb": est.step_peak_increase_bytes / MIB, "est_reserved_mb": None}
        row["kind"] = "CPU step peak above the live set at its start (torch.profiler [memory] events, 1 thread)"
        row["est_absolute_peak_mb"] = record["est_peak_mem_mb"]
    started = time.perf_counter()
    measured: dict[str, Any] = {}
    threads = torch.get_num_threads()
    _free(device)
    if cuda:
        row["baseline_allocated_mb"] = torch.cuda.memory_allocated(device) / MIB
        row["baseline_reserved_mb"] = torch.cuda.memory_reserved(device) / MIB
    else:
        torch.set_num_threads(1)  # the CPU allocator comparison needs one thread (no per-thread scratch buffers)
    try:
        measured = _measure_cell(method, attention, config, device, row)
    except torch.cuda.OutOfMemoryError as error:
        row["status"], row["error"] = "oom", f"OutOfMemoryError: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        torch.set_num_threads(threads)
    _free(device)  # after the except block: the traceback (and the model it holds) is gone
    row["measure_seconds"] = time.perf_counter() - started
    return row | compare_memory(estimate, measured)


def _measure_cell(
    method: Any, attention: str, config: ValidateConfig, device: torch.device, row: dict[str, Any]
) -> dict[str, Any]:
    """Build the real model and measure its steady-state step peak; fills `row` with side readings."""
    torch.manual_seed(0)
    backbone = config.backbone_spec()
    model, batch, _ = build_real(method, backbone, config.res, config.batch_size, config.num_classes, device, attention)
    row["measured_attention"] = describe_attention(model)
    optimizer = make_optimizer(model.trainable_parameters())
    if device.type == "cuda":
        peaks = measure_cuda_step_peak(model, batch, optimizer, warmup=config.mem_warmup, steps=config.mem_steps)
        reserved_now = torch.cuda.memory_reserved(device) / MIB
        nvml_mb = peaks.get("nvml_process_mem_mb")
        row["measured_requested_mb"] = peaks.get("measured_peak_requested_mb")
        row["nvml_process_mem_mb"] = nvml_mb
        row["nvml_reason"] = peaks.get("nvml_reason")
        row["reserved_now_mb"] = reserved_now
        row["context_after_step_mb"] = nvml_mb - reserved_now if nvml_mb is not None else None
        return {
            "measured_allocated_mb": peaks["measured_peak_allocated_mb"],
            "measured_reserved_mb": peaks["measured_peak_reserved_mb"],
        }
    model.train()
    for i in range(config.mem_warmup):
        train_step(model, batch, optimizer, global_step=i)
    step = config.mem_warmup + config.mem_steps
    peak = cpu_profiler_peak(lambda: train_step(model, batch, optimizer, global_step=step))
    row["reserved_reason"] = "no caching allocator on CPU: reserved memory is a CUDA quantity"
    return {"measured_allocated_mb": peak["peak_bytes"] / MIB, "measured_reserved_mb": None}


def memory_summary(rows: Sequence[Mapping[str, Any]], context_mb: float | None = None) -> dict[str, Any]:
    """Worst and median relative errors over the cells that were measured; device-level prediction with a context."""
    ok = [r for r in rows if r.get("status") == "ok"]
    alloc = [r["rel_err_allocated"] for r in ok if r.get("rel_err_allocated") is not None]
    reserved = [r["rel_err_reserved"] for r in ok if r.get("rel_err_reserved") is not None]
    contexts = [r["context_after_step_mb"] for r in ok if r.get("context_after_step_mb") is not None]
    out: dict[str, Any] = {
        "cells": len(rows),
        "measured": len(ok),
        "oom": sum(1 for r in rows if r.get("status") == "oom"),
        "errors": sum(1 for r in rows if r.get("status") == "error"),
        "skipped": sum(1 for r in rows if r.get("status") == "skipped"),
        "max_abs_rel_err_allocated": _max_abs(alloc),
        "median_rel_err_allocated": _median(alloc),
        "max_abs_rel_err_reserved": _max_abs(reserved),
        "median_rel_err_reserved": _median(reserved),
        "context_after_step_mb_median": _median(contexts),
        "context_after_step_mb_range": [min(contexts), max(contexts)] if contexts else None,
    }
    if context_mb is not None:
        device_errors = [
            rel_error(r["est_reserved_mb"] + context_mb, r["nvml_process_mem_mb"])
            for r in ok
            if r.get("est_reserved_mb") is not None and r.get("nvml_process_mem_mb") is not None
        ]
        out["context_idle_mb"] = context_mb
        out["max_abs_rel_err_device"] = _max_abs(device_errors)
        out["median_rel_err_device"] = _median([e for e in device_errors if e is not None])
        out["device_rule"] = "est_reserved_mb + idle CUDA context vs NVML per-process memory after the steps"
    return out


def check_memory(
    device: torch.device,
    config: ValidateConfig,
    stop_at: float = math.inf,
    log: Log = _quiet,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    cell_fn: Callable[[str, str, ValidateConfig, torch.device], dict[str, Any]] = memory_cell,
) -> dict[str, Any]:
    """Check 1: every (method, attention) cell, measured vs estimated; stops between cells at `stop_at`."""
    cells = config.cells()
    rows: list[dict[str, Any]] = []
    slowest = config.est_cell_s
    status, reason = "ok", None
    for i, (key, attention) in enumerate(cells, 1):
        if time.monotonic() + slowest > stop_at:
            status, reason = "partial", f"time budget reached: {len(cells) - i + 1} of {len(cells)} cells skipped"
            rows += [
                {"method": k, "attention_requested": a, "status": "skipped", "error": "time budget"}
                for k, a in cells[i - 1 :]
            ]
            log(f"memory: {reason}")
            break
        started = time.monotonic()
        try:
            row = cell_fn(key, attention, config, device)
        except Exception as error:  # noqa: BLE001 - one failing cell must not stop the others
            row = {"method": key, "attention_requested": attention, "status": "error"}
            row["error"] = f"{type(error).__name__}: {error}"
            _free(device)
        row["seconds"] = time.monotonic() - started
        slowest = max(slowest, row["seconds"])
        rows.append(row)
        log(f"memory [{i}/{len(cells)}] {key} / {attention}: {_cell_text(row)} ({row['seconds']:.1f} s)")
        if on_cell is not None:
            on_cell({"status": "running", "rows": list(rows)})
    if status == "ok" and any(r.get("status") == "error" for r in rows):
        status, reason = "error", "some cells raised an error (see their rows)"
    return {"status": status, "reason": reason, "rows": rows}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _mb(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _mem(value: float | None) -> str:
    """MiB with one decimal, three below 10 MiB (the quick rehearsal's tiny cells)."""
    return _mb(value, 3 if value is not None and abs(value) < 10 else 1)


def _cell_text(row: Mapping[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('error')}"
    text = (
        f"allocated est {_mem(row.get('est_allocated_mb'))} / measured {_mem(row.get('measured_allocated_mb'))} MiB "
        f"({_pct(row.get('rel_err_allocated'))})"
    )
    if row.get("measured_reserved_mb") is not None:
        text += (
            f", reserved est {_mb(row.get('est_reserved_mb'))} / measured {_mb(row.get('measured_reserved_mb'))} MiB "
            f"({_pct(row.get('rel_err_reserved'))})"
        )
    return text


# ----------------------------------------------------------------------------------------- environment
def driver_version() -> tuple[str | None, str | None]:
    """(NVIDIA driver version from NVML, reason when unavailable)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # noqa: BLE001 - library missing, no driver
        return None, f"NVML unavailable: {type(error).__name__}: {error}"
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return (version.decode() if isinstance(version, bytes) else str(version)), None
    except Exception as error:  # noqa: BLE001
        return None, f"NVML query failed: {type(error).__name__}: {error}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - best effort
            pass


def device_info(device: torch.device, quick: bool) -> dict[str, Any]:
    """Device name, slug, driver, CUDA and library versions, git state (petlbench.core.environment)."""
    from petlbench.core.environment import environment

    env = environment(device)
    info: dict[str, Any] = {"name": env["device"]["name"], "slug": device_slug(device, quick), "type": device.type}
    if device.type == "cuda":
        info["driver"], info["driver_reason"] = driver_version()
        info["cuda"] = torch.version.cuda
        info["total_memory_mb"] = env["device"]["total_memory_bytes"] / MIB
    info["torch"] = env["versions"].get("torch")
    info["torch_build"] = torch.__version__
    info["timm"] = env["versions"].get("timm")
    return {"device": info, "environment": env}


# ----------------------------------------------------------------------------------------- report
def new_report(
    config: ValidateConfig, device: torch.device, budget_s: float, plan: Sequence[PlanItem]
) -> dict[str, Any]:
    """The report skeleton the checks fill in."""
    info = device_info(device, config.quick)
    return {
        "schema": SCHEMA,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": False,
        "exit_code": None,
        "budget_s": budget_s,
        "elapsed_s": 0.0,
        **info,
        "config": dataclasses.asdict(config),
        "plan": [dataclasses.asdict(item) for item in plan],
        "checks": {},
        "cuda_context_line": None,
    }


def report_paths(out_dir: Path, slug: str) -> tuple[Path, Path]:
    """(JSON, Markdown) paths of a device's reference results."""
    return out_dir / f"{slug}.json", out_dir / f"{slug}.md"


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<slug>.json` and `<slug>.md` atomically; returns their paths."""
    json_path, md_path = report_paths(Path(out_dir), report["device"]["slug"])
    write_json_atomic(json_path, report)
    write_text_atomic(md_path, render_markdown(report))
    return json_path, md_path


def render_markdown(report: Mapping[str, Any]) -> str:
    """A readable summary of a (possibly partial) report."""
    dev, cfg, checks = report["device"], report["config"], report.get("checks", {})
    lines = [
        f"# petlbench validate: {dev['name']}",
        "",
        f"Generated {report['generated']}; {'complete' if report.get('complete') else 'PARTIAL'} "
        f"(exit code {report.get('exit_code')}), {report.get('elapsed_s', 0):.0f} s of a {report['budget_s']:.0f} s "
        "budget.",
        "",
        f"- Device: {dev['name']} ({dev['type']}); driver {dev.get('driver', 'n/a')}, CUDA {dev.get('cuda', 'n/a')}, "
        f"torch {dev.get('torch')}, timm {dev.get('timm')}",
        f"- Configuration: {cfg['backbone']} (random init), {cfg['res']} px, batch {cfg['batch_size']}"
        f"{' (quick CPU rehearsal)' if cfg.get('quick') else ''}",
        "",
        "| Check | Status | Seconds | Budget s | Note |",
        "|---|---|---:|---:|---|",
    ]
    for name in CHECK_ORDER:
        check = checks.get(name)
        if check is None:
            lines.append(f"| {name} | not run | | | |")
            continue
        lines.append(
            f"| {name} | {check.get('status')} | {_mb(check.get('seconds'), 1)} | {_mb(check.get('budget_s'), 0)} "
            f"| {check.get('reason') or ''} |"
        )
    lines += _md_context(checks.get("cuda_context"), report.get("cuda_context_line"))
    lines += _md_power(checks.get("power"))
    lines += _md_throughput(checks.get("throughput"))
    lines += _md_memory(checks.get("memory"))
    return "\n".join(lines) + "\n"


def _md_context(check: Mapping[str, Any] | None, line: str | None) -> list[str]:
    if not check:
        return []
    out = ["", "## CUDA context", ""]
    if check.get("context_mb") is None:
        return out + [f"Not available: {check.get('reason')}"]
    out += [
        f"- {_mb(check['context_mb'])} MiB ({check.get('source')}: {check.get('source_detail')})",
        f"- also: NVML device delta {_mb(check.get('nvml_device_delta_mb'))} MiB, mem_get_info used (all "
        f"processes) {_mb(check.get('mem_get_info_used_mb'))} MiB",
    ]
    if line:
        out += [
            "",
            "Line to add inside `CUDA_CONTEXT_MB = {...}` in petlbench/profiling/allocator.py:",
            "",
            "```python",
        ]
        out += [line, "```"]
    return out


def _md_power(check: Mapping[str, Any] | None) -> list[str]:
    if not check:
        return []
    out = ["", "## NVML power and energy", ""]
    if check.get("rel_err_energy") is None:
        return out + [f"Not available: {check.get('reason')}"]
    return out + [
        "| Workload | Window s | Samples | Counter J | Sampled J | Error | Counter avg W | Sampled avg W | Peak W |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {check.get('workload')} | {_mb(check.get('counter_window_s'))} | {check.get('n_samples')} "
        f"| {_mb(check.get('counter_energy_j'))} | {_mb(check.get('sampled_energy_j'))} "
        f"| {_pct(check.get('rel_err_energy'))} | {_mb(check.get('counter_avg_w'))} "
        f"| {_mb(check.get('sampled_avg_w'))} "
        f"| {_mb(check.get('sampled_peak_w'))} |",
        "",
        f"Sampled power field: {check.get('power_field')}; GPU shared with other processes: {check.get('gpu_shared')}.",
    ]


def _md_throughput(check: Mapping[str, Any] | None) -> list[str]:
    if not check or "summary" not in check:
        return []
    s = check["summary"]
    out = ["", "## Throughput", "", "| Measure | img/s | Ratio |", "|---|---:|---:|"]
    train = check.get("train", {})
    keys = list(train)
    for key in keys:
        out.append(f"| {key} training step (median) | {_mb(train[key].get('train_images_per_s'))} | |")
    out.append(f"| {s.get('train_ratio_meaning')} | | {_mb(s.get('train_ratio'), 3)} |")
    if "preload_ratio" in s:
        out += [
            f"| preload: LPM pass | {_mb(s.get('preload_images_per_s'))} | |",
            f"| bare fused forward (same ViT) | {_mb(s.get('fused_forward_images_per_s'))} | |",
            f"| {s.get('preload_ratio_meaning')} | | {_mb(s.get('preload_ratio'), 3)} |",
        ]
    return out


def _md_memory(check: Mapping[str, Any] | None) -> list[str]:
    if not check:
        return []
    rows = check.get("rows", [])
    out = [
        "",
        "## Memory: measured vs estimated (MiB; error = estimate / measured - 1)",
        "",
        "| Method | Attention | Est. alloc | Meas. alloc | Error | Est. reserved | Meas. reserved | Error | NVML "
        "| Status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.get('method')} | {r.get('attention') or r.get('attention_requested')} "
            f"| {_mem(r.get('est_allocated_mb'))} | {_mem(r.get('measured_allocated_mb'))} "
            f"| {_pct(r.get('rel_err_allocated'))} | {_mem(r.get('est_reserved_mb'))} "
            f"| {_mem(r.get('measured_reserved_mb'))} | {_pct(r.get('rel_err_reserved'))} "
            f"| {_mem(r.get('nvml_process_mem_mb'))} | {r.get('status')} |"
        )
    s = check.get("summary")
    if s:
        out += [
            "",
            f"Cells measured {s['measured']} of {s['cells']} (oom {s['oom']}, errors {s['errors']}, skipped "
            f"{s['skipped']}). Allocated: max |error| {_pct(s['max_abs_rel_err_allocated'])}, median "
            f"{_pct(s['median_rel_err_allocated'])}. Reserved: max |error| {_pct(s['max_abs_rel_err_reserved'])}, "
            f"median {_pct(s['median_rel_err_reserved'])}.",
        ]
        if s.get("context_after_step_mb_median") is not None:
            out.append(
                f"Context after a step (NVML - memory_reserved): median {_mb(s['context_after_step_mb_median'])} MiB, "
                f"range {s['context_after_step_mb_range']}."
            )
        if s.get("max_abs_rel_err_device") is not None:
            out.append(
                f"Device level ({s['device_rule']}): max |error| {_pct(s['max_abs_rel_err_device'])}, median "
                f"{_pct(s['median_rel_err_device'])}."
            )
    if rows and rows[0].get("kind"):
        out += ["", f"Measured: {rows[0]['kind']}."]
    return out


# ----------------------------------------------------------------------------------------- orchestration
def exit_code(checks: Mapping[str, Mapping[str, Any]]) -> int:
    """1 if a check failed, else 4 if the budget cut a check short, else 0."""
    statuses = {c.get("status") for c in checks.values()}
    if "error" in statuses:
        return EXIT_CHECK_FAILED
    if statuses & {"partial", "skipped"}:
        return EXIT_BUDGET
    return EXIT_OK


def run_validate(
    config: ValidateConfig,
    device: torch.device,
    out_dir: str | Path,
    budget_s: float = DEFAULT_BUDGET_S,
    *,
    started: float | None = None,
    log: Log = print,
    checks: Sequence[str] = CHECK_ORDER,
) -> tuple[dict[str, Any], int]:
    """Run the checks within `budget_s` from `started` (monotonic), writing the report after each; (report, code)."""
    started = time.monotonic() if started is None else started
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU rehearsal: timings and the CPU allocator comparison are not oversubscribed
    try:
        return _run_validate(config, device, Path(out_dir), budget_s, started, log, checks)
    finally:
        torch.set_num_threads(threads)


def _run_validate(
    config: ValidateConfig,
    device: torch.device,
    out_dir: Path,
    budget_s: float,
    started: float,
    log: Log,
    checks: Sequence[str],
) -> tuple[dict[str, Any], int]:
    deadline = started + budget_s
    share = budgets(budget_s)
    plan = build_plan(config, budget_s)
    report = new_report(config, device, budget_s, plan)
    report["cpu_threads"] = torch.get_num_threads() if device.type == "cpu" else None

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - started
        paths = write_report(report, out_dir)
        report["paths"] = [str(p) for p in paths]

    later = {name: sum(share[n] for n in CHECK_ORDER[i + 1 :]) for i, name in enumerate(CHECK_ORDER)}
    for name in CHECK_ORDER:
        if name not in checks:
            continue
        now = time.monotonic()
        stop_at = deadline - share["write"] - later[name]
        if name == "cuda_context":  # cheap and the one constant only a GPU gives: a slow start must not starve it
            stop_at = max(stop_at, min(now + CONTEXT_MIN_S, deadline - share["write"]))
        if stop_at - now < 1.0:
            report["checks"][name] = {"status": "skipped", "reason": "time budget exhausted", "budget_s": 0.0}
            log(f"{name}: skipped (time budget exhausted)")
            save()
            continue
        log(f"{name}: up to {stop_at - now:.0f} s")
        try:
            result = _run_check(name, config, device, stop_at, report, log, save)
        except Exception as error:  # noqa: BLE001 - record the failure, keep the other checks
            result = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
            _free(device)
        result["seconds"] = time.monotonic() - now
        result["budget_s"] = stop_at - now
        report["checks"][name] = result
        log(f"{name}: {result['status']}{' (' + str(result['reason']) + ')' if result.get('reason') else ''}")
        save()
    code = exit_code(report["checks"])
    report["exit_code"] = code
    report["complete"] = code == EXIT_OK
    save()
    return report, code


def _run_check(
    name: str,
    config: ValidateConfig,
    device: torch.device,
    stop_at: float,
    report: dict[str, Any],
    log: Log,
    save: Callable[[], None],
) -> dict[str, Any]:
    if name == "cuda_context":
        result = check_cuda_context(device, timeout_s=stop_at - time.monotonic())
        if result.get("context_mb") is not None:
            json_path, _ = report_paths(DEFAULT_OUT, report["device"]["slug"])
            line = context_line(result["device_name"], result["context_mb"], str(json_path), result["source"])
            report["cuda_context_line"] = line
            log("add to CUDA_CONTEXT_MB in petlbench/profiling/allocator.py:\n" + line)
        return result
    if name == "power":
        room = stop_at - time.monotonic() - config.power_warmup_s - 3.0
        seconds = min(config.power_seconds, room)
        if device.type == "cuda" and seconds < min(5.0, config.power_seconds):
            return {"status": "skipped", "reason": f"only {max(room, 0):.0f} s left for the power window"}
        result = check_power(
            device, seconds, config.power_warmup_s, config.power_interval_s, matmul=config.power_matmul
        )
        if result.get("rel_err_energy") is not None:
            log(
                f"power: counter {result['counter_energy_j']:.1f} J, sampled {result['sampled_energy_j']:.1f} J "
                f"({_pct(result['rel_err_energy'])}), avg {result['counter_avg_w']:.0f} W"
            )
        if seconds < config.power_seconds and result.get("status") == "ok":
            result["status"], result["reason"] = "partial", f"window shortened to {seconds:.0f} s by the budget"
        return result
    if name == "throughput":
        result = check_throughput(device, config, stop_at, log)
        s = result["summary"]
        log(f"throughput: train ratio {_mb(s.get('train_ratio'), 3)}, preload ratio {_mb(s.get('preload_ratio'), 3)}")
        return result
    context = (report["checks"].get("cuda_context") or {}).get("context_mb")

    def on_cell(partial: dict[str, Any]) -> None:
        report["checks"]["memory"] = partial | {"summary": memory_summary(partial["rows"], context)}
        save()

    result = check_memory(device, config, stop_at, log, on_cell)
    result["summary"] = memory_summary(result["rows"], context)
    s = result["summary"]
    log(
        f"memory: allocated max |error| {_pct(s['max_abs_rel_err_allocated'])}, reserved max |error| "
        f"{_pct(s['max_abs_rel_err_reserved'])} over {s['measured']} of {s['cells']} cells"
    )
    return result


def no_cuda_message() -> str:
    """The one line printed when no CUDA device is visible."""
    return (
        "petlbench validate: no CUDA device visible (torch.cuda.is_available() is False): nothing measured, nothing "
        f"written (exit {EXIT_NO_CUDA}); --dry-run prints the plan anywhere"
    )


def cuda_device_line(device: torch.device) -> str:
    """One line naming the device the checks would run on (never initialises a CUDA context)."""
    if device.type != "cuda":
        return f"{device} ({platform.machine()}, {os.cpu_count()} CPUs)"
    if not torch.cuda.is_available():
        return "no CUDA device visible here"
    index = device.index if device.index is not None else 0
    return f"{device} = {torch.cuda.get_device_name(index)}"


__all__ = [
    "CHECK_ORDER",
    "CONTEXT_PROBE",
    "DEFAULT_BUDGET_S",
    "EXIT_BUDGET",
    "EXIT_CHECK_FAILED",
    "EXIT_CODES",
    "EXIT_NO_CUDA",
    "EXIT_OK",
    "EXIT_USAGE",
    "PlanItem",
    "ValidateConfig",
    "budgets",
    "build_plan",
    "check_cuda_context",
    "check_memory",
    "check_power",
    "check_throughput",
    "compare_energy",
    "compare_memory",
    "context_from_probe",
    "context_line",
    "format_plan",
    "gpu_slug",
    "memory_cell",
    "memory_summary",
    "quick_config",
    "rel_error",
    "render_markdown",
    "run_validate",
    "trapezoid_energy_j",
    "write_report",
]
