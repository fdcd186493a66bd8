"""Open a dataset from a folder, a CSV manifest or a card: validate its images, fix its split, get mean/std.

Accepted layouts:

- split folders ``ROOT/{train,val,test}/<class>/<image>`` (``val`` may be ``valid``/``validation``): the official
  split; without a ``val`` folder a stratified validation set of 1/8 of the training images is drawn;
- a CSV manifest ``path,label[,split]`` (the .csv file, or a folder holding ``manifest.csv``, which then wins over
  the folder's subfolders); paths are relative to the CSV's folder, labels are class names or integers;
- class folders ``ROOT/<class>/<image>`` (images may sit in subfolders of a class folder), or a manifest without
  a split column: a stratified 70/10/20 split drawn with a fixed seed, saved to ``split_dir/split.csv`` and
  reused while the file set is unchanged (``split_dir_for`` gives each data folder its own ``split_dir``).

Labels are kept as written (``1`` and ``01`` are two classes). Folder symlinks are followed only when they stay
inside their class folder. Every image is read once: decoded to validate it (``load_image``) and hashed (sha256 of
its bytes); the verdict, the hash and the image's 128-px channel statistics are cached per file, keyed by (path,
size, mtime), in ``split_dir`` or the user cache folder. Identical files in more than one split are leakage: opening
the dataset for a run refuses it unless ``allow_leakage``.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from petlbench.core.atomic import write_json_atomic, write_text_atomic
from petlbench.data.cards import CardError, DatasetCard, load_card
from petlbench.data.loading import IMAGE_SUFFIXES, BadImageError, load_image
from petlbench.data.source import SPLITS, DatasetError, DatasetSource, Sample, printable, sample_id_for

__all__ = [
    "DatasetError",
    "adopt_legacy_split",
    "assign_splits",
    "find_leakage",
    "open_dataset",
    "split_dir_for",
    "survey",
    "user_cache_dir",
]

Log = Callable[[str], None]

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
GENERATED_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
VAL_FROM_TRAIN = 0.125  # 10 % of the data out of a 80 % training set
MANIFEST_NAME = "manifest.csv"
LOCAL_CARD = "dataset.yaml"
SPLIT_FILE = "split.csv"
SPLIT_META = "split.json"
CHECK_FILE = "image_check.json"
STATS_FILE = "stats.json"
CHECK_VERSION = 2  # 2: entries [size, mtime_ns, reason, stats, sha256]; version 1 entries (no sha256) still count
READ_CHECK_VERSIONS = (1, 2)
# The official "auto" routine resizes to 512 px; 128 px gives nearly the same statistics, 16x cheaper.
STATS_SIZE = 128
PATH_COLUMNS = ("path", "file", "filename", "image", "image_path", "filepath")
LABEL_COLUMNS = ("label", "class", "target", "category")
SPLIT_COLUMNS = ("split", "set", "subset")
JUNK_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}  # OS droppings, never images or class folders


@dataclass
class Entry:
    """A candidate image: its path, class name and the split its layout gives it (None: to be drawn)."""

    path: Path
    label: str
    split: str | None = None


@dataclass
class Inventory:
    """The files and classes a layout names, before any image is decoded."""

    name: str
    root: Path
    layout: str  # "split folders", "class folders", "manifest"
    classes: list[str]  # every class the layout names, empty ones included, in class-index order
    entries: list[Entry]
    card: DatasetCard | None = None
    local_card: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings found while scanning

    @property
    def has_split(self) -> bool:
        """Whether the layout assigns splits itself."""
        return any(e.split is not None for e in self.entries)


@dataclass(frozen=True)
class FileCheck:
    """Verdict on one file: `reason` is None for a good image; `stats` = 128-px channel means and mean squares."""

    reason: str | None
    stats: tuple[float, ...] | None = None
    sha256: str | None = None  # of the file's bytes (leakage across splits)


@dataclass
class Survey:
    """An inventory plus the verdict on every file."""

    inventory: Inventory
    checks: dict[Path, FileCheck]
    cache_dir: Path

    @property
    def bad(self) -> list[dict[str, str]]:
        """Unusable files as {path, reason}, in inventory order."""
        return [
            {"path": printable(e.path), "reason": self.checks[e.path].reason or ""}
            for e in self.inventory.entries
            if self.checks[e.path].reason is not None
        ]

    @property
    def good(self) -> list[Entry]:
        """Entries whose file decoded."""
        return [e for e in self.inventory.entries if self.checks[e.path].reason is None]


# ----------------------------------------------------------------------------------------------------------------
# Locating the data


def user_cache_dir() -> Path:
    """petlbench's cache folder: $PETLBENCH_CACHE, else $XDG_CACHE_HOME/petlbench, else ~/.cache/petlbench."""
    env = os.environ.get("PETLBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "petlbench"


def _layouts_text() -> str:
    return (
        "ROOT/{train,val,test}/<class>/<image> (official split), ROOT/<class>/<image> (a stratified 70/10/20 "
        "split is drawn), or a CSV manifest with columns path,label[,split] (the .csv file or ROOT/manifest.csv)"
    )


def missing_data_message(card: DatasetCard, root: Path) -> str:
    """What to tell a user whose card names a data folder that does not exist."""
    return (
        f"dataset card {card.key!r} ({card.name}, {card.modality}, {card.num_classes} classes): no data at {root}.\n"
        f"  Get the data from: {card.source}\n"
        f"  Expected layout: {card.layout}\n"
        f"  Then put it at {root}, or set PETLBENCH_DATA_ROOT to the folder holding '{card.key}/', "
        "or pass the data folder itself as --dataset."
    )


def locate(spec: str | Path | None, log: Log) -> tuple[Path, DatasetCard | None]:
    """Turn a dataset spec into (data path, card or None); a missing path or card data is a DatasetError."""
    if spec is None:
        from . import synthetic

        root = synthetic.embedded_default(log=log)
        count = synthetic.EMBEDDED_CLASSES * synthetic.EMBEDDED_N_PER_CLASS
        log(
            f"no --dataset given: using the embedded synthetic dataset {synthetic.EMBEDDED_NAME} "
            f"({synthetic.EMBEDDED_CLASSES} classes, {count} fundus-like {synthetic.EMBEDDED_SIZE}-px images "
            f"whose class is set by lesions a few pixels wide) at {root}"
        )
        return root, None
    text = str(spec)
    path = Path(text).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        card = load_card(path)
    elif path.exists():
        return path, None
    else:
        try:
            found: DatasetCard | None = load_card(text)
        except CardError:
            found = None
        if found is None:
            from petlbench.data.cards import list_cards

            keys = [c.key for c in list_cards()]
            close = difflib.get_close_matches(text.lower(), keys, n=2, cutoff=0.6)
            hint = f" Did you mean the card {' or '.join(repr(c) for c in close)}?" if close else ""
            raise DatasetError(
                f"dataset {text!r} not found: there is no file or folder {path.absolute()} and no dataset card of "
                f"that name (cards: {', '.join(keys)}).{hint} Pass an image folder, a CSV manifest or a card "
                f"name; layouts: {_layouts_text()}."
            )
        card = found
    root = card.data_root()
    if not root.exists():
        raise DatasetError(missing_data_message(card, root))
    return root, card


def data_location(spec: str | Path | None) -> Path:
    """Where the data `spec` names is or would be, found as `locate` does but generating and logging nothing."""
    if spec is None:
        from . import synthetic

        return synthetic.data_home() / synthetic.EMBEDDED_NAME
    path = Path(str(spec)).expanduser()
    if path.exists() and not (path.suffix.lower() in (".yaml", ".yml") and path.is_file()):
        return path
    try:
        return load_card(path if path.exists() else str(spec)).data_root()
    except CardError:
        return path


def path_digest(path: Path) -> str:
    """Short hash of a path made absolute with symlinks resolved: the same data however it is reached."""
    return hashlib.sha1(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:10]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "dataset"


def split_dir_for(results: str | Path, spec: str | Path | None) -> Path:
    """`RESULTS/datasets/<name>-<hash of the data's real path>`: where runs keep `spec`'s split, stats and verdicts.

    Two data folders with the same name get different folders (the old `RESULTS/datasets/<name>` was shared).
    """
    name = "synthetic" if spec is None else (Path(str(spec)).name or str(spec))
    return Path(results) / "datasets" / f"{_slug(name)}-{path_digest(data_location(spec))}"


def legacy_split_dir(results: str | Path, spec: str | Path | None) -> Path:
    """The folder runs used before `split_dir_for`: `RESULTS/datasets/<name>`, shared by all data of that name."""
    name = "synthetic" if spec is None else (re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(spec)).name or str(spec)))
    return Path(results) / "datasets" / (name or "dataset")


def adopt_legacy_split(results: str | Path, spec: str | Path | None, log: Log = print) -> Path:
    """`split_dir_for(results, spec)`; a new one first receives the legacy folder's split (a hand edit survives)
    when that split was saved for this same data (its split.json names this data's real path)."""
    target = split_dir_for(results, spec)
    legacy = legacy_split_dir(results, spec)
    if target.exists() or not (legacy / SPLIT_FILE).is_file():
        return target
    location = data_location(spec).resolve()
    root = location.parent if location.is_file() else location
    if _read_json(legacy / SPLIT_META).get("root") != str(root):
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in (SPLIT_FILE, SPLIT_META, STATS_FILE):
        with contextlib.suppress(OSError):
            write_text_atomic(target / name, (legacy / name).read_text(encoding="utf-8"))
    log(f"note: {printable(target)} starts from the split saved for {printable(root)} in {printable(legacy)}")
    return target


# ----------------------------------------------------------------------------------------------------------------
# Scanning layouts


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in JUNK_NAMES


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _list_images(folder: Path, notes: list[str]) -> list[Path]:
    """Image files under the class folder `folder` (recursively, sorted); other non-hidden files are reported in
    `notes`, and so are folder symlinks leading out of `folder` (to its parent, another class...), not followed."""
    images: list[Path] = []
    others: list[Path] = []
    outside: list[str] = []
    visited: set[str] = set()
    home = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        visited.add(real)
        kept = []
        for d in sorted(d for d in dirnames if not _is_hidden(Path(d))):
            link = os.path.join(dirpath, d)
            target = os.path.realpath(link)
            if os.path.islink(link) and not _inside(target, home):
                outside.append(f"{printable(link)} -> {printable(target)}")
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_hidden(path):
                continue
            (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    if others:
        example = others[0]
        notes.append(
            f"ignored {len(others)} file(s) without an image suffix under {printable(folder)} (e.g. "
            f"{printable(example.name)}); "
            f"image suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    if outside:
        notes.append(
            f"ignored {len(outside)} folder symlink(s) in {printable(folder)} leading out of that class folder (their "
            f"images would be counted as class {printable(folder.name)}): {'; '.join(outside)}. Link the image files "
            "themselves, or make the class folder itself the link"
        )
    return images


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p))


def _loose_images(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _split_dirs(root: Path) -> dict[str, Path]:
    """{canonical split: folder} for the split-named subfolders of `root`; two names for one split is an error."""
    found: dict[str, Path] = {}
    for child in _subdirs(root):
        canonical = SPLIT_ALIASES.get(child.name.lower())
        if canonical is None:
            continue
        if canonical in found:
            raise DatasetError(
                f"{root} has both {found[canonical].name}/ and {child.name}/ for the {canonical} split; "
                "keep one of them"
            )
        found[canonical] = child
    return found


def _scan_split_folders(root: Path, split_dirs: dict[str, Path], notes: list[str]) -> tuple[list[str], list[Entry]]:
    names = ", ".join(f"{p.name}/" for p in split_dirs.values())
    for needed in ("train", "test"):
        if needed not in split_dirs:
            raise DatasetError(
                f"{root} has split folders ({names}) but no {needed}/ folder. Use ROOT/{{train,val,test}}/<class>/"
                f"<image> (val may be missing: it is then drawn from train), or put all images in ROOT/<class>/ "
                "for a generated 70/10/20 split."
            )
    others = [p.name for p in _subdirs(root) if p.name.lower() not in SPLIT_ALIASES]
    if others:
        notes.append(f"ignored folder(s) {', '.join(others)} next to the split folders in {root}")
    classes: set[str] = set()
    entries: list[Entry] = []
    for split in SPLITS:
        folder = split_dirs.get(split)
        if folder is None:
            continue
        loose = _loose_images(folder)
        if loose:
            notes.append(f"ignored {len(loose)} image(s) directly in {folder} (images belong in {folder}/<class>/)")
        for class_dir in _subdirs(folder):
            classes.add(class_dir.name)
            entries.extend(Entry(p, class_dir.name, split) for p in _list_images(class_dir, notes))
    if not classes:
        raise DatasetError(
            f"{root}: the split folders hold no class folders; expected ROOT/{{train,val,test}}/<class>/<image>"
        )
    return sorted(classes), entries


def _scan_class_folders(root: Path, notes: list[str]) -> tuple[list[str], list[Entry]]:
    class_dirs = _subdirs(root)
    loose = _loose_images(root)
    if not class_dirs:
        what = f"{len(loose)} image(s) but no class folders" if loose else "no class folders"
        raise DatasetError(
            f"{root} has {what}. petlbench needs the class of every image: use one of {_layouts_text()}."
        )
    if loose:
        notes.append(f"ignored {len(loose)} image(s) directly in {root} (images belong in {root}/<class>/)")
    entries = [Entry(p, d.name) for d in class_dirs for p in _list_images(d, notes)]
    return [d.name for d in class_dirs], entries


def _column(fields: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {f.strip().lower(): f for f in fields}
    return next((lowered[n] for n in names if n in lowered), None)


def _scan_manifest(csv_path: Path) -> tuple[list[str], list[Entry]]:
    """Rows of a manifest as entries; labels as written, sorted by name, or numerically when all are integers."""
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"manifest {csv_path}: cannot read it as CSV ({err})") from None
    path_col, label_col = _column(fields, PATH_COLUMNS), _column(fields, LABEL_COLUMNS)
    split_col = _column(fields, SPLIT_COLUMNS)
    if path_col is None or label_col is None:
        raise DatasetError(
            f"manifest {csv_path}: needs a header row with columns path,label[,split] "
            f"(found: {', '.join(fields) or 'nothing'})"
        )
    problems: list[str] = []
    seen: dict[Path, int] = {}
    raw: list[tuple[Path, str, str | None]] = []
    for line, row in enumerate(rows, start=2):
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not any(values.values()):
            continue
        rel, label = values.get(path_col, ""), values.get(label_col, "")
        if not rel or not label:
            problems.append(f"line {line}: empty {'path' if not rel else 'label'}")
            continue
        split = None
        if split_col is not None:
            split = SPLIT_ALIASES.get(values.get(split_col, "").lower())
            if split is None:
                problems.append(
                    f"line {line}: split {values.get(split_col, '')!r} is not one of train, val (valid, validation),"
                    " test; fill every row or drop the split column to get a generated 70/10/20 split"
                )
                continue
        path = Path(rel).expanduser()
        path = path if path.is_absolute() else base / path
        if path in seen:
            problems.append(f"line {line}: {rel} is listed again (first on line {seen[path]})")
            continue
        seen[path] = line
        raw.append((path, label, split))
    if problems:
        shown = "\n  ".join(problems[:25]) + (f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else "")
        raise DatasetError(f"manifest {csv_path} has {len(problems)} bad row(s):\n  {shown}")
    labels = {label for _, label, _ in raw}
    if all(re.fullmatch(r"[+-]?\d+", label) for label in labels):  # "1" and "01" stay two classes
        classes = sorted(labels, key=lambda label: (int(label), label))
    else:
        classes = sorted(labels)
    return classes, [Entry(p, label, s) for p, label, s in raw]


def _same_number_notes(classes: list[str]) -> list[str]:
    """A note for every group of class names that read as one integer ('1', '01'): they are kept apart."""
    groups: dict[int, list[str]] = {}
    for name in classes:
        if re.fullmatch(r"\s*[+-]?\d+\s*", name):
            groups.setdefault(int(name), []).append(name)
    return [
        f"classes {' and '.join(repr(printable(n)) for n in sorted(names))} are different labels (kept as written) "
        "though they read as the same number; rename one if they are meant to be one class"
        for names in groups.values()
        if len(names) > 1
    ]


def _read_local_card(root: Path) -> dict[str, Any]:
    card = root / LOCAL_CARD
    if not card.is_file():
        return {}
    try:
        data = yaml.safe_load(card.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def inventory(spec: str | Path | None, log: Log = print) -> Inventory:
    """Find the dataset `spec` names and list its classes and files (nothing is decoded yet)."""
    path, card = locate(spec, log)
    notes: list[str] = []
    csv_path: Path | None
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(
                f"{path} is a file but not a CSV manifest; pass a folder or a .csv file ({_layouts_text()})"
            )
        csv_path, root = path, path.parent
    elif path.is_dir():
        csv_path = path / MANIFEST_NAME if (path / MANIFEST_NAME).is_file() else None
        root = path
    else:
        raise DatasetError(f"{path} is neither a file nor a folder")
    if csv_path is not None:
        classes, entries = _scan_manifest(csv_path)
        layout = "manifest"
    else:
        split_dirs = _split_dirs(root)
        if split_dirs:
            classes, entries = _scan_split_folders(root, split_dirs, notes)
            layout = "split folders"
        else:
            classes, entries = _scan_class_folders(root, notes)
            layout = "class folders"
    undecodable = [c for c in classes if printable(c) != c]
    if undecodable:
        raise DatasetError(
            f"{printable(root)}: class name(s) {', '.join(repr(printable(c)) for c in undecodable)} are not valid "
            "UTF-8 text (undecodable bytes shown as \\xNN); rename those class folders"
        )
    notes.extend(_same_number_notes(classes))
    local = _read_local_card(root)
    if card is not None:
        name = card.name
    elif local.get("name"):
        name = str(local["name"])
    elif csv_path is not None and csv_path.stem != Path(MANIFEST_NAME).stem:
        name = csv_path.stem
    else:
        name = root.resolve().name or "dataset"
    if not entries:
        raise DatasetError(
            f"no images found in {csv_path or root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
            f"expected {_layouts_text()}"
        )
    return Inventory(name, root, layout, classes, entries, card, local, notes)


# ----------------------------------------------------------------------------------------------------------------
# Validating images (cached)


def cache_dir_for(root: Path, split_dir: Path | None) -> Path:
    """Where verdicts and statistics of a dataset are cached: `split_dir`, else a per-root user cache folder."""
    if split_dir is not None:
        return Path(split_dir)
    return user_cache_dir() / "datasets" / f"{_slug(root.resolve().name)}-{path_digest(root)}"


def _inspect(path: Path) -> FileCheck:
    """Read `path` once: hash its bytes and decode them; a good image also yields its 128-px channel means and mean
    squares (in [0, 1])."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return FileCheck(f"cannot read ({err.strerror or err})")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = load_image(path, data=data)
    except BadImageError as err:
        return FileCheck(str(err).removeprefix(f"{path}: "), sha256=digest)
    except Exception as err:  # noqa: BLE001 - e.g. Pillow's decompression-bomb guard, MemoryError
        return FileCheck(f"unreadable image ({type(err).__name__}: {err})", sha256=digest)
    small = image.resize((STATS_SIZE, STATS_SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.float64) / 255.0
    means, squares = pixels.mean(axis=(0, 1)), (pixels**2).mean(axis=(0, 1))
    return FileCheck(None, tuple(float(v) for v in (*means, *squares)), digest)


def _file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _load_check_cache(path: Path) -> dict[str, list[Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(data, dict)
        or data.get("version") not in READ_CHECK_VERSIONS
        or data.get("stats_size") != STATS_SIZE
    ):
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _undecodable(path: Path) -> bool:
    """Whether the path holds bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_images(paths: Iterable[Path], cache_file: Path | None, log: Log = print) -> dict[Path, FileCheck]:
    """Verdict and content hash for every path, reading only files whose (path, size, mtime) is not in `cache_file`
    (cached verdicts without a hash, from an older cache, are completed by hashing the file, not decoding it)."""
    cache = _load_check_cache(cache_file) if cache_file is not None else {}
    results: dict[Path, FileCheck] = {}
    fresh: dict[str, list[Any]] = {}
    todo: list[tuple[Path, str, os.stat_result]] = []
    unhashed: list[tuple[Path, str, list[Any]]] = []
    for path in paths:
        if _undecodable(path):
            results[path] = FileCheck(
                "the file name is not valid UTF-8 (undecodable bytes shown as \\xNN); rename the file"
            )
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            results[path] = FileCheck("file not found")
            continue
        except OSError as err:
            results[path] = FileCheck(f"cannot read ({err.strerror})")
            continue
        if not path.is_file():
            results[path] = FileCheck("not a regular file")
            continue
        if stat.st_size == 0:
            results[path] = FileCheck("empty file (0 bytes)")
            continue
        key = os.path.abspath(path)
        hit = cache.get(key)
        if isinstance(hit, list) and len(hit) in (4, 5) and hit[0] == stat.st_size and hit[1] == stat.st_mtime_ns:
            entry = [*hit[:4], hit[4] if len(hit) == 5 else None]
            if entry[2] is None and entry[4] is None:
                unhashed.append((path, key, entry))
            else:
                results[path] = FileCheck(entry[2], tuple(entry[3]) if entry[3] is not None else None, entry[4])
                fresh[key] = entry
        else:
            todo.append((path, key, stat))
    if todo or unhashed:
        work = [f"validating {len(todo)} image file(s) by decoding them"] if todo else []
        work += [f"hashing {len(unhashed)} file(s) validated before (content hashes for leakage)"] if unhashed else []
        where = f"; verdicts cached in {cache_file}" if cache_file is not None else ""
        log(" and ".join(work) + where)
        workers = max(1, min(4, os.cpu_count() or 1))
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:  # reading, hashing and decoding release the GIL
                digests = pool.map(_file_sha256, [t[0] for t in unhashed])
                for (path, key, entry), digest in zip(unhashed, digests, strict=True):
                    entry[4] = digest
                    results[path] = FileCheck(entry[2], tuple(entry[3]) if entry[3] is not None else None, digest)
                    fresh[key] = entry
                for (path, key, stat), verdict in zip(todo, pool.map(_inspect, [t[0] for t in todo]), strict=True):
                    results[path] = verdict
                    fresh[key] = [stat.st_size, stat.st_mtime_ns, verdict.reason, verdict.stats, verdict.sha256]
        finally:  # an interrupted pass still keeps what it read
            _save_check_cache(cache_file, fresh)
    elif len(fresh) != len(cache):
        _save_check_cache(cache_file, fresh)
    return results


def _save_check_cache(cache_file: Path | None, files: dict[str, list[Any]]) -> None:
    if cache_file is not None:
        with contextlib.suppress(OSError):
            write_json_atomic(cache_file, {"version": CHECK_VERSION, "stats_size": STATS_SIZE, "files": files})


def survey(spec: str | Path | None, split_dir: Path | None = None, log: Log = print) -> Survey:
    """Inventory of `spec` plus a (cached) decode verdict for every file."""
    inv = inventory(spec, log)
    cache_dir = cache_dir_for(inv.root, split_dir)
    checks = check_images([e.path for e in inv.entries], cache_dir / CHECK_FILE, log)
    return Survey(inv, checks, cache_dir)


# ----------------------------------------------------------------------------------------------------------------
# Splits


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return os.path.abspath(path)


def _allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Per-class split sizes: rounded shares, at least one image in every split once the class has enough."""
    counts = {"val": math.floor(n * fractions["val"] + 0.5), "test": math.floor(n * fractions["test"] + 0.5)}
    if n >= 3:
        counts = {k: max(1, v) for k, v in counts.items()}
    elif n == 2:
        counts = {"val": 0, "test": 1}
    else:
        counts = {"val": 0, "test": 0}
    counts["train"] = n - counts["val"] - counts["test"]
    return counts


def stratified_split(items: dict[str, str], seed: int) -> dict[str, str]:
    """{relative path: class} -> {relative path: split}: a per-class shuffle (fixed seed) cut 70/10/20."""
    by_class: dict[str, list[str]] = {}
    for rel, label in sorted(items.items()):
        by_class.setdefault(label, []).append(rel)
    out: dict[str, str] = {}
    for label, rels in sorted(by_class.items()):
        random.Random(f"petlbench-split:{seed}:{label}").shuffle(rels)
        counts = _allocate(len(rels), GENERATED_FRACTIONS)
        cuts = {
            "train": rels[: counts["train"]],
            "val": rels[counts["train"] : counts["train"] + counts["val"]],
        }
        cuts["test"] = rels[counts["train"] + counts["val"] :]
        for split, members in cuts.items():
            out.update(dict.fromkeys(members, split))
    return out


def val_from_train(items: dict[str, str], seed: int) -> set[str]:
    """Relative paths of training images moved to val (1/8 of each class, fixed seed)."""
    by_class: dict[str, list[str]] = {}
    for rel, label in sorted(items.items()):
        by_class.setdefault(label, []).append(rel)
    moved: set[str] = set()
    for label, rels in sorted(by_class.items()):
        random.Random(f"petlbench-val:{seed}:{label}").shuffle(rels)
        n_val = max(1, math.floor(len(rels) * VAL_FROM_TRAIN + 0.5)) if len(rels) >= 2 else 0
        moved.update(rels[:n_val])
    return moved


def _read_split_file(path: Path) -> dict[str, tuple[str, str]] | None:
    """{relative path: (class, split)} from a split.csv, or None when it is unreadable or malformed."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    out: dict[str, tuple[str, str]] = {}
    for row in rows:
        rel, label, split = row.get("path"), row.get("label"), row.get("split")
        if not rel or label is None or split not in SPLITS:
            return None
        out[rel] = (label, split)
    return out


def _write_split_file(split_dir: Path, assignment: dict[str, tuple[str, str]], meta: dict[str, Any]) -> None:
    lines = ["path,label,split"]
    order = {s: i for i, s in enumerate(SPLITS)}
    for rel, (label, split) in sorted(assignment.items(), key=lambda kv: (order[kv[1][1]], kv[1][0], kv[0])):
        lines.append(_csv_row([rel, label, split]))
    text = "\n".join(lines) + "\n"
    target = split_dir / SPLIT_FILE
    with contextlib.suppress(OSError):
        if target.read_text(encoding="utf-8") == text:
            return
    write_text_atomic(target, text)
    write_json_atomic(split_dir / SPLIT_META, meta)


def _csv_row(values: list[str]) -> str:
    from io import StringIO

    buffer = StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    return buffer.getvalue()


def assign_splits(
    inv: Inventory,
    entries: list[Entry],
    seed: int,
    split_dir: Path | None,
    log: Log = print,
    write: bool = True,
) -> tuple[dict[Path, str], str]:
    """({path: split}, split_origin) for `entries`: the layout's split, else a saved or newly drawn 70/10/20 one."""
    root = inv.root
    items = {_rel(e.path, root): e.label for e in entries}
    path_of = {_rel(e.path, root): e.path for e in entries}
    split_file = Path(split_dir) / SPLIT_FILE if split_dir is not None else None
    if inv.has_split:
        given = {_rel(e.path, root): e.split or "train" for e in entries}
        origin = "official"
        if not any(s == "val" for s in given.values()):
            moved = val_from_train({r: items[r] for r, s in given.items() if s == "train"}, seed)
            given.update(dict.fromkeys(moved, "val"))
            origin = "official+val-from-train"
            log(
                f"warning: {inv.root} has no val/ split: drew a stratified validation set of {len(moved)} training "
                f"images (1/8 of each class, seed {seed})"
            )
        assignment = given
    else:
        assignment = {}
        origin = "generated"
        saved = _read_split_file(split_file) if split_file is not None and split_file.is_file() else None
        meta = _read_json(split_file.with_name(SPLIT_META)) if split_file is not None else {}
        if saved is None and split_file is not None and split_file.is_file():
            log(f"warning: cannot read {split_file} (needs columns path,label,split): drawing a new split")
        if saved is not None and {r: v[0] for r, v in saved.items()} == items and meta.get("origin") != "official":
            assignment = {r: v[1] for r, v in saved.items()}
            if meta.get("seed") not in (None, seed):
                log(f"note: reusing the split in {split_file}, drawn with seed {meta['seed']} (delete it to redraw)")
        else:
            if saved is not None:
                added = len(items.keys() - saved.keys())
                removed = len(saved.keys() - items.keys())
                changed = sum(1 for r in items.keys() & saved.keys() if saved[r][0] != items[r])
                log(
                    f"warning: {split_file} does not match the files ({added} added, {removed} removed, {changed} "
                    f"relabelled): drawing a new stratified 70/10/20 split with seed {seed}"
                )
            assignment = stratified_split(items, seed)
    if split_file is not None and write:
        meta = {
            "origin": origin,
            "seed": seed,
            "fractions": GENERATED_FRACTIONS if origin == "generated" else None,
            "layout": inv.layout,
            "root": str(root.resolve()),
            "files": len(assignment),
        }
        _write_split_file(split_file.parent, {r: (items[r], s) for r, s in assignment.items()}, meta)
    return {path_of[r]: s for r, s in assignment.items()}, origin


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------------------------------------------
# Normalisation


def auto_normalisation(
    stats: list[tuple[float, ...]],
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The official "auto" routine on 128-px images: mean of per-image channel means, std over all pixels."""
    if not stats:
        raise DatasetError("cannot compute normalisation statistics: no training images")
    table = np.asarray(stats, dtype=np.float64)
    mean = table[:, :3].mean(axis=0)
    std = np.sqrt(np.maximum(table[:, 3:].mean(axis=0) - mean**2, 0.0))
    std = np.maximum(std, 1e-6)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)  # type: ignore[return-value]


def _triple(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Opening


def content_groups(entries: Iterable[Entry], checks: dict[Path, FileCheck]) -> list[list[Entry]]:
    """Groups of two or more entries whose files have identical bytes (sha256), in inventory order."""
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        digest = checks[entry.path].sha256
        if digest is not None:
            groups.setdefault(digest, []).append(entry)
    return [members for members in groups.values() if len(members) > 1]


def find_leakage(
    entries: Iterable[Entry], checks: dict[Path, FileCheck], splits: dict[Path, str], root: Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """(leaks, notes): files with identical contents in more than one split, as {sha256, files: [{path, split,
    label}]} with paths relative to `root`; notes on identical files within one split and on conflicting labels."""
    order = {s: i for i, s in enumerate(SPLITS)}
    leaks: list[dict[str, Any]] = []
    within: list[str] = []
    conflicts: list[str] = []
    for members in content_groups(entries, checks):
        members = sorted(members, key=lambda e: (order[splits[e.path]], str(e.path)))
        files = [{"path": printable(_rel(e.path, root)), "split": splits[e.path], "label": e.label} for e in members]
        shown = " = ".join(f"{f['path']} ({f['split']}, class {printable(f['label'])})" for f in files)
        if len({e.label for e in members}) > 1:
            conflicts.append(shown)
        if len({f["split"] for f in files}) > 1:
            leaks.append({"sha256": checks[members[0].path].sha256, "files": files})
        else:
            within.append(shown)
    notes = []
    if within:
        notes.append(f"{len(within)} group(s) of identical files within one split (they weigh twice, e.g. {within[0]})")
    if conflicts:
        more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        notes.append(f"identical files with different labels: {'; '.join(conflicts[:5])}{more}")
    return leaks, notes


def leakage_lines(leaks: list[dict[str, Any]], limit: int = 20) -> list[str]:
    """One line per leaked image: its identical files with their splits."""
    lines = [" = ".join(f"{f['path']} ({f['split']})" for f in leak["files"]) for leak in leaks[:limit]]
    if len(leaks) > limit:
        lines.append(f"... and {len(leaks) - limit} more")
    return lines


def leakage_message(root: Path, leaks: list[dict[str, Any]]) -> str:
    """The error for identical files across splits: the files, and what to do."""
    listing = "\n".join(f"  {line}" for line in leakage_lines(leaks))
    return (
        f"{printable(root)}: {len(leaks)} image(s) have identical copies (same file contents, sha256) in more than one "
        f"split, so validation/test scores would be measured on training images:\n{listing}\n"
        "Remove the copies so that each image is in one split only (`petlbench datasets check DATASET` lists them "
        "all), or pass --allow-leakage (allow_leakage=True) to run anyway; the leak is then recorded with the run."
    )


def too_few_classes_message(root: Path, classes: list[str], counts: Counter[str]) -> str:
    """The error for a dataset with fewer than two classes that have images."""
    found = ", ".join(f"{printable(c)} ({counts[c]} images)" for c in classes) or "none"
    return (
        f"{printable(root)}: found {len(classes)} class(es) with images ({found}); at least 2 are needed to train and "
        "evaluate a classifier. Did you pass a class folder (or a split folder) instead of the dataset root? "
        f"Layouts: {_layouts_text()}."
    )


def bad_files_message(root: Path, bad: list[dict[str, str]]) -> str:
    """The error for unusable files: every file with its reason, and what to do."""
    lines = "\n".join(f"  {b['path']}: {b['reason']}" for b in bad)
    return (
        f"{len(bad)} unusable image file(s) in {printable(root)}:\n{lines}\n"
        "Fix or remove them, or pass --skip-bad-images to leave them out (they are then listed in the run record)."
    )


def open_dataset(
    spec: str | Path | None,
    split_dir: Path | None = None,
    seed: int = 0,
    skip_bad_images: bool = False,
    log: Log = print,
    allow_leakage: bool = False,
) -> DatasetSource:
    """Open, validate and split a dataset (folder layout, CSV manifest, card name, or None = embedded synthetic).

    Every image is decoded and hashed once (verdicts cached by path, size and mtime). Bad files raise a DatasetError
    naming them all, unless `skip_bad_images`, which leaves them out and lists them in `skipped`. Splits: the
    layout's, else a stratified 70/10/20 split with `seed`, saved to `split_dir/split.csv` and reused while the files
    match (`split_dir_for` names a folder per data location). Identical files in more than one split raise a
    DatasetError naming them, unless `allow_leakage`, which logs them and records them in `leakage`.
    Mean/std come from the dataset card, else the official "auto" routine on the training images resized to
    128 px (instead of 512, for speed; cached per file), also recorded in `split_dir/stats.json`.
    """
    found = survey(spec, split_dir, log)
    inv = found.inventory
    for note in inv.notes:
        log(f"warning: {printable(note)}")
    bad = found.bad
    if bad and not skip_bad_images:
        raise DatasetError(bad_files_message(inv.root, bad))
    if bad:
        log(
            f"warning: skipping {len(bad)} unusable image file(s) (--skip-bad-images): "
            + "; ".join(f"{b['path']} ({b['reason']})" for b in bad)
        )
    good = found.good
    if not good:
        raise DatasetError(f"no usable images in {inv.root}: all {len(bad)} file(s) are unreadable")
    per_class = Counter(e.label for e in good)
    empty = [c for c in inv.classes if per_class[c] == 0]
    if empty:
        log(
            f"warning: class(es) {', '.join(empty)} have no usable images and are left out "
            f"(class indices follow the remaining {len(inv.classes) - len(empty)} classes)"
        )
    classes = [c for c in inv.classes if per_class[c] > 0]
    if len(classes) < 2:
        raise DatasetError(too_few_classes_message(inv.root, classes, per_class))
    card = inv.card
    if card is not None:
        if card.num_classes != len(classes):
            log(f"warning: card {card.key!r} expects {card.num_classes} classes, found {len(classes)} in {inv.root}")
        elif card.classes and list(card.classes) != classes:
            log(f"warning: card {card.key!r} names classes {list(card.classes)}, found {classes} in {inv.root}")
    splits, origin = assign_splits(inv, good, seed, split_dir, log)
    leaks, duplicate_notes = find_leakage(good, found.checks, splits, inv.root)
    if leaks and not allow_leakage:
        raise DatasetError(leakage_message(inv.root, leaks))
    if leaks:
        log(
            f"warning: allow_leakage (--allow-leakage): training anyway although {len(leaks)} image(s) have identical "
            "copies in more than one split: " + "; ".join(leakage_lines(leaks, limit=10))
        )
    for note in duplicate_notes:
        log(f"warning: {note}")
    if card is not None and card.split == "official" and origin == "generated":
        log(f"warning: card {card.key!r} expects the official split, but {inv.root} has none: drew 70/10/20")
    index = {c: i for i, c in enumerate(classes)}
    order = {s: i for i, s in enumerate(SPLITS)}
    samples = sorted(
        (Sample(e.path, index[e.label], splits[e.path], sample_id_for(e.path, inv.root)) for e in good),
        key=lambda s: (order[s.split], s.label, str(s.path)),
    )
    for split in SPLITS:
        present = {s.label for s in samples if s.split == split}
        lacking = [c for c in classes if index[c] not in present]
        if lacking:
            log(f"warning: the {split} split has no images of class(es) {', '.join(lacking)}")
    mean, std = _normalisation(found, samples, split_dir, log)
    return DatasetSource(
        name=inv.name,
        root=inv.root,
        classes=classes,
        samples=samples,
        split_origin=origin,
        mean=mean,
        std=std,
        skipped=bad if skip_bad_images else [],
        allow_leakage=allow_leakage,
        leakage=leaks,
    )


def _normalisation(
    found: Survey, samples: list[Sample], split_dir: Path | None, log: Log
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Card mean/std, else local dataset.yaml mean/std, else the auto routine over the training images."""
    inv = found.inventory
    if inv.card is not None:
        return inv.card.mean, inv.card.std
    mean, std = _triple(inv.local_card.get("mean")), _triple(inv.local_card.get("std"))
    if mean is not None and std is not None:
        return mean, std
    train = [s for s in samples if s.split == "train"]
    stats = [found.checks[s.path].stats for s in train]
    missing = [s.path for s, st in zip(train, stats, strict=True) if st is None]
    if missing:  # only possible with a hand-edited cache; decode again
        redo = check_images(missing, None, log)
        stats = [st if st is not None else redo[s.path].stats for s, st in zip(train, stats, strict=True)]
    mean, std = auto_normalisation([st for st in stats if st is not None])
    if split_dir is not None:
        with contextlib.suppress(OSError):
            write_json_atomic(
                Path(split_dir) / STATS_FILE,
                {
                    "mean": list(mean),
                    "std": list(std),
                    "train_images": len(train),
                    "size": STATS_SIZE,
                    "routine": "mean of per-image channel means; std over all pixels; images resized to 128 px",
                },
            )
    log(f"normalisation (auto, {len(train)} training images at {STATS_SIZE} px): mean {mean}, std {std}")
    return mean, std
