"""Figure data as a training-run callback: attention maps of a few test images for figures 6 and 9."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from petlbench.data.loading import load_image
from petlbench.engine.callbacks import Callbacks, RunCallback, RunView
from petlbench.engine.training import to_device
from petlbench.profiling.callbacks import EfficiencyCallback
from petlbench.reports.introspection import introspection_arrays, save_introspection
from petlbench.reports.tracker import tracker_callbacks


def run_callbacks(profile: bool = True, log_to: Sequence[str] = ()) -> RunCallback:
    """The observers of one run: timing, CUDA peaks and power, the estimator and FLOPs (with `profile`), the
    attention maps of figures 6 and 9, and the experiment trackers named in `log_to` (see `reports.tracker`)."""
    return Callbacks([EfficiencyCallback(estimate=profile), IntrospectionCallback(), *tracker_callbacks(log_to)])


class IntrospectionCallback(RunCallback):
    """After the final test, store the attention maps of test images taking the classes in turn (if any)."""

    def __init__(self, max_images: int = 4) -> None:
        self.max_images = max_images

    def on_test_end(self, run: RunView) -> None:
        """Ask the model to introspect a few test images; save what it returns beside the run's record."""
        dataset = run.loaders["test"].dataset
        samples = list(getattr(dataset, "samples", []))
        if not samples:
            return
        chosen = class_spread(samples, self.max_images)
        batch = to_device(default_collate([dataset[i] for i in chosen]), run.device)
        run.model.eval()
        with torch.no_grad():
            maps = run.model.introspect(batch)
        if maps is None:
            return  # this method has no attention maps to show
        # the un-normalised high-resolution view of the same images, to draw the selected tokens on
        size = run.cfg.res
        images = np.stack([np.asarray(load_image(samples[i].path).resize((size, size))) for i in chosen])
        arrays = introspection_arrays(maps, images=images, max_images=self.max_images, labels=batch["label"])
        path = save_introspection(run.run_dir, arrays)
        run.log(f"attention maps for figures 6 and 9 saved to {path}")


def class_spread(samples: list[Any], count: int) -> list[int]:
    """Indices of up to `count` samples taking the classes in turn (first of each class, then second, ...)."""
    by_class: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(index)
    queues = [by_class[label] for label in sorted(by_class)]
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen
