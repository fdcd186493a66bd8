"""Experiment-tracker output, off by default: the per-epoch history of every run written as TensorBoard scalars.

Fed by the same per-epoch callback as the console lines (`RunCallback.on_epoch_end`), so the tracker shows exactly
what the record's `history` holds. Each attempt of a run writes `<results>/<run-id>/tensorboard/<attempt>/`
(`tensorboard --logdir results`): a forced re-run gets a folder of its own instead of mixing its epochs into the
earlier attempt's curves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from petlbench.engine.callbacks import RunCallback, RunView

TRACKERS = ("tensorboard",)
TRACKER_FOLDER = "tensorboard"


class TrackerError(ValueError):
    """A tracker that is unknown or whose package is not installed."""


def check_trackers(names: Sequence[str]) -> tuple[str, ...]:
    """`names` as known trackers whose packages import; raises TrackerError saying what to do otherwise."""
    for name in names:
        if name not in TRACKERS:
            raise TrackerError(f"--log-to {name!r}: use {', '.join(TRACKERS)}")
    if "tensorboard" in names:
        try:
            import torch.utils.tensorboard  # noqa: F401 - what TensorBoardCallback writes with
        except ImportError as err:
            raise TrackerError(
                f"--log-to tensorboard needs the tensorboard package ({err}): pip install 'petlbench[tracking]'"
            ) from None
    return tuple(dict.fromkeys(names))


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a history field: its first word becomes the group ("val_auc" -> "val/auc")."""
    return key.replace("_", "/", 1)


def tracker_callbacks(names: Sequence[str]) -> list[RunCallback]:
    """One callback per tracker named (already checked by `check_trackers`)."""
    return [TensorBoardCallback() for name in names if name == "tensorboard"]


class TensorBoardCallback(RunCallback):
    """Every numeric field of each epoch's history row as a scalar at step = epoch, and the run's config as text."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_train_start(self, run: RunView) -> None:
        """Open this attempt's event folder and write the configuration."""
        from torch.utils.tensorboard import SummaryWriter

        attempt = f"{run.cfg.method}-seed{run.cfg.seed}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        folder = run.run_dir / TRACKER_FOLDER / attempt
        self.writer = SummaryWriter(log_dir=str(folder))
        config = json.dumps(run.cfg.to_dict(), indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", f"```\n{config}\n```")  # Markdown: kept as one preformatted block
        run.log(f"tensorboard: writing to {folder}")

    def on_epoch_end(self, run: RunView, entry: dict[str, Any]) -> None:
        """Write the epoch's history row."""
        for key, value in entry.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, global_step=entry["epoch"])
        self.writer.flush()  # a live `tensorboard` sees each epoch as it ends

    def on_train_end(self, run: RunView) -> None:
        """Close the event file (also after a failed epoch)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
