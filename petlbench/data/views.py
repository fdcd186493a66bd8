"""Turn samples into the tensors a method asks for: one tensor per named view, plus the label."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from petlbench.core.method import View
from petlbench.data.loading import load_image
from petlbench.data.source import Sample


def view_transform(view: View, train: bool, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The papers' protocol: train = flip, colour jitter, random-resized crop; eval = plain resize."""
    normalise = [T.ToTensor(), T.Normalize(mean, std)]
    if train and view.augment:
        return T.Compose(
            [
                T.RandomHorizontalFlip(0.5),
                T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.0, hue=0.0),
                T.RandomResizedCrop(view.size, scale=(0.8, 1.0), ratio=(0.7, 1.3), antialias=True),
                *normalise,
            ]
        )
    return T.Compose([T.Resize((view.size, view.size), antialias=True), *normalise])


class ViewDataset(Dataset):
    """Samples decoded once per access and rendered into every requested view."""

    def __init__(
        self,
        samples: Sequence[Sample],
        views: Mapping[str, View],
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.samples = list(samples)
        self.views = dict(views)
        self.train = train
        self.mean, self.std = tuple(mean), tuple(std)
        self.transforms = {name: view_transform(v, train, mean, std) for name, v in self.views.items()}

    def with_views(self, views: Mapping[str, View], train: bool | None = None) -> ViewDataset:
        """The same samples rendered into other views (e.g. the deterministic LPM view for preloading)."""
        return ViewDataset(self.samples, views, self.train if train is None else train, self.mean, self.std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = load_image(sample.path)
        item: dict[str, Any] = {name: tf(image) for name, tf in self.transforms.items()}
        item["label"] = torch.tensor(sample.label, dtype=torch.long)
        item["index"] = torch.tensor(index, dtype=torch.long)
        return item
