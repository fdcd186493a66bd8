"""A deterministic synthetic "high-resolution lesion" dataset: fundus-like discs whose class is set by tiny lesions.

Every image is an orange-red disc on black with an illumination gradient, vignetting, an optic disc, a macula,
vessels, low-frequency texture and pixel noise; none of that depends on the class. The class is carried only by
a few lesions a handful of pixels wide at 1024 px (microaneurysm-like dark-red dots, exudate-like bright-yellow
dots): class 0 has none, class k >= 1 has dark (k odd) or bright (k even) dots, more of them for higher k. After
downsampling to 64 px a lesion covers a small fraction of a pixel and is buried in the texture, so a method only
separates the classes if it sees the image at high resolution.

Backgrounds and lesions come from separate random streams keyed by (seed, image number), so the same seed
always gives byte-identical files, and the background of an image does not depend on its class.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

from petlbench.data.source import SPLITS

GENERATOR = "petlbench.data.synthetic"
GENERATOR_VERSION = 1
EMBEDDED_NAME = "synthetic-lesions-v1"
COMPLETE_MARKER = ".complete"  # written last: a folder without it is a partial generation
CARD_FILE = "dataset.yaml"

# The embedded default: 3 classes x 28 images (16 train / 4 val / 8 test per class = 48 / 12 / 24) at 1024 px.
EMBEDDED_CLASSES = 3
EMBEDDED_N_PER_CLASS = 28
EMBEDDED_SIZE = 1024

# Share of each class per split. Val and test are larger than the papers' 10 % / 20 % because the sets are tiny
# and an AUC over a handful of validation images is mostly noise.
SPLIT_WEIGHTS = {"train": 4, "val": 1, "test": 2}

LESION_BASE_COUNT = 14  # lesions per image at level 1 (classes 1 and 2); level L draws about L times as many
LESION_RADIUS_1024 = (1.6, 2.8)  # lesion radius in pixels at 1024 px (diameter about 3 to 6 px)
DARK_LESION = (0.30, 0.04, 0.03)  # microaneurysm / haemorrhage: dark red
BRIGHT_LESION = (1.00, 0.93, 0.55)  # hard exudate: bright yellow


class JpegOptions(TypedDict):
    """Keyword arguments of `PIL.Image.Image.save` for the synthetic JPEGs."""

    format: str
    quality: int
    subsampling: int
    optimize: bool


# JPEG like real fundus archives, but at quality 95 without chroma subsampling so that 3-px lesions keep their
# colour; encoding is deterministic (same pixels, same bytes) and ~20x faster than PNG on these noisy images.
JPEG_OPTIONS: JpegOptions = {"format": "JPEG", "quality": 95, "subsampling": 0, "optimize": False}


@dataclass(frozen=True)
class Lesion:
    """One lesion: centre (x, y) and radius in pixels, and its kind ("dark" or "bright")."""

    x: float
    y: float
    radius: float
    kind: str


def class_names(num_classes: int) -> list[str]:
    """Folder names of the classes, zero-padded so that sorted names give class indices 0..C-1."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    width = len(str(num_classes - 1))
    names = []
    for k in range(num_classes):
        if k == 0:
            desc = "healthy"
        else:
            kind, level = lesion_plan(k)
            desc = kind if level == 1 else f"{kind}-x{level}"
        names.append(f"{k:0{width}d}_{desc}")
    return names


def lesion_plan(label: int) -> tuple[str, int]:
    """(kind, level) of class `label` >= 1: kinds alternate dark/bright, the level (lesion count) grows every two."""
    if label < 1:
        raise ValueError("class 0 has no lesions")
    return ("dark" if label % 2 == 1 else "bright"), (label + 1) // 2


def lesion_count_range(label: int) -> tuple[int, int]:
    """Inclusive range of the number of lesions of class `label` (ranges of different levels do not overlap)."""
    if label == 0:
        return 0, 0
    _, level = lesion_plan(label)
    centre = LESION_BASE_COUNT * level
    spread = LESION_BASE_COUNT // 4
    return centre - spread, centre + spread


def split_counts(n_per_class: int) -> dict[str, int]:
    """Images per class in each split (train:val:test = 4:1:2, at least one image in every split)."""
    if n_per_class < 3:
        raise ValueError(f"n_per_class must be at least 3 (one image per split), got {n_per_class}")
    total = sum(SPLIT_WEIGHTS.values())
    val = max(1, round(n_per_class * SPLIT_WEIGHTS["val"] / total))
    test = max(1, round(n_per_class * SPLIT_WEIGHTS["test"] / total))
    return {"train": n_per_class - val - test, "val": val, "test": test}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]-ish: a cells x cells grid upsampled bicubically to size x size."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _vessel_mask(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float, od: tuple[float, float]):
    """Vessel trees leaving the optic disc as smooth random walks; returns a float mask in [0, 1]."""
    scale = size / 1024.0
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    n_trees = int(rng.integers(6, 10))
    for t in range(n_trees):
        angle = 2 * math.pi * t / n_trees + rng.uniform(-0.3, 0.3)
        branches = [(od[0], od[1], angle, rng.uniform(5.0, 8.0))]
        while branches:
            x, y, angle, width = branches.pop()
            points = [(x, y)]
            for _ in range(int(rng.integers(10, 18))):
                angle += rng.normal(0.0, 0.18)
                step = rng.uniform(0.03, 0.05) * radius
                x, y = x + step * math.cos(angle), y + step * math.sin(angle)
                if (x - cx) ** 2 + (y - cy) ** 2 > (0.97 * radius) ** 2:
                    break
                points.append((x, y))
                if width > 2.5 and rng.random() < 0.08:
                    branches.append((x, y, angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.9), width * 0.6))
            if len(points) > 1:
                draw.line(points, fill=255, width=max(1, round(width * scale)), joint="curve")
    mask = mask.filter(ImageFilter.BoxBlur(max(0.5, scale)))  # soft vessel walls
    return np.asarray(mask, dtype=np.float32) / 255.0


def _blend_blob(img: np.ndarray, cx: float, cy: float, reach: float, alpha_fn: Callable, colour) -> None:
    """Blend `colour` into `img` with alpha_fn(squared distance) inside the box of half-width `reach` (in place)."""
    size = img.shape[0]
    x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
    y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    ys = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
    xs = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
    alpha = alpha_fn(xs * xs + ys * ys)[..., None]
    patch = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = patch * (1 - alpha) + colour(patch) * alpha


def _background(size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """A lesion-free fundus-like image (float32 HxWx3 in [0, 1]) and its geometry."""
    scale = size / 1024.0
    cx = size / 2 + rng.uniform(-0.02, 0.02) * size
    cy = size / 2 + rng.uniform(-0.02, 0.02) * size
    radius = size * rng.uniform(0.44, 0.48)
    dy = np.arange(size, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(size, dtype=np.float32)[None, :] - np.float32(cx)
    dist2 = dx * dx + dy * dy  # (size, size) via broadcasting

    base = np.array([0.78, 0.33, 0.13], dtype=np.float32) * rng.uniform(0.85, 1.1, size=3).astype(np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    tilt = np.float32(rng.uniform(0.08, 0.2) / radius)
    shade = 1.0 - np.float32(0.38 / radius**2) * dist2  # vignetting
    shade += (tilt * math.cos(direction)) * dx + (tilt * math.sin(direction)) * dy  # uneven illumination
    shade += 0.05 * _smooth_noise(rng, size, 12)  # blotchy choroidal texture
    img = shade[..., None] * base

    side = rng.choice([-1.0, 1.0])  # optic disc left or right of the macula
    od = (cx + side * 0.32 * radius, cy + rng.uniform(-0.05, 0.05) * radius)
    macula = (cx - side * 0.05 * radius, cy + rng.uniform(-0.04, 0.04) * radius)
    od_r = 0.085 * radius
    od_colour = np.array([0.98, 0.82, 0.55], dtype=np.float32)
    _blend_blob(img, *od, 1.2 * od_r, lambda d2: np.clip(1.4 - d2 / od_r**2, 0.0, 1.0) * 0.85, lambda p: od_colour)
    mac_s = 0.11 * radius
    _blend_blob(img, *macula, 3.5 * mac_s, lambda d2: 0.35 * np.exp(-d2 / mac_s**2), lambda p: 0 * p)

    vessels = _vessel_mask(rng, size, cx, cy, radius, od)
    vessels *= np.float32(0.55)
    for channel, colour in enumerate((0.45, 0.06, 0.04)):  # per channel: no 3-channel temporaries
        plane = img[..., channel]
        plane *= 1 - vessels
        plane += vessels * np.float32(colour)

    noise = rng.random(img.shape, dtype=np.float32)  # sensor noise: uniform, std 0.012 (about 3 grey levels)
    noise -= np.float32(0.5)
    noise *= np.float32(0.012 * math.sqrt(12.0))
    img += noise
    edge = np.clip((radius - np.sqrt(dist2)) / max(1.0, 2.0 * scale), 0.0, 1.0)  # anti-aliased rim
    img *= edge[..., None]
    geometry = {"cx": cx, "cy": cy, "radius": radius, "od_x": od[0], "od_y": od[1], "od_r": od_r}
    return img, geometry


def _lesions(size: int, label: int, rng: np.random.Generator, geometry: dict[str, float]) -> list[Lesion]:
    """Lesion positions for class `label`: inside the disc, away from the rim and the optic disc."""
    if label == 0:
        return []
    kind, _ = lesion_plan(label)
    low, high = lesion_count_range(label)
    count = int(rng.integers(low, high + 1))
    scale = size / 1024.0
    lesions: list[Lesion] = []
    while len(lesions) < count:
        r = geometry["radius"] * 0.8 * math.sqrt(rng.random())
        theta = rng.uniform(0, 2 * math.pi)
        x, y = geometry["cx"] + r * math.cos(theta), geometry["cy"] + r * math.sin(theta)
        if (x - geometry["od_x"]) ** 2 + (y - geometry["od_y"]) ** 2 < (1.6 * geometry["od_r"]) ** 2:
            continue
        radius = max(0.8, rng.uniform(*LESION_RADIUS_1024) * scale)
        lesions.append(Lesion(float(x), float(y), float(radius), kind))
    return lesions


def _draw_lesions(img: np.ndarray, lesions: list[Lesion]) -> np.ndarray:
    """Blend anti-aliased lesion dots into `img` (in place) and return it."""
    size = img.shape[0]
    for lesion in lesions:
        reach = math.ceil(lesion.radius + 2)
        x0, x1 = max(0, int(lesion.x) - reach), min(size, int(lesion.x) + reach + 2)
        y0, y1 = max(0, int(lesion.y) - reach), min(size, int(lesion.y) + reach + 2)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dist = np.sqrt((xs + 0.5 - lesion.x) ** 2 + (ys + 0.5 - lesion.y) ** 2)
        alpha = np.clip(lesion.radius + 0.5 - dist, 0.0, 1.0)[..., None] * 0.9
        patch = img[y0:y1, x0:x1]
        if lesion.kind == "dark":
            target = patch * np.array(DARK_LESION, dtype=np.float32) / 0.78  # darker, redder than the fundus
        else:
            target = np.broadcast_to(np.array(BRIGHT_LESION, dtype=np.float32), patch.shape)
        img[y0:y1, x0:x1] = patch * (1 - alpha) + target * alpha
    return img


def make_image(size: int, seed: int, index: int, label: int) -> tuple[np.ndarray, list[Lesion]]:
    """Image number `index` of the stream `seed` drawn as class `label`: uint8 HxWx3 array and its lesions.

    The background depends only on (seed, index); the label only adds lesions. So two calls that differ only in
    `label` give images that differ only inside the lesions' footprints.
    """
    background, geometry = _background(size, np.random.default_rng([seed, index, 0]))
    lesions = _lesions(size, label, np.random.default_rng([seed, index, 1]), geometry)
    img = _draw_lesions(background, lesions)
    np.clip(img, 0.0, 1.0, out=img)
    img *= np.float32(255.0)
    img += np.float32(0.5)
    return img.astype(np.uint8), lesions


def _prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir`, or clear a previous synthetic output there; refuse to write into foreign folders."""
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    card = out_dir / CARD_FILE
    try:
        ours = card.is_file() and (yaml.safe_load(card.read_text()) or {}).get("generator") == GENERATOR
    except yaml.YAMLError:
        ours = False
    if not ours:
        raise FileExistsError(
            f"{out_dir} is not empty and holds no synthetic dataset written by petlbench; "
            "choose an empty or new folder for --out"
        )
    for name in (COMPLETE_MARKER, CARD_FILE, *SPLITS):
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def generate(
    out_dir: str | Path,
    n_per_class: int = EMBEDDED_N_PER_CLASS,
    size: int = EMBEDDED_SIZE,
    num_classes: int = EMBEDDED_CLASSES,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write the synthetic dataset as OUT/{train,val,test}/<class>/imgNNNNN.jpg plus a dataset.yaml card; return OUT.

    `n_per_class` counts a class's images over all splits (train:val:test = 4:1:2). Same arguments, same bytes.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    names = class_names(num_classes)
    per_split = split_counts(n_per_class)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    start = time.perf_counter()
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    jobs: list[tuple[int, int, Path]] = []  # (image number, label, file)
    for split in SPLITS:
        for label, name in enumerate(names):
            folder = out_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(per_split[split]):
                jobs.append((len(jobs), label, folder / f"img{len(jobs):05d}.jpg"))
            counts[split][name] = per_split[split]

    def write(job: tuple[int, int, Path]) -> None:
        pixels, _ = make_image(size, seed, job[0], job[1])
        Image.fromarray(pixels, mode="RGB").save(job[2], **JPEG_OPTIONS)

    # Images are independent (own random streams), so threads change nothing in the bytes; numpy and Pillow
    # release the GIL in the heavy parts.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(write, jobs))
    index = len(jobs)
    card = {
        "name": EMBEDDED_NAME
        if (n_per_class, size, num_classes, seed) == (*_embedded_args(), 0)
        else f"synthetic-lesions-c{num_classes}-n{n_per_class}-{size}px-seed{seed}",
        "key": "synthetic",
        "modality": "synthetic fundus (microaneurysm / exudate-like lesions)",
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "num_classes": num_classes,
        "classes": names,
        "n_per_class": n_per_class,
        "counts": counts,
        "total": index,
        "layout": "ROOT/{train,val,test}/<class>/<image>.jpg",
        "split": "official",
        "lesions": {
            name: (
                "none"
                if k == 0
                else f"{lesion_count_range(k)[0]}-{lesion_count_range(k)[1]} {lesion_plan(k)[0]} dots, "
                f"radius {LESION_RADIUS_1024[0]}-{LESION_RADIUS_1024[1]} px at 1024 px"
            )
            for k, name in enumerate(names)
        },
    }
    (out_dir / CARD_FILE).write_text(yaml.safe_dump(card, sort_keys=False))
    (out_dir / COMPLETE_MARKER).write_text(_marker_text(n_per_class, size, num_classes, seed))
    if log is not None:
        log(f"generated {index} synthetic {size}px images in {time.perf_counter() - start:.1f}s at {out_dir}")
    return out_dir


def _embedded_args() -> tuple[int, int, int]:
    return EMBEDDED_N_PER_CLASS, EMBEDDED_SIZE, EMBEDDED_CLASSES


def _marker_text(n_per_class: int, size: int, num_classes: int, seed: int) -> str:
    return (
        f"{GENERATOR} v{GENERATOR_VERSION} n_per_class={n_per_class} size={size} "
        f"num_classes={num_classes} seed={seed}\n"
    )


def is_complete(folder: Path, n_per_class: int, size: int, num_classes: int, seed: int) -> bool:
    """Whether `folder` holds a finished generation with exactly these arguments (marker written last)."""
    marker = folder / COMPLETE_MARKER
    try:
        return marker.read_text() == _marker_text(n_per_class, size, num_classes, seed)
    except OSError:
        return False


def data_home() -> Path:
    """Folder for generated data: $PETLBENCH_DATA, else ~/.cache/petlbench/data."""
    env = os.environ.get("PETLBENCH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "petlbench" / "data"


def embedded_default(log: Callable[[str], None] = print) -> Path:
    """Path of the embedded synthetic dataset, generating it once into data_home()/synthetic-lesions-v1."""
    target = data_home() / EMBEDDED_NAME
    args = (EMBEDDED_N_PER_CLASS, EMBEDDED_SIZE, EMBEDDED_CLASSES, 0)
    if is_complete(target, *args):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if any(target.iterdir()) and not ((target / CARD_FILE).is_file() or (target / COMPLETE_MARKER).is_file()):
            raise FileExistsError(
                f"{target} exists but holds no petlbench synthetic dataset; move it away or point PETLBENCH_DATA "
                "at another folder"
            )
        log(f"embedded dataset at {target} is incomplete or outdated: generating it again")
    else:
        log(f"generating the embedded synthetic dataset (once) at {target}")
    staging = target.parent / f".{EMBEDDED_NAME}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        generate(staging, *args[:3], seed=args[3], log=log)
        if target.exists():
            if is_complete(target, *args):  # another process finished first
                return target
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not is_complete(target, *args):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
