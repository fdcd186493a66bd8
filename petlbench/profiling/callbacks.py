"""The profilers as a training-run callback: estimate and FLOPs before training, timed steps, CUDA peaks and NVML
power while it trains."""

from __future__ import annotations

from typing import Any

import torch

from petlbench.engine.callbacks import RunCallback, RunView
from petlbench.profiling.memory_cuda import read_cuda_peak, reset_cuda_peak
from petlbench.profiling.power import PowerSampler, unavailable_power
from petlbench.profiling.profile import run_efficiency
from petlbench.profiling.timing import StepTimer

# Steps before the steady state: the CUDA peak is reset after them (optimizer state exists from then on) and the
# step timer ignores them.
WARMUP_STEPS = 2


class EfficiencyCallback(RunCallback):
    """Per-run efficiency: the estimator and FLOPs (before training), step throughput, measured CUDA peaks, power."""

    def __init__(self, estimate: bool = True, warmup_steps: int = WARMUP_STEPS) -> None:
        self.estimate = estimate
        self.warmup_steps = warmup_steps
        self.fields: dict[str, Any] = {}
        self.timer: StepTimer | None = None
        self.power: PowerSampler | None = None
        self.device = torch.device("cpu")

    def on_model_ready(self, run: RunView) -> None:
        """Estimate memory and count FLOPs on a structural copy of the model (unless `estimate` is off)."""
        if self.estimate:
            self.fields.update(run_efficiency(run.model, run.method, run.ctx, run.batch_size, run.device))

    def on_train_start(self, run: RunView) -> None:
        """Start the step timer and, on an NVIDIA GPU, the power sampler."""
        self.device = run.device
        self.timer = StepTimer(warmup_steps=self.warmup_steps, device=run.device)
        if run.device.type == "cuda":
            index = run.device.index if run.device.index is not None else torch.cuda.current_device()
            self.power = PowerSampler(index)
            self.power.start()

    def on_step_start(self, run: RunView) -> None:
        """Time the step."""
        if self.timer is not None:
            self.timer.start_step()

    def on_step_end(self, run: RunView, step: int, images: int) -> None:
        """Stop the step's clock; after the warm-up, restart the CUDA peak statistics."""
        if self.timer is not None:
            self.timer.end_step(images)
        if step == self.warmup_steps:
            reset_cuda_peak(run.device)

    def on_train_end(self, run: RunView) -> None:
        """Throughput, measured CUDA peaks and power (None fields with reasons where unavailable)."""
        if self.timer is not None:
            summary = self.timer.summary()
            summary.pop("step_seconds", None)
            self.fields.update(summary)
        self.fields.update(read_cuda_peak(run.device))
        if self.power is not None:
            self.fields["power"] = self.power.stop()
        else:
            self.fields["power"] = unavailable_power(f"{run.device} is not an NVIDIA GPU: NVML power needs one")

    def results(self) -> dict[str, Any]:
        """Everything measured, plus the memory figure the tables use (`peak_mem_mb` and its source)."""
        fields = dict(self.fields)
        if fields.get("measured_peak_allocated_mb") is not None:
            fields["peak_mem_mb"], fields["peak_mem_source"] = fields["measured_peak_allocated_mb"], "measured"
        elif fields.get("est_peak_mem_mb") is not None:
            fields["peak_mem_mb"], fields["peak_mem_source"] = fields["est_peak_mem_mb"], "estimated"
        else:
            fields["peak_mem_mb"], fields["peak_mem_source"] = None, None
        return fields
