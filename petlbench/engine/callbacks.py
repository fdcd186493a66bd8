"""Observers of a training run: what measures it (profiling) or keeps data for figures (reports) plugs in here.

The trainer calls every callback at fixed points of a run and merges what `results()` returns into the record's
`efficiency` section; it knows nothing about what they measure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from petlbench.core.config import RunConfig
from petlbench.core.method import BuildContext, Method, PetlModel


@dataclass
class RunView:
    """What a callback may look at: the run's configuration, method, model, data and where its files go."""

    cfg: RunConfig
    method: Method
    model: PetlModel
    ctx: BuildContext
    device: torch.device
    loaders: dict[str, DataLoader]
    batch_size: int
    run_dir: Path
    log: Any = print
    extras: dict[str, Any] = field(default_factory=dict)


class RunCallback:
    """Base of run observers; every hook does nothing by default."""

    def on_model_ready(self, run: RunView) -> None:
        """The model is built, its data prepared and it is placed; training has not started."""

    def on_train_start(self, run: RunView) -> None:
        """Right before the first training step."""

    def on_step_start(self, run: RunView) -> None:
        """Before each training step (the batch is already on the device)."""

    def on_step_end(self, run: RunView, step: int, images: int) -> None:
        """After training step `step` (1-based over the run) on `images` images."""

    def on_epoch_end(self, run: RunView, entry: dict[str, Any]) -> None:
        """After each epoch's validation; `entry` is the epoch's history row."""

    def on_train_end(self, run: RunView) -> None:
        """After the last epoch (also when training raised)."""

    def on_test_end(self, run: RunView) -> None:
        """After the final test evaluation, with the best epoch's weights loaded."""

    def results(self) -> dict[str, Any]:
        """Fields for the record's `efficiency` section."""
        return {}


class Callbacks(RunCallback):
    """Several callbacks called in order; their results merged in order."""

    def __init__(self, callbacks: list[RunCallback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def on_model_ready(self, run: RunView) -> None:
        """Call every callback's `on_model_ready`."""
        for callback in self.callbacks:
            callback.on_model_ready(run)

    def on_train_start(self, run: RunView) -> None:
        """Call every callback's `on_train_start`."""
        for callback in self.callbacks:
            callback.on_train_start(run)

    def on_step_start(self, run: RunView) -> None:
        """Call every callback's `on_step_start`."""
        for callback in self.callbacks:
            callback.on_step_start(run)

    def on_step_end(self, run: RunView, step: int, images: int) -> None:
        """Call every callback's `on_step_end`."""
        for callback in self.callbacks:
            callback.on_step_end(run, step, images)

    def on_epoch_end(self, run: RunView, entry: dict[str, Any]) -> None:
        """Call every callback's `on_epoch_end`."""
        for callback in self.callbacks:
            callback.on_epoch_end(run, entry)

    def on_train_end(self, run: RunView) -> None:
        """Call every callback's `on_train_end`."""
        for callback in self.callbacks:
            callback.on_train_end(run)

    def on_test_end(self, run: RunView) -> None:
        """Call every callback's `on_test_end`."""
        for callback in self.callbacks:
            callback.on_test_end(run)

    def results(self) -> dict[str, Any]:
        """Every callback's results, later ones winning on shared keys."""
        merged: dict[str, Any] = {}
        for callback in self.callbacks:
            merged.update(callback.results())
        return merged


class EpochLog(RunCallback):
    """One plain line per epoch through `log`: epoch, train loss, validation AUC, learning rate, seconds."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def on_epoch_end(self, run: RunView, entry: dict[str, Any]) -> None:
        """Log the epoch's history row."""
        self.log(
            f"{run.cfg.method} seed {run.cfg.seed} · epoch {entry['epoch']}/{run.cfg.epochs} · train loss "
            f"{entry['train_loss']:.4f} · val AUC {entry['val_auc']:.2f} · lr {entry['lr']:.2e} · "
            f"{entry['epoch_train_seconds']:.1f} s"
        )
