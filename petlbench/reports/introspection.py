"""Introspection arrays of a trained FPT/FPT+ model, stored next to the run for Figures 6 and 9.

File: `results/<run_id>/introspection.npz` (NumPy .npz, compressed, written atomically). Keys, all optional
(a figure needs only its own):

Figure 6 — attention the side tokens pay to the fine-grained prompts:
    layer_prompt_attention   float [L]      per side layer ℓ (0-based, bottom to top): the attention mass the
                                            side network's class and patch tokens (queries) put on the P prompt
                                            tokens (keys), summed over the prompts, averaged over queries, heads
                                            and evaluated images (softmax rows sum to 1, so values lie in [0, 1]).
    layer_prompt_attention_n int []        number of images averaged (optional).

Figure 9 — selected important tokens and the prompts' attention over them, for K images:
    images                   uint8 [K, H, W, 3] (or float in [0, 1]) — the un-normalised LPM view of each image.
    token_indices            int [K, n]     indices of the selected tokens in the LPM sequence of the shown
                                            layer and head (0 = class token, patch p at index p + 1, patches
                                            row-major); the class token is not drawn.
    token_attention          float [K, n]   attention the fine-grained prompts pay to each selected token,
                                            averaged over prompts (same order as token_indices).
    patch_size               int []         the LPM's patch size in pixels of `images`.
    num_prefix_tokens        int []         tokens before the first patch (default 1, the class token).
    layer, head              int []         which LPM layer (0-based) and head are shown.
    labels                   int [K]        class labels (optional, shown in titles; one image per class is drawn).
    selected_indices         int [K, L, H, n] (or [K, L, n] for MLP fusion) the selected tokens of every fed layer
                                            and head (optional; the foreground fraction counts over all of them).

The foreground of an image (`foreground_patches`) is the set of patches more than half of whose pixels are brighter
than 10/255 of full scale (mean over RGB of the un-normalised image): the black surround of a fundus photograph is
background. `foreground_fraction` is the share of the selected tokens that fall on it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from petlbench.core.atomic import write_bytes_atomic

FILENAME = "introspection.npz"
FIG6_KEYS = ("layer_prompt_attention",)
FIG9_KEYS = ("images", "token_indices", "token_attention", "patch_size")
KNOWN_KEYS = (
    "layer_prompt_attention",
    "layer_prompt_attention_n",
    "images",
    "token_indices",
    "token_attention",
    "patch_size",
    "num_prefix_tokens",
    "layer",
    "head",
    "labels",
    "selected_indices",
)
FOREGROUND_THRESHOLD = 10 / 255  # a pixel brighter than this share of full scale (mean over RGB) is foreground


def _to_numpy(value: Any) -> np.ndarray:
    """A NumPy array from an array, tensor or scalar."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def validate_introspection(arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError if the arrays contradict the documented shapes."""
    unknown = set(arrays) - set(KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown introspection keys {sorted(unknown)}; known: {', '.join(KNOWN_KEYS)}")
    if "layer_prompt_attention" in arrays and arrays["layer_prompt_attention"].ndim != 1:
        raise ValueError("layer_prompt_attention must be 1-D [layers]")
    present = [k for k in FIG9_KEYS if k in arrays]
    if present and len(present) != len(FIG9_KEYS):
        raise ValueError(f"Figure 9 needs all of {', '.join(FIG9_KEYS)}; got {', '.join(present)}")
    if present:
        images, idx, att = arrays["images"], arrays["token_indices"], arrays["token_attention"]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError("images must be [K, H, W, 3] (or [K, H, W, 1])")
        if idx.ndim != 2 or att.shape != idx.shape or idx.shape[0] != images.shape[0]:
            raise ValueError("token_indices and token_attention must both be [K, n] with K = number of images")
    if "selected_indices" in arrays:
        chosen = arrays["selected_indices"]
        if chosen.ndim not in (3, 4) or ("images" in arrays and chosen.shape[0] != arrays["images"].shape[0]):
            raise ValueError("selected_indices must be [K, L, H, n] or [K, L, n] with K = number of images")


def save_introspection(run_dir: str | Path, arrays: Mapping[str, Any]) -> Path:
    """Write `arrays` (NumPy arrays, tensors or scalars; keys in the module docstring) to the run folder."""
    converted = {key: _to_numpy(value) for key, value in arrays.items()}
    validate_introspection(converted)
    buffer = io.BytesIO()
    # allow_pickle is numpy's default, named so that `**converted` binds to the array keywords only (keys are
    # validated above, so none can be taken for the flag).
    np.savez_compressed(buffer, allow_pickle=True, **converted)
    path = Path(run_dir) / FILENAME
    write_bytes_atomic(path, buffer.getvalue())
    return path


def load_introspection(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The run's introspection arrays, or None if it has no (readable) file."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError):
        return None


def introspection_arrays(
    maps: Mapping[str, Any],
    images: Any | None = None,
    layer: int = -1,
    head: int = 0,
    max_images: int = 4,
    labels: Any | None = None,
) -> dict[str, np.ndarray]:
    """Arrays for `save_introspection` from the output of `petlbench.fpt.common.fusion_attention_maps`.

    `images`: the un-normalised LPM view of the same batch, [B, H, W, 3] or [B, 3, H, W] (uint8 or float in
    [0, 1]); without it (or without prompt attention, e.g. MLP fusion) only Figure 6's array is returned.
    `layer` indexes the fed layers (-1 = top), `head` the attention head shown in Figure 9.
    """
    out: dict[str, np.ndarray] = {}
    mass = maps.get("side_attention_mass")
    if mass is not None:
        out["layer_prompt_attention"] = _to_numpy(mass).astype(np.float32).ravel()
    attention = maps.get("prompt_attention")
    if images is None or attention is None:
        return out
    pics = _to_numpy(images)
    if pics.ndim == 4 and pics.shape[1] in (1, 3) and pics.shape[-1] not in (1, 3):
        pics = pics.transpose(0, 2, 3, 1)
    k = min(max_images, pics.shape[0])
    att = _to_numpy(attention)[:k, layer, head].astype(np.float32)  # [K, P, n]
    token_attention = att.mean(axis=-2)
    selected = maps.get("selected_indices")
    if selected is None:
        token_indices = np.broadcast_to(np.arange(token_attention.shape[-1]), token_attention.shape).copy()
    else:
        every = _to_numpy(selected)[:k]
        out["selected_indices"] = every.astype(np.int32)  # every fed layer and head, for the foreground fraction
        chosen = every[:, layer]
        token_indices = chosen[:, head] if chosen.ndim == 3 else chosen
    lpm_layers = list(maps.get("lpm_layers") or [])
    out.update(
        images=pics[:k],
        token_indices=token_indices.astype(np.int64),
        token_attention=token_attention,
        patch_size=np.asarray(pics.shape[1] // int(maps["grid"])),
        num_prefix_tokens=np.asarray(int(maps.get("num_prefix_tokens", 1))),
        layer=np.asarray(lpm_layers[layer] if lpm_layers else layer),
        head=np.asarray(head),
    )
    if labels is not None:
        out["labels"] = _to_numpy(labels)[:k].astype(np.int64)
    return out


def one_per_class(labels: Any | None, count: int, limit: int = 4) -> list[int]:
    """Indices of the images to draw: the first image of each class in order of appearance, at most `limit`.

    Without labels the first `limit` of the `count` images (their classes are unknown).
    """
    if labels is None:
        return list(range(min(count, limit)))
    seen: set[int] = set()
    chosen: list[int] = []
    for index, label in enumerate(np.asarray(labels).ravel()[:count].tolist()):
        if int(label) not in seen and len(chosen) < limit:
            seen.add(int(label))
            chosen.append(index)
    return chosen


def _grid_shape(grid: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of a patch grid given as one side or as a pair."""
    if isinstance(grid, tuple):
        return int(grid[0]), int(grid[1])
    return int(grid), int(grid)


def foreground_patches(
    image: np.ndarray, grid: int | tuple[int, int], threshold: float = FOREGROUND_THRESHOLD
) -> np.ndarray:
    """Bool [rows, cols]: patches more than half of whose pixels are brighter than `threshold` of full scale.

    `image` is un-normalised, [H, W, C] (or [H, W]): uint8 (full scale 255) or float (full scale 1, or 255 when
    its values exceed 1.5); brightness is the mean over the channels.
    """
    pixels = np.asarray(image)
    scale = 255.0 if pixels.dtype == np.uint8 or float(np.nanmax(pixels, initial=0.0)) > 1.5 else 1.0
    bright = (pixels.astype(np.float64).mean(axis=-1) if pixels.ndim == 3 else pixels.astype(np.float64)) > (
        threshold * scale
    )
    rows, cols = _grid_shape(grid)
    ph, pw = bright.shape[0] // rows, bright.shape[1] // cols
    if ph < 1 or pw < 1:
        raise ValueError(f"a {bright.shape[0]}x{bright.shape[1]} image cannot hold a {rows}x{cols} patch grid")
    share = bright[: rows * ph, : cols * pw].reshape(rows, ph, cols, pw).mean(axis=(1, 3))
    return np.asarray(share > 0.5)


def foreground_counts(
    images: Any, indices: Any, grid: int | tuple[int, int], num_prefix_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (selected patch tokens on the foreground, selected patch tokens in all)."""
    pics = np.asarray(images)
    chosen = np.asarray(indices)
    if len(chosen) != len(pics):
        raise ValueError(f"{len(pics)} images but selected indices for {len(chosen)}")
    rows, cols = _grid_shape(grid)
    on, total = np.zeros(len(pics), dtype=np.int64), np.zeros(len(pics), dtype=np.int64)
    for k in range(len(pics)):
        mask = foreground_patches(pics[k], (rows, cols)).ravel()
        patches = chosen[k].astype(np.int64).ravel() - int(num_prefix_tokens)
        patches = patches[(patches >= 0) & (patches < rows * cols)]
        on[k], total[k] = int(mask[patches].sum()), patches.size
    return on, total


def foreground_fractions(
    images: Any, indices: Any, grid: int | tuple[int, int], num_prefix_tokens: int = 1
) -> np.ndarray:
    """Per image, the share of its selected patch tokens (over every layer and head given) on the foreground.

    `images` [K, H, W, C]; `indices` [K, ...] sequence positions (position p + num_prefix_tokens is patch p of the
    row-major grid; class/prefix tokens and positions off the grid are not counted). NaN for an image without any.
    """
    on, total = foreground_counts(images, indices, grid, num_prefix_tokens)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, on / np.maximum(total, 1), np.nan)


def foreground_fraction(images: Any, indices: Any, grid: int | tuple[int, int], num_prefix_tokens: int = 1) -> float:
    """The share of all selected patch tokens (every image, layer and head given) on the images' foreground."""
    on, total = foreground_counts(images, indices, grid, num_prefix_tokens)
    return float(on.sum() / total.sum()) if total.sum() else math.nan
