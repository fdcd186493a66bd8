"""Training augmentation depends only on (seed, epoch, sample index): not on workers, global RNG or call order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from petlbench.core.method import View
from petlbench.data.loading import load_image
from petlbench.data.source import Sample, sample_id_for
from petlbench.data.views import EpochSampler, ViewDataset, augmentation_seed, split_key, view_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
VIEWS = {"image": View(16, augment=True)}


def make_samples(root: Path, count: int = 6, same_image: bool = False) -> list[Sample]:
    """Tiny noise PNGs (one shared picture when `same_image`, so only augmentation tells items apart)."""
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, size=(20, 26, 3), dtype=np.uint8)
    samples = []
    for i in range(count):
        path = root / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = picture if same_image else rng.integers(0, 256, size=(20 + i, 26, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        samples.append(Sample(path, i % 2, "train", sample_id_for(path, root)))
    return samples


def dataset(samples: list[Sample], train: bool = True, seed: int = 0, views: dict[str, View] | None = None):
    return ViewDataset(samples, views or VIEWS, train=train, mean=MEAN, std=STD, seed=seed)


def epochs_of(loader: DataLoader, epochs: int) -> list[tuple[list[int], torch.Tensor]]:
    """(indices, images) of every epoch of `loader`, iterated once per epoch like the trainer does."""
    out = []
    for _ in range(epochs):
        indices, images = [], []
        for batch in loader:
            indices += batch["index"].tolist()
            images.append(batch["image"])
        out.append((indices, torch.cat(images)))
    return out


def test_same_key_gives_the_same_pixels_whatever_the_global_rng(tmp_path: Path) -> None:
    ds = dataset(make_samples(tmp_path))
    first = ds[(2, 3)]["image"]
    torch.manual_seed(123)
    torch.rand(1000)  # e.g. a method whose model construction draws random numbers
    torch.nn.Linear(50, 50)
    assert torch.equal(ds[(2, 3)]["image"], first)
    torch.manual_seed(7)
    assert torch.equal(dataset(make_samples(tmp_path / "again"))[(2, 3)]["image"], first)  # same files, new dataset
    state = torch.get_rng_state()
    ds[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # augmenting draws nothing from the global stream


def test_augmentation_does_not_depend_on_the_worker_count(tmp_path: Path) -> None:
    ds = dataset(make_samples(tmp_path))
    runs = []
    for workers in (0, 2):
        torch.manual_seed(workers)  # a different global state for each run as well
        sampler = EpochSampler(len(ds), seed=11, shuffle=True)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, drop_last=True, num_workers=workers)
        runs.append(epochs_of(loader, epochs=2))
    for (idx_a, img_a), (idx_b, img_b) in zip(*runs, strict=True):
        assert idx_a == idx_b
        assert torch.equal(img_a, img_b)
    (order0, images0), (order1, images1) = runs[0]
    assert sorted(order0) == sorted(order1) == list(range(len(ds))) and order0 != order1  # reshuffled per epoch
    same = [images0[order0.index(i)] for i in range(len(ds))], [images1[order1.index(i)] for i in range(len(ds))]
    assert all(not torch.equal(a, b) for a, b in zip(*same, strict=True))  # epoch 1 augments differently


def test_different_epochs_indices_and_seeds_differ(tmp_path: Path) -> None:
    samples = make_samples(tmp_path, same_image=True)
    ds = dataset(samples, seed=0)
    base = ds[(0, 0)]["image"]
    assert not torch.equal(base, ds[(1, 0)]["image"])
    assert not torch.equal(base, ds[(0, 1)]["image"])  # the same picture at another index
    assert not torch.equal(base, dataset(samples, seed=1)[(0, 0)]["image"])
    keys = {augmentation_seed(s, e, i) for s in range(3) for e in range(3) for i in range(3)}
    assert len(keys) == 27


def test_eval_views_are_unaffected(tmp_path: Path) -> None:
    samples = make_samples(tmp_path)
    plain = view_transform(View(16), train=False, mean=MEAN, std=STD)
    expected = [plain(load_image(s.path)) for s in samples]
    evaluation = dataset(samples, train=False, seed=3)
    fixed = dataset(samples, train=True, views={"lpm": View(16, augment=False)})
    for i, want in enumerate(expected):
        assert torch.equal(evaluation[i]["image"], want)
        assert torch.equal(evaluation[(5, i)]["image"], want)
        assert torch.equal(fixed[(4, i)]["lpm"], want)
        assert evaluation[(5, i)]["index"].item() == i and evaluation[i]["label"].item() == samples[i].label


def test_augmentation_matches_torchvision_transforms_for_the_same_seed(tmp_path: Path) -> None:
    """Same distribution as flip(0.5) + ColorJitter(0.2, 0.2) + RandomResizedCrop(scale 0.8-1, ratio 0.7-1.3)."""
    samples = make_samples(tmp_path)
    ds = dataset(samples, seed=9, views={"image": View(16), "big": View(24)})
    for epoch in range(3):
        for index in range(len(samples)):
            item = ds[(epoch, index)]
            image = load_image(samples[index].path)
            for name, size in (("image", 16), ("big", 24)):
                reference = view_transform(View(size), train=True, mean=MEAN, std=STD)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(augmentation_seed(9, epoch, index))
                    want = reference(image)
                assert torch.equal(item[name], want), (epoch, index, name)


def test_epoch_sampler_yields_epoch_keys() -> None:
    sampler = EpochSampler(10, seed=4, shuffle=True)
    first, second = list(sampler), list(sampler)
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert sorted(i for _, i in first) == list(range(10)) and first != [(0, i) for i in range(10)]
    assert [i for _, i in first] != [i for _, i in second]
    again = EpochSampler(10, seed=4, shuffle=True)
    assert list(again) == first and list(again) == second
    again.set_epoch(1)
    assert list(again) == second and again.epoch == 2
    assert list(EpochSampler(10, seed=5, shuffle=True)) != first
    ordered = EpochSampler(range(4), seed=4, shuffle=False)
    assert list(ordered) == [(0, 0), (0, 1), (0, 2), (0, 3)] and list(ordered)[0] == (1, 0)
    assert len(sampler) == 10


def test_plain_int_keys_and_with_views_keep_working(tmp_path: Path) -> None:
    ds = dataset(make_samples(tmp_path), seed=2)
    assert torch.equal(ds[3]["image"], ds[(0, 3)]["image"]) and ds[3]["index"].item() == 3
    ds.set_epoch(2)
    assert torch.equal(ds[3]["image"], ds[(2, 3)]["image"])
    other = ds.with_views({"copy": View(16)})
    assert other.seed == 2 and torch.equal(other[(2, 3)]["copy"], ds[(2, 3)]["image"])
    assert split_key(5) == (None, 5) and split_key((1, 5)) == (1, 5) and split_key(torch.tensor(4)) == (None, 4)
    with pytest.raises(TypeError):
        split_key("3")
