"""What a dataset is to petlbench: labelled image files assigned to train/val/test splits."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says which path, what is wrong and what to do."""


def printable(text: str | Path) -> str:
    """`text` safe to print and encode as UTF-8: bytes of an undecodable file name are shown as \\xNN escapes."""
    text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Sample:
    """One labelled image file."""

    path: Path
    label: int
    split: str
    sample_id: str  # unique within the dataset: a hash of the path relative to the root


@dataclass
class DatasetSource:
    """A labelled image collection with a fixed split."""

    name: str
    root: Path
    classes: list[str]
    samples: list[Sample]
    split_origin: str  # "official" (given by the layout/manifest) or "generated" (stratified 70/10/20)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad files excluded with --skip-bad-images
    allow_leakage: bool = False  # opened with allow_leakage=True (--allow-leakage): identical files across splits
    leakage: list[dict[str, Any]] = field(default_factory=list)  # those files: {sha256, files: [{path, split, label}]}

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def split(self, name: str) -> list[Sample]:
        """Samples of one split, in a stable order."""
        return [s for s in self.samples if s.split == name]

    def class_counts(self) -> dict[str, dict[str, int]]:
        """{split: {class name: count}}."""
        counts: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            tally = Counter(self.classes[s.label] for s in self.split(split))
            counts[split] = {c: tally.get(c, 0) for c in self.classes}
        return counts

    def fingerprint(self) -> str:
        """Content hash of the dataset: file identities, sizes, labels and splits (stale caches key on it)."""
        digest = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: s.sample_id):
            stat = s.path.stat()
            digest.update(f"{s.sample_id}|{s.label}|{s.split}|{stat.st_size}|{int(stat.st_mtime)}\n".encode())
        return digest.hexdigest()[:16]

    @property
    def identity(self) -> str:
        """`name@fingerprint`: tells apart datasets that share a name (reports, run records, caches)."""
        return f"{self.name}@{self.fingerprint()}"


def sample_id_for(path: Path, root: Path) -> str:
    """Stable unique id of a file: hash of its path relative to the dataset root (stems collide across classes)."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = path.resolve()
    return hashlib.sha1(rel.as_posix().encode("utf-8", "surrogateescape")).hexdigest()[:16]
