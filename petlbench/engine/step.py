"""One training step and the optimizer, shared by the trainer and the profilers (so both measure the same work).

`train_step`: forward (under the optional autocast context), cross-entropy on float logits plus the method's
`extra_loss()`, backward, global-norm clipping, `optimizer.step()`, `after_optimizer_step(global_step)`,
`zero_grad(set_to_none=True)`. It reads no tensor value, so it also runs on fake/meta tensors; the trainer
checks the returned loss for non-finite values itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

TrainStep = Callable[..., Any]
MakeOptimizer = Callable[..., torch.optim.Optimizer]

DEFAULT_LR = 1e-4
DEFAULT_WEIGHT_DECAY = 0.1
DEFAULT_GRAD_CLIP = 1.0


def flush_denormals() -> bool:
    """Flush denormal floats to zero on this CPU thread; returns whether the CPU supports it."""
    # Floats below 1.2e-38 (float32's smallest normal) take a microcode slow path on x86. FPT+'s prompts start at
    # N(0, 1e-6) and their AdamW moments sink into that range: one preloaded FPT+ step (ViT-B/16, 512 px, batch 2)
    # took 2.74 s instead of 0.028 s on CPU. Reading such values as 0 changes no result measurably. Training,
    # preloading, estimation and timing all pass through here (the setting is per thread, so it is set per call).
    return bool(torch.set_flush_denormal(True))


def make_optimizer(
    params: Iterable[nn.Parameter],
    foreach: bool | None = None,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
) -> torch.optim.Optimizer:
    """AdamW as the trainer builds it (betas 0.9/0.999, decay on every trainable parameter).

    `foreach=None` is torch's default: the multi-tensor path on CUDA, the for-loop on CPU. The memory
    estimator passes `foreach=True` when it predicts a CUDA run, because the foreach path allocates a
    full temporary copy of `exp_avg_sq`.
    """
    return torch.optim.AdamW(list(params), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, foreach=foreach)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter the optimizer updates, in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_step(
    model: nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    *,
    grad_clip: float = DEFAULT_GRAD_CLIP,
    global_step: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    parts: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimisation step on `batch` (a dict of views + "label"); returns the detached loss (task loss plus the
    method's regulariser). With `parts`, the detached `task` loss and `regulariser` (if any) are put there."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    flush_denormals()
    with autocast():
        logits = model(batch)
        loss = task = loss_fn(logits.float(), batch["label"])
        extra_loss = getattr(model, "extra_loss", None)  # PetlModel's hook; plain modules have none
        extra = extra_loss() if extra_loss is not None else None
        if extra is not None:
            loss = loss + extra
    if parts is not None:
        parts["task"] = task.detach()
        if extra is not None:
            parts["regulariser"] = extra.detach()
    loss.backward()
    if grad_clip and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), grad_clip)
    optimizer.step()
    after_step = getattr(model, "after_optimizer_step", None)
    if after_step is not None:
        after_step(global_step)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
