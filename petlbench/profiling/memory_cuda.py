"""Measured peak training memory: CUDA allocator statistics, NVML process memory, and (on CPU) the CPU
allocator's own events.

What it measures
----------------
* `measured_peak_allocated_mb`: `torch.cuda.max_memory_allocated()` since the last
  `reset_cuda_peak()` — bytes in allocator blocks handed to tensors (512-byte granules), MiB. The headline
  memory metric: reset after warm-up, read after one or more steady-state steps.
* `measured_peak_requested_mb`: `memory_stats()["requested_bytes.all.peak"]`, the same before rounding.
* `measured_peak_reserved_mb`: `max_memory_reserved()`, segments the caching allocator holds (used + cached).
* `nvml_process_mem_mb`: NVML per-process used memory of this process on the GPU (what nvidia-smi lists),
  which includes the CUDA context and cached segments.
* `cpu_profiler_peak_bytes` (CPU only): the peak of the running sum of the CPU allocator's `[memory]`
  events recorded by `torch.profiler` (`profile_memory=True`) while a function runs, relative to its
  start — an allocator-level measurement independent of the fake-tensor estimator.

Not available (no CUDA device, NVML failing, this process hidden from NVML by a PID namespace): the field
is None and `mem_reason` / `nvml_reason` says why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

MIB = 2**20


def is_cuda(device: torch.device | str | None) -> bool:
    """True for a CUDA device when CUDA is usable."""
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def reset_cuda_peak(device: torch.device | str | None = None) -> None:
    """Synchronise and reset every peak statistic of `device` (no-op off CUDA)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def nvml_process_memory(device: torch.device | str | None, nvml: Any = None) -> tuple[int | None, str | None]:
    """(bytes this process holds on `device` according to NVML, reason if None)."""
    if device is None or not is_cuda(device):
        return None, "no CUDA device"
    from petlbench.profiling.power import NvmlBackend, cuda_uuid

    backend = nvml or NvmlBackend()
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    try:
        backend.init()
    except Exception as error:  # noqa: BLE001
        return None, f"NVML unavailable: {type(error).__name__}: {error}"
    try:
        handle = backend.handle(index, cuda_uuid(index))
        used = backend.processes(handle).get(os.getpid())
    except Exception as error:  # noqa: BLE001
        return None, f"NVML query failed: {type(error).__name__}: {error}"
    finally:
        backend.shutdown()
    if used is None:
        return None, "this process is not in NVML's process list (PID namespace?)"
    return int(used), None


def read_cuda_peak(device: torch.device | str | None = None, nvml: Any = None) -> dict[str, Any]:
    """Peak allocated/requested/reserved MiB since the last reset, plus NVML process MiB (None off CUDA)."""
    if not is_cuda(device):
        return {
            "measured_peak_allocated_mb": None,
            "measured_peak_requested_mb": None,
            "measured_peak_reserved_mb": None,
            "nvml_process_mem_mb": None,
            "mem_reason": f"device {device} is not a CUDA device: allocator peaks are measured on CUDA only",
        }
    torch.cuda.synchronize(device)
    stats = torch.cuda.memory_stats(device)
    used, reason = nvml_process_memory(device, nvml)
    return {
        "measured_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / MIB,
        "measured_peak_requested_mb": stats.get("requested_bytes.all.peak", 0) / MIB
        if "requested_bytes.all.peak" in stats
        else None,
        "measured_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / MIB,
        "nvml_process_mem_mb": used / MIB if used is not None else None,
        "nvml_reason": reason,
        "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "mem_reason": None,
    }


def measure_cuda_step_peak(
    model: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    train_step_fn: Callable[..., Any] | None = None,
    warmup: int = 2,
    steps: int = 1,
) -> dict[str, Any]:
    """Peak memory of `steps` steady-state training steps after `warmup` steps."""
    from petlbench.engine.step import train_step

    step_fn = train_step_fn or train_step
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    model.train()
    for i in range(warmup):
        step_fn(model, batch, optimizer, global_step=i)
    reset_cuda_peak(device)
    for i in range(steps):
        step_fn(model, batch, optimizer, global_step=warmup + i)
    return read_cuda_peak(device)


def cpu_profiler_peak(fn: Callable[[], Any]) -> dict[str, int]:
    """Run `fn` under `torch.profiler` with `profile_memory=True` and sum the CPU allocator's `[memory]`
    events in time order: returns the peak and final increase in bytes relative to the start.

    Best with `torch.set_num_threads(1)` (intra-op threads allocate scratch buffers of their own).
    """
    from torch.profiler import ProfilerActivity, profile

    from petlbench.core.native_output import filtered_stderr

    with filtered_stderr():  # kineto logs its start, stop and any failed GPU probe on fd 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        if str(event.device_type()).endswith("CPU"):
            current += int(event.nbytes())
            peak = max(peak, current)
    return {"peak_bytes": peak, "end_bytes": current, "events": len(events)}
