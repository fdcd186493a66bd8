"""Figure properties (not pixels): Figure 1's size key, drawing order, seed counts and error bars; Figure 2's line
styles and direct labels; Figure 9's one image per class, shared colour scale, heading and foreground fraction."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.image import AxesImage
from matplotlib.text import Annotation

from petlbench.reports import figures as figs
from petlbench.reports.introspection import (
    foreground_fraction,
    foreground_fractions,
    foreground_patches,
    introspection_arrays,
    one_per_class,
    save_introspection,
    validate_introspection,
)

# ----------------------------------------------------------------------------------------------------------
# Figure 1
# ----------------------------------------------------------------------------------------------------------

POINTS: list[dict[str, Any]] = [
    {"method": "full_ft", "label": "Full FT", "ratio_pct": 100.0, "avg_auc": 85.5, "mem_mb": 20000.0, "n_seeds": 5},
    {"method": "lora", "label": "LoRA", "ratio_pct": 0.68, "avg_auc": 86.0, "mem_mb": 19000.0, "n_seeds": 1},
    {
        "method": "fpt_plus",
        "label": "FPT+",
        "ratio_pct": 1.03,
        "avg_auc": 87.0,
        "mem_mb": 700.0,
        "n_seeds": 5,
        "auc_std": 0.8,
    },
    {
        "method": "fpt",
        "label": "FPT",
        "ratio_pct": 1.81,
        "avg_auc": 86.5,
        "mem_mb": 1800.0,
        "n_seeds": 2,
        "n_seeds_max": 3,
        "auc_std": 1.5,
    },
    {"method": "bitfit", "label": "BitFit", "ratio_pct": 0.12, "avg_auc": 84.0, "mem_mb": None, "n_seeds": 3},
]


def _mib(label: str) -> float:
    """The number of a size-key label such as "2,000 MiB"."""
    return float(label.replace(" MiB", "").replace(",", ""))


def test_size_key_spans_the_data_and_never_shows_zero() -> None:
    for values in ([700.0, 1800.0, 19000.0, 20000.0], [3.2, 4.0, 41.0], [0.3, 0.9, 4.2], [700.0, 760.0, 900.0]):
        keys = figs.size_key_values(values)
        assert 1 <= len(keys) <= 3 and keys == sorted(set(keys))
        assert all(min(values) <= k <= max(values) for k in keys), (values, keys)
        assert all(k > 0 and _mib(figs.mem_text(k)) > 0 and figs.mem_text(k) != "0 MiB" for k in keys)
        assert len(keys) == 3 or len(set(values)) < 3
    assert figs.size_key_values([700.0, 20000.0]) == [1000.0, 5000.0, 20000.0]  # round values inside the range
    assert figs.size_key_values([512.0]) == [510.0]
    assert figs.size_key_values([]) == []


def test_figure1_key_order_seed_counts_and_error_bars() -> None:
    fig = figs.draw_auc_vs_params(POINTS)
    ax = fig.axes[0]
    key = next(leg for leg in fig.legends if leg.get_title().get_text() == "Peak memory")
    values = [_mib(t.get_text()) for t in key.get_texts()]
    assert len(values) == 3 and min(values) >= 700.0 and max(values) <= 20000.0
    bubbles = [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets())]
    assert len(bubbles) == len(POINTS)
    sizes = [float(c.get_sizes()[0]) for c in bubbles]
    assert sizes == sorted(sizes, reverse=True)  # drawn large to small
    by_size = sorted(bubbles, key=lambda c: float(c.get_sizes()[0]))
    zorders = [c.get_zorder() for c in by_size]
    assert all(a > b for a, b in zip(zorders, zorders[1:], strict=False))  # smaller bubbles above larger ones
    labels = [t.get_text() for t in next(leg for leg in fig.legends if "Method" in leg.get_title().get_text()).texts]
    assert "Full FT (n=5)" in labels and "LoRA (n=1)" in labels and "FPT (n=2–3)" in labels
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # FPT+ and FPT: n > 1 with a std; Full FT has n = 5 but no std, LoRA one seed
    spans = sorted(
        float(np.ptp(seg[:, 1])) for bar in bars for seg in bar.lines[2][0].get_segments()
    )  # each error bar spans 2 × std
    assert spans == pytest.approx([1.6, 3.0])
    assert max(c.get_zorder() for c in bubbles) < min(bar.lines[2][0].get_zorder() for bar in bars)


def test_figure1_single_seed_has_no_error_bar(tmp_path: Path) -> None:
    point = {**POINTS[0], "n_seeds": 1, "auc_std": 0.5}
    fig = figs.draw_auc_vs_params([point])
    assert not [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    paths = figs.figure_auc_vs_params([point], tmp_path / "f1")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)


# ----------------------------------------------------------------------------------------------------------
# Figure 2
# ----------------------------------------------------------------------------------------------------------


def _rows() -> list[dict[str, Any]]:
    """Estimator-like rows: Prompt-tuning, Adapter and BitFit share every value; LoRA runs out of memory at 1024."""
    bases = {"full_ft": 7800.0, "vpt": 6000.0, "adapter": 6000.0, "bitfit": 6000.0, "lora": 6500.0, "fpt_plus": 570.0}
    rows: list[dict[str, Any]] = []
    for method, base in bases.items():
        for res in (256, 512, 1024):
            oom = method == "lora" and res == 1024
            mem = None if oom else base * (res / 256) ** 2
            rows.append({"method": method, "res": res, "est_peak_mem_mb": mem, "oom": oom})
    return rows


LABELS = {
    "full_ft": "Full FT",
    "vpt": "Prompt-tuning",
    "adapter": "Adapter",
    "bitfit": "BitFit",
    "lora": "LoRA",
    "fpt_plus": "FPT+",
}


def test_line_styles_never_repeat_both() -> None:
    pairs = figs.line_styles(len(figs.LINESTYLES) * len(figs.MARKERS))
    assert len(set(pairs)) == len(pairs)


def test_spread_positions_keep_a_gap_in_order() -> None:
    placed = figs.spread_positions([0.5, 0.5, 0.5, 0.1, 0.98], gap=0.05)
    ordered = sorted(placed)
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(ordered, ordered[1:], strict=False))
    assert max(placed) <= 1.0 and placed[3] == pytest.approx(0.1)
    assert placed[4] == max(placed)  # order kept


def test_figure2_styles_and_direct_labels(tmp_path: Path) -> None:
    fig = figs.draw_memory_vs_resolution(_rows(), 49152.0, "48 GiB", LABELS)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in LABELS.values()}
    assert set(lines) == set(LABELS.values())
    pairs = [(line.get_linestyle(), line.get_marker()) for line in lines.values()]
    assert len(set(pairs)) == len(pairs)  # no two methods share both line style and marker
    names = {t.get_text(): t for t in ax.texts if isinstance(t, Annotation)}
    assert set(names) == set(LABELS.values())  # every line named directly
    same = [names[n] for n in ("Prompt-tuning", "Adapter", "BitFit")]
    assert all(t.xyann[0] > 1.0 for t in same)  # in the right margin, at the lines' right end
    heights = sorted(t.xyann[1] for t in same)
    assert all(b - a >= 0.05 for a, b in zip(heights, heights[1:], strict=False))  # told apart
    assert [t.xy for t in same] == [same[0].xy] * 3  # each leader still points at the (shared) end point
    lora = names["LoRA"]
    assert lora.xy == (512, pytest.approx(6500.0 * 4 / 1024)) and lora.anncoords == "offset points"  # inline
    assert fig.legends  # the legend stays, below the plot
    figs.figure_memory_vs_resolution(_rows(), tmp_path / "f2", 49152.0, "48 GiB", LABELS)
    assert (tmp_path / "f2.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------
# Figure 9
# ----------------------------------------------------------------------------------------------------------


def _half_image(value: int = 200) -> np.ndarray:
    """64×64 uint8: the left half (patch columns 0 and 1 of a 4×4 grid) bright, the right half black."""
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, :32] = value
    return image


def test_foreground_patches_threshold_and_majority() -> None:
    assert foreground_patches(_half_image(), 4).tolist() == [[True, True, False, False]] * 4
    assert not foreground_patches(_half_image(value=5), 4).any()  # 5/255 < 10/255: the black surround
    image = np.zeros((32, 32, 3))  # float, full scale 1
    image[:10, :16] = 0.5  # 10 of 16 rows of the top-left 16×16 patch: 62.5 % of its pixels
    image[16:22, 16:] = 0.5  # 6 of 16 rows of the bottom-right patch: 37.5 %
    assert foreground_patches(image, 2).tolist() == [[True, False], [False, False]]


def test_foreground_fraction_on_a_known_foreground() -> None:
    images = np.stack([_half_image(), _half_image()])
    # image 0: class token (not counted) and patches 0, 1, 4 (foreground) and 3 (background): 3 of 4
    # image 1: patches 2, 3 (background) and 8 (foreground): 1 of 3
    indices = np.array([[0, 1, 2, 5, 4], [3, 4, 9, 0, 0]])
    assert foreground_fractions(images, indices, 4).tolist() == pytest.approx([0.75, 1 / 3])
    assert foreground_fraction(images, indices, 4) == pytest.approx(4 / 7)
    every = np.stack([indices, indices], axis=1)[:, :, None, :]  # [K, L=2, H=1, n]: counted over layers and heads
    assert foreground_fraction(images, every, 4) == pytest.approx(4 / 7)
    assert math.isnan(foreground_fraction(images, np.zeros((2, 3), dtype=int), 4))  # class tokens only


def test_one_per_class() -> None:
    assert one_per_class([0, 1, 0, 1], 4) == [0, 1]
    assert one_per_class([2, 2, 0, 1, 0], 5) == [0, 2, 3]
    assert one_per_class([0, 1, 2, 3, 4, 5], 6) == [0, 1, 2, 3]
    assert one_per_class(None, 6) == [0, 1, 2, 3]


def test_introspection_keeps_every_layer_and_head(tmp_path: Path) -> None:
    maps = {
        "prompt_attention": np.random.rand(3, 2, 4, 5, 7),
        "selected_indices": np.random.randint(0, 17, size=(3, 2, 4, 7)),
        "grid": 4,
    }
    arrays = introspection_arrays(maps, np.random.rand(3, 64, 64, 3), max_images=2, labels=np.array([0, 1, 0]))
    assert arrays["selected_indices"].shape == (2, 2, 4, 7)
    assert arrays["token_indices"].tolist() == maps["selected_indices"][:2, -1, 0].tolist()
    save_introspection(tmp_path, arrays)
    with pytest.raises(ValueError):
        validate_introspection({**arrays, "selected_indices": np.zeros((5, 2, 7), dtype=int)})


def _sample(image: np.ndarray, indices: list[int], attention: list[float], label: int) -> dict[str, Any]:
    return {
        "image": image,
        "token_indices": indices,
        "token_attention": attention,
        "patch_size": 16,
        "title": f"class {label}:",
    }


def test_figure9_one_scale_heading_and_background_note() -> None:
    image = _half_image()
    samples = [
        _sample(image, [0, 3, 4, 8, 13], [0.4, 0.1, 0.2, 0.3, 0.4], 0),  # patches 2, 3, 7 (background), 12
        _sample(image, [1, 4, 16], [0.01, 0.02, 0.03], 1),  # 0 and 15: 1 of 3 on the foreground
    ]
    fig, fraction = figs.draw_token_attention(samples, "layer 11, head 0", "FPT+", "fpt_plus-abc123", "random-init")
    assert fraction == pytest.approx(2 / 7)
    heat = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "inferno"]
    assert len(heat) == 2 and len({im.get_clim() for im in heat}) == 1  # one colour scale
    assert heat[0].get_clim() == (0.0, pytest.approx(0.4))
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and len(fig.axes) == 2 * len(samples) + 1
    title = fig.get_suptitle()
    assert "FPT+ · run fpt_plus-abc123 · weights random-init" in title
    assert re.search(r"\b29% of selected tokens on the foreground", title)
    note = " ".join(fig.get_supxlabel().split())
    assert "most selected tokens lie on the background" in note and "random-init LPM" in note
    panels = [ax.get_title() for ax in fig.axes[:4:2]]
    assert panels == [
        "class 0: 4 tokens shown\n25% on the foreground (shown head)",
        "class 1: 3 tokens shown\n33% on the foreground (shown head)",
    ]


def test_figure9_counts_every_layer_and_no_note_on_the_foreground(tmp_path: Path) -> None:
    image = _half_image()
    sample = _sample(image, [3, 4], [0.5, 0.5], 0)  # the shown head picks the background
    sample["selected_indices"] = np.array([[[1, 2, 5]], [[6, 9, 3]]])  # every layer: 5 of 6 on the foreground
    fig, fraction = figs.draw_token_attention([sample], method="FPT", run_id="fpt-1", weights="timm-pretrained")
    assert fraction == pytest.approx(5 / 6)
    assert "83% of selected tokens on the foreground (over every layer and head" in fig.get_suptitle()
    assert fig.get_supxlabel() == ""
    assert figs.background_note(0.3, "timm-pretrained").startswith("Note: most selected tokens lie on the background")
    assert "random-init" not in figs.background_note(0.3, "timm-pretrained")
    paths = figs.figure_token_attention([sample], tmp_path / "f9", method="FPT", run_id="fpt-1")
    assert all(p.stat().st_size > 0 for p in paths)


def test_figure9_image_keeps_its_value_range() -> None:
    fig, _ = figs.draw_token_attention([_sample(_half_image(), [1], [0.2], 0)])
    shown = [im for im in fig.axes[0].get_images() if isinstance(im, AxesImage)][0]
    assert np.asarray(shown.get_array()).max() == 200  # uint8 drawn as it is, no rescaling


def test_every_method_of_a_figure_gets_its_own_colour() -> None:
    """Eleven built-ins outnumber tab10: a colour reused within one figure would label two methods alike."""
    from petlbench.core.method import method_keys
    from petlbench.reports.figures import PALETTE, method_colors

    order = method_keys()
    everything = method_colors([*order, "plugin_a", "plugin_b"], order)
    assert len(set(everything.values())) == len(everything) == len(order) + 2
    assert everything[order[0]] == PALETTE[0]  # registry position keeps colours stable across figures
    subset = method_colors(["fpt_plus", "full_ft"], order)
    assert subset == {key: everything[key] for key in subset}
