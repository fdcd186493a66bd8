"""Decode any image file into an 8-bit RGB PIL image: grayscale, 16-bit, palette, RGBA and EXIF-rotated too."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}


class BadImageError(ValueError):
    """An image file that cannot be decoded."""


def load_image(path: str | Path, data: bytes | None = None) -> Image.Image:
    """Open `path` fully (so truncation is caught here) and return it upright as 8-bit RGB; `data`: its bytes, read."""
    path = Path(path)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"{path}: {describe_error(path, err)}") from err


def describe_error(path: Path, err: Exception) -> str:
    """A short reason why a file is not a usable image."""
    if path.exists() and path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if isinstance(err, UnidentifiedImageError):
        return "not an image (unrecognised format)"
    if "truncated" in str(err).lower():
        return "truncated image data"
    return f"unreadable image ({err})"


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit grey is rescaled by its bit depth, alpha composited on black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":
        array = np.asarray(img, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        grey = ((array - array.min()) / span * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
