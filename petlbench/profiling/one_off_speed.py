"""Speed of a model's one-off work (FPT's preload pass) against its floor, the plain computation it contains."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from petlbench.core.method import PetlModel
from petlbench.engine.step import flush_denormals


def one_off_speed(model: PetlModel, batch_size: int, steps: int = 5, warmup: int = 1) -> dict[str, Any] | None:
    """Images/s of `model.one_off_work()` and of its floor on the same fixed images, timed alternately (so drift
    in the machine's speed hits both alike), medians over `steps` after `warmup`; None without one-off work or a
    floor. `one_off_vs_floor` = work images/s / floor images/s (1.0: the work costs no more than its floor)."""
    work = model.one_off_work()
    if work is None or work.floor is None:
        return None
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    images = torch.randn(batch_size, 3, work.size, work.size, generator=torch.Generator().manual_seed(0))
    images = images.to(next(work.module.parameters()).device)
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {"work": [], "floor": []}
    with torch.inference_mode():
        for step in range(warmup + steps):
            for name, module in (("floor", work.floor), ("work", work.module)):
                flush_denormals()
                sync()
                started = time.perf_counter()
                module(images)
                sync()
                if step >= warmup:
                    times[name].append(time.perf_counter() - started)
    work_s, floor_s = statistics.median(times["work"]), statistics.median(times["floor"])
    return {
        "one_off_images_per_s": batch_size / work_s,
        "one_off_floor_images_per_s": batch_size / floor_s,
        "one_off_vs_floor": floor_s / work_s,
        "one_off_floor": type(work.floor).__name__,
        "one_off_batch_size": batch_size,
        "one_off_res": work.size,
        "one_off_steps_timed": steps,
    }
