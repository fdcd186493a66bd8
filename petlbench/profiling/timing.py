"""Throughput and time.

Definitions
-----------
* A *step* is forward + loss + backward + clip + optimizer step + `zero_grad`, the batch already on the
  device. Its duration is read with `time.perf_counter()` after `torch.cuda.synchronize()` at both ends
  (CUDA launches are asynchronous; without the sync one times the launches).
* `train_images_per_s` (model-step throughput) = the **median over the timed steps** of
  images_in_step / step_seconds. The first `warmup_steps` steps are excluded (optimizer-state creation,
  cuDNN/cuBLAS set-up, lazy kernel loading, allocator growth).
* `mean_images_per_s` = timed images / timed seconds (kept for the consistency check
  images/s × time ≈ images).
* End-to-end throughput (data loading included) and total training / preload time are wall-clock
  windows measured with `Stopwatch` around whole epochs or the preload pass.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def cuda_sync_for(device: torch.device | str | None) -> Callable[[], None]:
    """A no-argument function that synchronises `device` if it is a CUDA device, else does nothing."""
    if device is None:
        return lambda: None
    device = torch.device(device)
    if device.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.synchronize(device)


class StepTimer:
    """Times training steps: `start_step()`, `end_step(n_images)`, `summary()`.

    `device` (a CUDA device) makes both ends synchronise; `clock`/`sync` are injectable for tests.
    """

    def __init__(
        self,
        warmup_steps: int = 2,
        device: torch.device | str | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sync: Callable[[], None] | None = None,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        self.warmup_steps = warmup_steps
        self.clock = clock
        self.sync = sync if sync is not None else cuda_sync_for(device)
        self.steps: list[tuple[float, int]] = []
        self._started: float | None = None

    def start_step(self) -> None:
        """Mark the start of a step (after synchronising the device)."""
        self.sync()
        self._started = self.clock()

    def end_step(self, n_images: int) -> float:
        """Mark the end of the step that processed `n_images`; returns its duration in seconds."""
        if self._started is None:
            raise RuntimeError("end_step() without start_step()")
        self.sync()
        seconds = self.clock() - self._started
        self._started = None
        self.steps.append((seconds, int(n_images)))
        return seconds

    def summary(self) -> dict[str, Any]:
        """Median step time and images/s over the timed (post-warm-up) steps; None fields if none timed."""
        timed = self.steps[self.warmup_steps :]
        base: dict[str, Any] = {
            "steps_total": len(self.steps),
            "warmup_steps_excluded": min(self.warmup_steps, len(self.steps)),
            "steps_timed": len(timed),
        }
        if not timed:
            return base | {
                "median_step_s": None,
                "train_images_per_s": None,
                "mean_images_per_s": None,
                "timed_images": 0,
                "timed_seconds": 0.0,
                "min_step_s": None,
                "max_step_s": None,
                "spread_pct": None,
                "step_seconds": [],
                "reason": f"no steps after the {self.warmup_steps} warm-up steps",
            }
        seconds = [s for s, _ in timed]
        images = sum(n for _, n in timed)
        total = sum(seconds)
        median = statistics.median(seconds)
        rates = [n / s for s, n in timed if s > 0]
        return base | {
            "median_step_s": median,
            "train_images_per_s": statistics.median(rates) if rates else None,
            "mean_images_per_s": images / total if total > 0 else None,
            "timed_images": images,
            "timed_seconds": total,
            "min_step_s": min(seconds),
            "max_step_s": max(seconds),
            "spread_pct": 100.0 * (max(seconds) - min(seconds)) / median if median > 0 else None,
            "step_seconds": seconds,
        }


class Stopwatch:
    """A synchronised wall-clock window (a training epoch, the preload pass): `start()`, `stop()`."""

    def __init__(
        self,
        device: torch.device | str | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sync: Callable[[], None] | None = None,
    ) -> None:
        self.clock = clock
        self.sync = sync if sync is not None else cuda_sync_for(device)
        self.seconds = 0.0
        self.images = 0
        self._started: float | None = None

    def start(self) -> None:
        """Open the window (windows accumulate)."""
        self.sync()
        self._started = self.clock()

    def stop(self, n_images: int = 0) -> float:
        """Close the window; returns its length in seconds."""
        if self._started is None:
            raise RuntimeError("stop() without start()")
        self.sync()
        elapsed = self.clock() - self._started
        self._started = None
        self.seconds += elapsed
        self.images += int(n_images)
        return elapsed

    def summary(self) -> dict[str, Any]:
        """Total seconds, images and images/s over all windows."""
        return {
            "seconds": self.seconds,
            "images": self.images,
            "images_per_s": self.images / self.seconds if self.seconds > 0 and self.images else None,
        }


def measure_steps(
    model: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    steps: int = 5,
    warmup: int = 2,
    train_step_fn: Callable[..., Any] | None = None,
    power: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Run `warmup` + `steps` real training steps on one fixed batch (already on the device).

    Returns the StepTimer summary plus, on CUDA, the peak allocated/reserved/requested memory of the
    timed steps (peak statistics reset after warm-up) and NVML process memory; on other devices those
    fields are None with `mem_reason`. With `power`, the timed steps run under a `PowerSampler`
    (`power` dict; None fields + reason when NVML is unavailable).
    """
    from petlbench.engine.step import flush_denormals, train_step
    from petlbench.profiling.memory_cuda import read_cuda_peak, reset_cuda_peak
    from petlbench.profiling.power import PowerSampler, unavailable_power

    flush_denormals()  # a custom train_step_fn may not pass through train_step
    step_fn = train_step_fn or train_step
    if device is None:
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
    device = torch.device(device)
    n_images = int(batch["label"].shape[0])
    model.train()
    timer = StepTimer(warmup_steps=warmup, device=device)
    for i in range(warmup):
        timer.start_step()
        step_fn(model, batch, optimizer, global_step=i)
        timer.end_step(n_images)
    reset_cuda_peak(device)
    sampler = None
    if power and device.type == "cuda" and torch.cuda.is_available():
        sampler = PowerSampler(device.index if device.index is not None else torch.cuda.current_device())
    if sampler is not None:
        sampler.start()
    try:
        for i in range(steps):
            timer.start_step()
            step_fn(model, batch, optimizer, global_step=warmup + i)
            timer.end_step(n_images)
    finally:
        power_result = sampler.stop() if sampler is not None else None
    result = timer.summary() | read_cuda_peak(device)
    result["device"] = str(device)
    if power:
        result["power"] = power_result or unavailable_power(
            f"device {device} is not a CUDA device; NVML measures NVIDIA GPUs"
        )
    return result
