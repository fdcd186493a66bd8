"""Dataset cards: one YAML file per dataset of the papers with its facts, protocol settings and where to get it."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petlbench.core.yamlfile import read_yaml
from petlbench.data.source import DatasetError


def shipped_folder(name: str) -> Path:
    """A folder of YAML files from the project's `datasets/` (`cards`, `sweeps`), installed or in the checkout."""
    package = Path(__file__).resolve().parents[1]
    installed, checkout = package / "datasets" / name, package.parent / "datasets" / name
    return installed if installed.is_dir() else checkout


CARDS_DIR = shipped_folder("cards")
DATA_ROOT_ENV = "PETLBENCH_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"  # relative to the working directory when $PETLBENCH_DATA_ROOT is not set
SPLIT_POLICIES = ("official", "70/10/20")
REQUIRED = (
    "key",
    "name",
    "modality",
    "num_classes",
    "layout",
    "split",
    "lr",
    "weight_decay",
    "mean",
    "std",
    "source",
)


class CardError(DatasetError):
    """A dataset card that is missing, unknown or malformed."""


@dataclass(frozen=True)
class DatasetCard:
    """What petlbench knows about one dataset before seeing its files."""

    key: str
    name: str
    modality: str
    num_classes: int
    layout: str  # the expected on-disk layout, in words
    split: str  # "official" or "70/10/20"
    lr: float  # base learning rate of the authors' config (AdamW)
    weight_decay: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where to get the data, in words
    root: str = ""  # data folder; "${PETLBENCH_DATA_ROOT}" expands to $PETLBENCH_DATA_ROOT or ./data
    classes: tuple[str, ...] = ()
    task: str = ""
    images: str = ""  # published size, as text
    notes: str = ""
    path: Path = field(default=Path(), compare=False)

    def data_root(self) -> Path:
        """Where the card expects the data: `root` with the environment expanded, made absolute."""
        template = self.root or f"${{{DATA_ROOT_ENV}}}/{self.key}"
        base = os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
        text = template.replace(f"${{{DATA_ROOT_ENV}}}", base).replace(f"${DATA_ROOT_ENV}", base)
        return Path(os.path.expandvars(text)).expanduser().absolute()

    def to_dict(self) -> dict[str, Any]:
        """The card as plain data, with the resolved data root."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "path"}
        data.update(mean=list(self.mean), std=list(self.std), classes=list(self.classes))
        data["data_root"] = str(self.data_root())
        return data


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _triple(value: Any, what: str, path: Path) -> tuple[float, float, float]:
    """A per-channel value: one number (all channels) or a list of three."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    raise CardError(f"dataset card {path}: '{what}' must be a number or a list of 3 numbers (R, G, B), got {value!r}")


def parse_card(data: Any, path: Path) -> DatasetCard:
    """Validate the YAML content of a card file and build the card; errors name the file and the field."""
    if not isinstance(data, dict):
        raise CardError(f"dataset card {path}: expected a mapping of fields, got {type(data).__name__}")
    missing = [k for k in REQUIRED if data.get(k) in (None, "")]
    if missing:
        raise CardError(f"dataset card {path}: missing field(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    unknown = [k for k in data if k not in DatasetCard.__dataclass_fields__ or k == "path"]
    if unknown:
        raise CardError(f"dataset card {path}: unknown field(s) {', '.join(map(str, unknown))}")
    try:
        num_classes = int(data["num_classes"])
        lr, weight_decay = float(data["lr"]), float(data["weight_decay"])
    except (TypeError, ValueError) as err:
        raise CardError(f"dataset card {path}: num_classes, lr and weight_decay must be numbers ({err})") from None
    if num_classes < 2:
        raise CardError(f"dataset card {path}: num_classes must be at least 2, got {num_classes}")
    if lr <= 0 or weight_decay < 0:
        raise CardError(f"dataset card {path}: lr must be > 0 and weight_decay >= 0")
    if data["split"] not in SPLIT_POLICIES:
        raise CardError(f"dataset card {path}: split must be one of {', '.join(SPLIT_POLICIES)}, got {data['split']!r}")
    classes = tuple(str(c) for c in data.get("classes") or ())
    if classes and len(classes) != num_classes:
        raise CardError(f"dataset card {path}: {len(classes)} classes listed but num_classes is {num_classes}")
    std = _triple(data["std"], "std", path)
    if min(std) <= 0:
        raise CardError(f"dataset card {path}: std values must be positive, got {std}")
    return DatasetCard(
        key=str(data["key"]),
        name=str(data["name"]),
        modality=str(data["modality"]),
        num_classes=num_classes,
        layout=str(data["layout"]).strip(),
        split=str(data["split"]),
        lr=lr,
        weight_decay=weight_decay,
        mean=_triple(data["mean"], "mean", path),
        std=std,
        source=str(data["source"]).strip(),
        root=str(data.get("root") or ""),
        classes=classes,
        task=str(data.get("task") or ""),
        images=str(data.get("images") or ""),
        notes=str(data.get("notes") or "").strip(),
        path=path,
    )


def read_card(path: str | Path) -> DatasetCard:
    """Load and validate one card file."""
    path = Path(path)
    return parse_card(read_yaml(path, "dataset card", CardError), path)


def card_files() -> list[Path]:
    """The built-in card files, sorted."""
    return sorted(CARDS_DIR.glob("*.yaml"))


def list_cards() -> list[DatasetCard]:
    """All built-in cards (each validated), sorted by key."""
    cards = [read_card(p) for p in card_files()]
    seen: dict[str, Path] = {}
    for card in cards:
        if card.key in seen:
            raise CardError(f"dataset cards {seen[card.key]} and {card.path} both use key {card.key!r}")
        seen[card.key] = card.path
    return sorted(cards, key=lambda c: c.key)


def load_card(name: str | Path) -> DatasetCard:
    """A card by key or name (case, spaces and dashes ignored: 'ISIC 2018' = 'isic2018'), or from a .yaml path."""
    text = str(name)
    if text.endswith((".yaml", ".yml")) and Path(text).is_file():
        return read_card(text)
    wanted = _normalise(text)
    cards = list_cards()
    for card in cards:
        if wanted in (_normalise(card.key), _normalise(card.name)):
            return card
    keys = [c.key for c in cards]
    close = difflib.get_close_matches(text.lower(), keys, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CardError(f"no dataset card named {text!r} (known cards: {', '.join(keys)}){hint}")
