"""Turn samples into the tensors a method asks for: one tensor per named view, plus the label.

Training augmentation is a pure function of (seed, epoch, sample index): each item draws its flip, colour jitter and
crop from its own generator, seeded from a hash of that triple, never from the global torch RNG. So augmented pixels
do not depend on the DataLoader worker count, on random numbers a method's model construction consumed, or on the
order items are fetched in, and two methods run with one seed train on identical augmented images. An item key is a
sample index or an (epoch, index) pair; `EpochSampler` yields such pairs.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from petlbench.core.method import View
from petlbench.data.loading import load_image
from petlbench.data.source import Sample

ItemKey = int | tuple[int, int]  # a sample index, or (epoch, sample index)

FLIP_P = 0.5
BRIGHTNESS = (0.8, 1.2)  # ColorJitter(brightness=0.2)
CONTRAST = (0.8, 1.2)  # ColorJitter(contrast=0.2)
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (0.7, 1.3)


def view_transform(view: View, train: bool, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """The papers' protocol: train = flip, colour jitter, random-resized crop; eval = plain resize.

    The training pipeline draws from the global torch RNG; `ViewDataset` renders the same transforms from a
    per-item generator instead (`augment_image`), value for value equal to this pipeline seeded alike.
    """
    normalise = [T.ToTensor(), T.Normalize(mean, std)]
    if train and view.augment:
        return T.Compose(
            [
                T.RandomHorizontalFlip(FLIP_P),
                T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.0, hue=0.0),
                T.RandomResizedCrop(view.size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
                *normalise,
            ]
        )
    return T.Compose([T.Resize((view.size, view.size), antialias=True), *normalise])


def _hash_seed(*parts: object) -> int:
    """A 63-bit seed from a hash of `parts` (stable across processes and Python versions)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The generator seed of the augmentation of sample `index` in `epoch` of a run seeded `seed`."""
    return _hash_seed("petlbench-augment", int(seed), int(epoch), int(index))


def shuffle_seed(seed: int, epoch: int) -> int:
    """The generator seed of the training order of `epoch` of a run seeded `seed`."""
    return _hash_seed("petlbench-shuffle", int(seed), int(epoch))


def split_key(key: Any) -> tuple[int | None, int]:
    """(epoch or None, sample index) of an item key: an integer index or an (epoch, index) pair."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"an item key is an index or an (epoch, index) pair, not {key!r}")
        return operator.index(key[0]), operator.index(key[1])
    if isinstance(key, (str, bytes)):
        raise TypeError(f"an item key is an index or an (epoch, index) pair, not {key!r}")
    return None, operator.index(key)


@dataclass(frozen=True)
class Augmentation:
    """One draw of the training transforms: flip, colour-jitter order and factors, crop box (top, left, h, w)."""

    flip: bool
    jitter_order: tuple[int, ...]  # ColorJitter's random order of its four ops: 0 brightness, 1 contrast
    brightness: float
    contrast: float
    crop: tuple[int, int, int, int]


def draw_augmentation(width: int, height: int, generator: torch.Generator) -> Augmentation:
    """Draw the transforms for a `width` x `height` image, in torchvision's order and with its formulas."""
    flip = bool(torch.rand(1, generator=generator) < FLIP_P)
    order = tuple(int(v) for v in torch.randperm(4, generator=generator))
    brightness = float(torch.empty(1).uniform_(BRIGHTNESS[0], BRIGHTNESS[1], generator=generator))
    contrast = float(torch.empty(1).uniform_(CONTRAST[0], CONTRAST[1], generator=generator))
    return Augmentation(flip, order, brightness, contrast, _crop_box(width, height, generator))


def _crop_box(width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params with an explicit generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(CROP_SCALE[0], CROP_SCALE[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator))
        aspect_ratio = aspect.item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)  # fallback: central crop
    if in_ratio < min(CROP_RATIO):
        w, h = width, int(round(width / min(CROP_RATIO)))
    elif in_ratio > max(CROP_RATIO):
        w, h = int(round(height * max(CROP_RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_image(image: Image.Image, aug: Augmentation, size: int) -> Image.Image:
    """Apply one draw: flip, brightness/contrast in the drawn order, then crop and resize to `size` (antialiased)."""
    if aug.flip:
        image = F.hflip(image)
    for op in aug.jitter_order:
        if op == 0:
            image = F.adjust_brightness(image, aug.brightness)
        elif op == 1:
            image = F.adjust_contrast(image, aug.contrast)
    top, left, h, w = aug.crop
    return F.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)


class ViewDataset(Dataset):
    """Samples decoded once per access and rendered into every requested view.

    Keys are a sample index or an (epoch, index) pair (`EpochSampler`); a bare index means (`epoch`, index).
    Augmenting views of a training dataset draw from a generator seeded by (`seed`, epoch, index) only; every
    augmenting view of one item gets the same draw (same flip, jitter and crop box of the source image).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        views: Mapping[str, View],
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.views = dict(views)
        self.train = train
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.transforms = {name: view_transform(v, train, mean, std) for name, v in self.views.items()}
        self.normalise = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def with_views(self, views: Mapping[str, View], train: bool | None = None) -> ViewDataset:
        """The same samples rendered into other views (e.g. the deterministic LPM view for preloading)."""
        train = self.train if train is None else train
        return ViewDataset(self.samples, views, train, self.mean, self.std, seed=self.seed, epoch=self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that bare integer keys stand for."""
        self.epoch = int(epoch)

    def augmenting(self) -> list[str]:
        """Names of the views that are augmented (none unless training)."""
        return [name for name, v in self.views.items() if self.train and v.augment]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        epoch, index = split_key(key)
        epoch = self.epoch if epoch is None else epoch
        sample = self.samples[index]
        image = load_image(sample.path)
        augmenting = self.augmenting()
        aug = None
        if augmenting:
            generator = torch.Generator()
            generator.manual_seed(augmentation_seed(self.seed, epoch, index))
            aug = draw_augmentation(image.width, image.height, generator)
        item: dict[str, Any] = {}
        for name, transform in self.transforms.items():
            if aug is not None and name in augmenting:
                item[name] = self.normalise(augment_image(image, aug, self.views[name].size))
            else:
                item[name] = transform(image)
        item["label"] = torch.tensor(sample.label, dtype=torch.long)
        item["index"] = torch.tensor(index, dtype=torch.long)
        return item


class EpochSampler(Sampler[tuple[int, int]]):
    """(epoch, index) keys for `ViewDataset`: a (seed, epoch)-seeded shuffle, or in order when not `shuffle`.

    Each `iter()` is the next epoch (0, 1, 2, ...), so a DataLoader iterated once per epoch passes the epoch to
    the dataset; `set_epoch` sets it explicitly (e.g. on resume).
    """

    def __init__(self, data: Sized | int, seed: int = 0, shuffle: bool = True, epoch: int = 0) -> None:
        super().__init__()
        self.size = data if isinstance(data, int) else len(data)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields."""
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        """Sample indices of `epoch` in the order they are yielded."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(shuffle_seed(self.seed, epoch))
        return [int(i) for i in torch.randperm(self.size, generator=generator)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        return iter([(epoch, i) for i in self.order(epoch)])

    def __len__(self) -> int:
        return self.size
