"""Formula-driven image generators (vectorised numpy): IFS fractals (FractalDB) and radial contours (RCDB).

Both follow the same scheme as Kataoka et al.: a category is a set of formula parameters drawn once from the
seed, an instance is that category rendered with small random variations (parameter jitter, pose, colour, line
width). Images are uint8 [N, H, W, 3] on black; the same (seed, arguments) always give the same bytes.
"""

from __future__ import annotations

import math

import numpy as np

# FractalDB keeps an IFS only if its attractor fills at least this share of the canvas (0.2 at 362 px in the
# paper); at the few-dozen-pixel canvases used here a point cloud covers fewer pixels, so the bar is lower.
FRACTAL_MIN_FILL = 0.12
FRACTAL_MAPS = (2, 4)  # affine maps per system, inclusive (FractalDB: 2 to 8; few maps give the clearest shapes)
FRACTAL_WARMUP = 12  # chaos-game steps before points are drawn (the orbit reaches the attractor)
FRACTAL_JITTER = (0.85, 1.15)  # FractalDB's intra-category variation: one map parameter scaled by a factor


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """Saturated random colours [n, 3] in [0.35, 1] (never black on the black background)."""
    colour = rng.uniform(0.0, 1.0, size=(n, 3)).astype(np.float32)
    colour /= np.maximum(colour.max(axis=1, keepdims=True), 1e-6)
    return 0.35 + 0.65 * colour


def ifs_systems(seed: int, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` IFS categories that pass FractalDB's filling-rate test: maps [count, M, 2, 3], probabilities
    [count, M] (zero for unused maps). Candidates are drawn and tested in vectorised batches."""
    rng = _rng(seed, 1)
    m_max = FRACTAL_MAPS[1]
    kept_maps: list[np.ndarray] = []
    kept_prob: list[np.ndarray] = []
    while sum(len(k) for k in kept_maps) < count:
        batch = 4 * count
        maps = rng.uniform(-1.0, 1.0, size=(batch, m_max, 2, 3)).astype(np.float32)
        n_maps = rng.integers(FRACTAL_MAPS[0], m_max + 1, size=batch)
        used = np.arange(m_max)[None, :] < n_maps[:, None]
        det = np.abs(maps[..., 0, 0] * maps[..., 1, 1] - maps[..., 0, 1] * maps[..., 1, 0])
        prob = np.where(used, det, 0.0)
        valid = prob.sum(axis=1) > 1e-3
        prob = prob / np.maximum(prob.sum(axis=1, keepdims=True), 1e-9)
        points = chaos_game(maps, prob, _rng(seed, 2, len(kept_maps)), points=512, steps=24)
        fill = (render_points(points, size, np.ones((batch, 3), np.float32)).max(axis=-1) > 0).mean(axis=(1, 2))
        good = valid & np.isfinite(points).all(axis=(1, 2)) & (fill >= FRACTAL_MIN_FILL)
        kept_maps.append(maps[good])
        kept_prob.append(prob[good].astype(np.float32))
    return np.concatenate(kept_maps)[:count], np.concatenate(kept_prob)[:count]


def chaos_game(maps: np.ndarray, prob: np.ndarray, rng: np.random.Generator, points: int, steps: int) -> np.ndarray:
    """Run the chaos game for every system at once: `points` parallel orbits per system, the positions after
    FRACTAL_WARMUP steps collected, returned as [systems, points * steps, 2] (NaN where an orbit diverged)."""
    n = len(maps)
    cum = np.cumsum(prob, axis=1)
    cum[:, -1] = 1.0 + 1e-6  # rounding must never leave a draw without a map
    xy = rng.uniform(-0.5, 0.5, size=(n, points, 2)).astype(np.float32)
    rows = np.arange(n)[:, None]
    out = np.empty((n, points * steps, 2), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(FRACTAL_WARMUP + steps):
            pick = (rng.random((n, points), dtype=np.float32)[..., None] > cum[:, None, :]).sum(axis=-1)
            affine = maps[rows, pick]  # [n, points, 2, 3]
            xy = np.einsum("npij,npj->npi", affine[..., :2], xy) + affine[..., 2]
            xy = np.clip(xy, -1e6, 1e6)
            if step >= FRACTAL_WARMUP:
                k = step - FRACTAL_WARMUP
                out[:, k * points : (k + 1) * points] = xy
    return out


def render_points(
    points: np.ndarray, size: int, colour: np.ndarray, scale: np.ndarray | None = None, shift: np.ndarray | None = None
) -> np.ndarray:
    """Rasterise point clouds [n, P, 2] into float images [n, size, size, 3]: each cloud fitted to the canvas by
    its 1-99 % quantile box (times `scale`, moved by `shift` in canvas units), point density on a log scale."""
    n = len(points)
    lo = np.nanquantile(points, 0.01, axis=1)
    hi = np.nanquantile(points, 0.99, axis=1)
    centre = (lo + hi) / 2
    extent = np.maximum((hi - lo).max(axis=1), 1e-6)
    factor = (0.9 if scale is None else scale) / extent  # [n]
    uv = (points - centre[:, None, :]) * factor[:, None, None] + 0.5
    if shift is not None:
        uv += shift[:, None, :]
    pix = np.floor(uv * size).astype(np.int64)
    inside = np.isfinite(uv).all(axis=-1) & (pix >= 0).all(axis=-1) & (pix < size).all(axis=-1)
    flat = np.where(inside, np.arange(n)[:, None] * size * size + pix[..., 1] * size + pix[..., 0], -1)
    counts = np.bincount(flat[flat >= 0], minlength=n * size * size).reshape(n, size, size).astype(np.float32)
    density = np.log1p(counts)
    density /= np.maximum(density.max(axis=(1, 2), keepdims=True), 1e-6)
    density = np.where(counts > 0, 0.35 + 0.65 * density, 0.0)
    return density[..., None] * colour[:, None, None, :]


def smooth_backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Dim random-colour canvases [n, size, size, 3] with a random linear illumination gradient and vignetting."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    angle = rng.uniform(0, 2 * math.pi, size=n).astype(np.float32)[:, None, None]
    tilt = rng.uniform(0.0, 0.6, size=n).astype(np.float32)[:, None, None]
    shade = 1.0 + tilt * (np.cos(angle) * grid[None, None, :] + np.sin(angle) * grid[None, :, None])
    shade -= rng.uniform(0.0, 1.2, size=n).astype(np.float32)[:, None, None] * (
        grid[None, None, :] ** 2 + grid[None, :, None] ** 2
    )
    colour = rng.uniform(0.05, 0.55, size=(n, 3)).astype(np.float32)
    return np.clip(shade, 0.0, None)[..., None] * colour[:, None, None, :]


def fractal_images(
    maps: np.ndarray,
    prob: np.ndarray,
    labels: np.ndarray,
    size: int,
    seed: int,
    stream: int,
    points: int = 96,
    background: bool = False,
) -> np.ndarray:
    """Instances of the IFS categories `labels` (indices into maps/prob): one map parameter jittered, random
    scale, shift, flip and colour (FractalDB's variations), rendered at `size` px as uint8 [N, size, size, 3], on
    black or (`background`) on a smooth random-colour canvas."""
    rng = _rng(seed, 3, stream)
    n = len(labels)
    chosen = maps[labels].copy()
    which = rng.integers(0, chosen.shape[1] * 6, size=n)
    flat = chosen.reshape(n, -1)
    flat[np.arange(n), which] *= rng.uniform(*FRACTAL_JITTER, size=n).astype(np.float32)
    steps = max(8, size * size // (4 * points))  # about one point per quarter pixel
    cloud = chaos_game(chosen, prob[labels], rng, points=points, steps=steps)
    cloud[rng.random(n) < 0.5, :, 0] *= -1  # horizontal flip
    img = render_points(
        cloud, size, _colours(rng, n), scale=rng.uniform(0.65, 1.0, size=n), shift=rng.uniform(-0.08, 0.08, (n, 2))
    )
    if background:
        canvas = smooth_backgrounds(rng, n, size)
        drawn = img.max(axis=-1, keepdims=True) > 0
        img = np.where(drawn, img, canvas)
    return _to_uint8(img)


def contour_categories(seed: int, count: int, harmonics: int = 4) -> dict[str, np.ndarray]:
    """`count` RCDB-style categories: polygon vertices, radial noise (harmonic amplitudes and phases standing for
    RCDB's Perlin noise), number and spacing of the concentric contours."""
    rng = _rng(seed, 11)
    freq = np.arange(2, 2 + harmonics)
    return {
        "vertices": rng.integers(3, 13, size=count),
        "amp": (rng.uniform(0.0, 0.22, size=(count, harmonics)) / np.sqrt(freq / 2.0)).astype(np.float32),
        "phase": rng.uniform(0, 2 * math.pi, size=(count, harmonics)).astype(np.float32),
        "freq": np.broadcast_to(freq, (count, harmonics)).astype(np.float32),
        "rings": rng.integers(2, 9, size=count),
    }


def contour_images(cats: dict[str, np.ndarray], labels: np.ndarray, size: int, seed: int, stream: int) -> np.ndarray:
    """Instances of the contour categories `labels`: rotated, moved, scaled, random line width and colour, drawn
    anti-aliased at `size` px as uint8 [N, size, size, 3]."""
    rng = _rng(seed, 12, stream)
    n = len(labels)
    vertices = cats["vertices"][labels].astype(np.float32)[:, None, None]
    rings = cats["rings"][labels].astype(np.float32)[:, None, None]
    centre = 0.5 + rng.uniform(-0.1, 0.1, size=(n, 2)).astype(np.float32)
    outer = rng.uniform(0.3, 0.48, size=n).astype(np.float32)[:, None, None]
    rotation = rng.uniform(0, 2 * math.pi, size=n).astype(np.float32)[:, None, None]
    width = rng.uniform(0.6, 1.6, size=n).astype(np.float32)[:, None, None] / size  # line half-width, canvas units
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    dx = grid[None, None, :] - centre[:, 0, None, None]
    dy = grid[None, :, None] - centre[:, 1, None, None]
    rho = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx) - rotation
    sector = 2 * math.pi / vertices
    polygon = np.cos(math.pi / vertices) / np.cos(np.mod(theta, sector) - sector / 2)  # regular polygon, radius 1
    noise = np.ones_like(theta)
    for k in range(cats["amp"].shape[1]):
        amp = cats["amp"][labels, k][:, None, None]
        phase = cats["phase"][labels, k][:, None, None]
        noise += amp * np.cos(cats["freq"][labels, k][:, None, None] * theta + phase)
    shape = polygon * noise  # the contour's radius in this direction, per unit of ring radius
    spacing = outer / rings
    s = rho / shape  # the ring coordinate: contour k lies at s = k * spacing
    ring = np.clip(np.round(s / spacing), 1, rings)
    distance = np.abs(s - ring * spacing) * shape  # back to canvas units, so lines keep their width
    alpha = np.clip(width + 0.5 / size - distance, 0.0, 1.0 / size) * size
    img = alpha[..., None] * _colours(rng, n)[:, None, None, :]
    return _to_uint8(img)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
