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
    labels                   int [K]        class labels (optional, shown in titles).
"""

from __future__ import annotations

import io
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
)


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
        chosen = _to_numpy(selected)[:k, layer]
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
