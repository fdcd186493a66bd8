"""Reports: PPE/PME against hand-computed values, table cells and marks on a fixture store, every figure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from petlbench.core.results import ResultStore
from petlbench.reports import build_report, load_introspection, parse_gpu_mem, pme, ppe, save_introspection
from petlbench.reports import figures as figs
from petlbench.reports import tables as tbl
from petlbench.reports.collect import load_runs
from petlbench.reports.introspection import introspection_arrays
from petlbench.reports.render import to_csv, to_latex, to_markdown

# ----------------------------------------------------------------------------------------------------------
# Fixture: a small results store written with ResultStore.save
# ----------------------------------------------------------------------------------------------------------

FPT_DEFAULTS: dict[str, Any] = {
    "num_prompts": 16,
    "reduction": 8,
    "side_layers": 6,
    "side_res": None,
    "token_ratio": 0.2,
    "fusion": "cross_attention",
    "use_lpm": True,
    "asymmetric": True,
    "token_selection": True,
    "preload": True,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "full_ft": {},
    "linear_probe": {},
    "bitfit": {},
    "lora": {"r": 16, "alpha": 16},
    "fpt_plus": FPT_DEFAULTS,
    "fpt": {**FPT_DEFAULTS, "side_layers": 12},
}
NAMES = {
    "full_ft": "Full fine-tuning",
    "linear_probe": "Linear probing",
    "bitfit": "BitFit",
    "lora": "LoRA",
    "fpt_plus": "FPT+",
    "fpt": "FPT",
}
RATIO = {"full_ft": 100.0, "linear_probe": 0.01, "bitfit": 0.12, "lora": 0.68, "fpt_plus": 1.03, "fpt": 1.81}
MEM = {"full_ft": 20000.0, "linear_probe": 3000.0, "bitfit": 18000.0, "lora": 19000.0, "fpt_plus": 700.0, "fpt": 1800.0}


def fake_defaults(method: str) -> dict[str, Any] | None:
    """The fixture's method defaults (independent of the real method modules)."""
    return DEFAULTS.get(method)


def make_record(
    method: str,
    dataset: str,
    auc: float | None,
    seed: int = 0,
    status: str = "finished",
    weights: str = "w-sup",
    res: int = 512,
    options: dict[str, Any] | None = None,
    mem: float | None = None,
    estimated: bool = False,
    tag: str = "",
    **eff: Any,
) -> dict[str, Any]:
    """One fake result record with the fields reports read."""
    opts = {**DEFAULTS[method], **(options or {})}
    run_id = f"{method}-{dataset}-{weights}-{res}-s{seed}{tag}"
    mem = MEM[method] if mem is None else mem
    efficiency: dict[str, Any] = {"est_peak_mem_mb": mem * 1.1 if not estimated else mem}
    if not estimated:
        efficiency.update(measured_peak_allocated_mb=mem, peak_mem_mb=mem, peak_mem_source="measured")
    else:
        efficiency.update(peak_mem_mb=mem, peak_mem_source="estimated")
    efficiency.update(eff)
    record: dict[str, Any] = {
        "schema": 1,
        "run_id": run_id,
        "status": status,
        "error": None if status == "finished" else status,
        "method_name": NAMES[method],
        "config": {
            "method": method,
            "dataset": dataset,
            "backbone": "vit_base_patch16_224",
            "weights": weights,
            "res": res,
            "epochs": 20,
            "batch_size": 16,
            "lr": 1e-3,
            "weight_decay": 0.1,
            "seed": seed,
            "method_options": opts,
            "device": "cuda",
        },
        "environment": {"device": {"name": "NVIDIA H100"}},
        "params": {"trainable": int(RATIO[method] * 1e4), "total": 1_000_000, "ratio_pct": RATIO[method]},
    }
    if status == "finished":
        record["metrics"] = {"best_epoch": 3, "val_auc": auc, "test_auc": auc, "test_acc": 50.0}
        record["efficiency"] = efficiency
    return record


def write_fixture(root: Path) -> ResultStore:
    """Write the fixture runs: two datasets, two weights, a failed run, an OOM run, a missing cell, ablations."""
    store = ResultStore(root)
    power = {"available": True, "power_peak_w": 300.0, "power_avg_w": 250.0, "energy_j": 50_000.0, "interval_s": 0.1}
    eff = {
        "fwd_gflops": 87.84,
        "flops_unit": "GMAC",
        "train_seconds": 1000.0,
        "train_images_per_s": 20.0,
        "power": power,
    }
    fpt_eff = {
        **eff,
        "fwd_gflops": 0.06,
        "train_seconds": 90.0,
        "train_images_per_s": 350.0,
        "power": {**power, "power_peak_w": 114.0, "power_avg_w": 107.0, "energy_j": 9_700.0},
        "preload": {"preloaded": True, "preload_seconds": 30.0, "num_images": 1000, "cache_reused": False},
        "preload_seconds": 30.0,
        "preload_gflops_per_image": 87.84,
    }
    records = [
        make_record("full_ft", "dsA", 90.0, seed=0, **eff),
        make_record("full_ft", "dsA", 92.0, seed=1, **eff),
        make_record("full_ft", "dsB", 80.0, **eff),
        make_record("linear_probe", "dsA", 80.0, **{**eff, "train_seconds": 400.0, "train_images_per_s": 50.0}),
        make_record("linear_probe", "dsB", 70.0, **eff),
        make_record("bitfit", "dsA", 86.0, **{**eff, "train_seconds": 950.0}),  # no dsB run: a missing cell
        make_record("lora", "dsA", 88.0, **{**eff, "fwd_gflops": 107.89, "train_seconds": 1010.0}),
        make_record("lora", "dsB", None, status="failed"),  # a failed run
        make_record("fpt_plus", "dsA", 89.0, seed=0, **fpt_eff),
        make_record(
            "fpt_plus",
            "dsA",
            91.0,
            seed=1,
            **{
                **fpt_eff,
                "preload": {"preloaded": True, "preload_seconds": 0.2, "num_images": 1000, "cache_reused": True},
            },
        ),
        make_record("fpt_plus", "dsB", 84.0, **fpt_eff),
        # second pre-trained weights: a second section of Table I
        make_record("full_ft", "dsA", 88.0, weights="w-dino"),
        make_record("full_ft", "dsB", 78.0, weights="w-dino"),
        make_record("fpt_plus", "dsA", 87.0, weights="w-dino"),
        make_record("fpt_plus", "dsB", 83.0, weights="w-dino"),
        # Table III: a second resolution with an OOM run and an estimate over the 48 GiB budget
        make_record("full_ft", "dsA", None, res=1024, status="oom"),
        make_record("linear_probe", "dsA", 81.0, res=1024, mem=60000.0, estimated=True),
        make_record("linear_probe", "dsB", 71.0, res=1024, mem=60000.0, estimated=True),
        make_record("fpt_plus", "dsA", 90.0, res=1024, mem=900.0),
        make_record("fpt_plus", "dsB", 85.0, res=1024, mem=900.0),
        # Table V (num_prompts) and Figures 5, 7, 8
        make_record("fpt_plus", "dsA", 85.0, options={"num_prompts": 4}, mem=690.0, tag="p4"),
        make_record("fpt_plus", "dsB", 82.0, options={"num_prompts": 4}, mem=690.0, tag="p4"),
        make_record("fpt_plus", "dsA", 88.0, options={"num_prompts": 32}, mem=800.0, tag="p32"),
        make_record("fpt_plus", "dsB", 83.0, options={"num_prompts": 32}, mem=800.0, tag="p32"),
        make_record("fpt_plus", "dsA", 86.0, options={"side_layers": 3}, mem=600.0, tag="l3"),
        make_record("fpt_plus", "dsA", 89.5, options={"token_ratio": 0.5}, mem=1500.0, tag="t5"),
        make_record("fpt_plus", "dsA", 75.0, options={"use_lpm": False}, mem=300.0, tag="c0"),
        make_record(
            "fpt_plus",
            "dsA",
            84.0,
            options={"fusion": "mlp", "asymmetric": False, "token_selection": False, "preload": False},
            mem=9000.0,
            tag="c1",
        ),
        make_record(
            "fpt_plus",
            "dsA",
            86.0,
            options={"asymmetric": False, "token_selection": False, "preload": False},
            mem=4000.0,
            tag="c2",
        ),
    ]
    for record in records:
        store.save(record)
    yy, xx = np.mgrid[0:64, 0:64]
    disc = (((yy - 28) ** 2 + (xx - 36) ** 2) < 15**2)[..., None] * np.array([0.8, 0.3, 0.1])
    images = np.stack([disc + 0.1, disc[::-1] + 0.1]).clip(0, 1)  # two fundus-like discs
    save_introspection(
        store.run_dir("fpt_plus-dsA-w-sup-512-s0"),
        {
            "layer_prompt_attention": np.linspace(0.1, 0.35, 6),
            "images": images,
            "token_indices": np.array([[0, 1, 6, 11], [3, 4, 16, 9]]),
            "token_attention": np.array([[0.1, 0.4, 0.3, 0.2], [0.25, 0.25, 0.3, 0.2]]),
            "patch_size": 16,
            "layer": 11,
            "head": 0,
            "labels": np.array([0, 1]),
        },
    )
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ResultStore:
    """The fixture results store (written once per module)."""
    return write_fixture(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def runs(store: ResultStore):  # -> Runs
    """The fixture runs loaded with the fixture's defaults."""
    return load_runs(store.root, fake_defaults)


# ----------------------------------------------------------------------------------------------------------
# PPE / PME
# ----------------------------------------------------------------------------------------------------------


def test_ppe_pme_hand_computed() -> None:
    # Full fine-tuning: r = m = 1 -> factor e^(-log10 2) = 0.740036...; the papers print 88.82 -> 65.73.
    assert ppe(88.82, 1.0) == pytest.approx(88.82 * math.exp(-math.log10(2.0)))
    assert round(ppe(88.82, 1.0), 2) == 65.73
    assert round(pme(88.82, 1.0), 2) == 65.73
    # FPT+ in the papers: 87.12 with 1.03% of the parameters and 736 / 23,128 MB of full FT's memory.
    assert round(ppe(87.12, 0.0103), 2) == 86.73
    assert round(pme(87.12, 736 / 23128), 2) == 85.94
    # BitFit: 85.67 at 0.12% -> 85.63; PME with 20,382 / 23,128 MB -> 65.11 (Table I).
    assert round(ppe(85.67, 0.0012), 2) == 85.63
    assert round(pme(85.67, 20382 / 23128), 2) == 65.11
    assert ppe(80.0, 0.0) == 80.0
    with pytest.raises(ValueError):
        pme(80.0, -0.5)


def test_parse_gpu_mem() -> None:
    assert parse_gpu_mem("48GB") == 48 * 2**30
    assert parse_gpu_mem("80 GiB") == 80 * 2**30
    assert parse_gpu_mem("24576MB") == 24 * 2**30
    with pytest.raises(ValueError):
        parse_gpu_mem("lots")


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def _row(markdown: str, label: str, occurrence: int = 0) -> str:
    return [line for line in markdown.splitlines() if line.startswith(f"| {label} |")][occurrence]


def test_default_options_and_selection(runs) -> None:
    df = runs.df
    assert not df.loc[df["run_id"] == "fpt_plus-dsA-w-sup-512-s0p4", "is_default"].item()
    assert df.loc[df["run_id"] == "fpt_plus-dsA-w-sup-512-s0", "is_default"].item()
    sel = tbl.select_main(runs)
    assert (sel.backbone, sel.res, sel.batch_size, sel.epochs) == ("vit_base_patch16_224", 512, 16, 20)
    assert sel.runs["is_default"].all()


def test_table_main(runs) -> None:
    table = tbl.table_main(runs, tbl.select_main(runs), reference=tbl.REFERENCE_METHODS)
    md = to_markdown(table)
    full = 85.5 * math.exp(-math.log10(2))  # Avg (91 + 80) / 2, r = m = 1
    assert _row(md, "Full fine-tuning") == (
        f"| Full fine-tuning | 100 | 20,000 | 91.00 ± 1.41 | 80.00 ± — (n=1) | 85.50 | {full:.2f} | {full:.2f} |"
    )
    # FPT+: best (bold) memory, dsA, dsB, Avg, PPE, PME among the ranked (PETL) rows; BitFit's params best.
    fpt_ppe, fpt_pme = 87.0 * math.exp(-math.log10(1.0103)), 87.0 * math.exp(-math.log10(1 + 700 / 20000))
    assert _row(md, "FPT+") == (
        f"| FPT+ | 1.03 | **700** | **90.00 ± 1.41** | **84.00 ± — (n=1)** | **87.00** | **{fpt_ppe:.2f}** | "
        f"**{fpt_pme:.2f}** |"
    )
    # LoRA: second on dsA (underlined); its dsB run failed -> "—", so no Avg, PPE, PME.
    assert _row(md, "LoRA") == "| LoRA | <u>0.68</u> | 19,000 | <u>88.00 ± — (n=1)</u> | — | — | — | — |"
    # BitFit never ran on dsB: a missing cell.
    assert _row(md, "BitFit") == "| BitFit | **0.12** | <u>18,000</u> | 86.00 ± — (n=1) | — | — | — | — |"
    # Second section (other weights) is ranked on its own.
    assert "| ***Weights: w-dino*** |" in md
    assert _row(md, "FPT+", 1).startswith(
        "| FPT+ | **1.03** | **700** | **87.00 ± — (n=1)** | **83.00 ± — (n=1)** | **85.00** |"
    )
    tex = to_latex(table)
    assert r"FPT+ & 1.03 & \textbf{700} & \textbf{90.00 $\pm$ 1.41} & \textbf{84.00 $\pm$ --- (n=1)}" in tex
    assert r"LoRA & \underline{0.68} & 19,000 & \underline{88.00 $\pm$ --- (n=1)} & --- & --- & --- & --- \\" in tex
    assert r"\textit{Weights: w-dino}" in tex and r"\cmidrule(lr){2-3}" in tex
    csv = to_csv(table)
    assert "lora-dsB-w-sup-512-s0" in csv  # the failed run is traceable
    frame = table.to_frame()
    where = (frame["row_key"] == "full_ft") & (frame["column"] == "auc:dsA") & (frame["section"] == "Weights: w-sup")
    cell = frame[where]
    assert cell["n_runs"].item() == 2 and cell["run_ids"].item() == "full_ft-dsA-w-sup-512-s0;full_ft-dsA-w-sup-512-s1"
    assert any("failed" in note for note in table.notes)


def test_estimated_memory_is_marked(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.save(make_record("full_ft", "dsA", 90.0, mem=1000.0, estimated=True))
    store.save(make_record("fpt_plus", "dsA", 88.0, mem=100.0, estimated=True))
    runs = load_runs(tmp_path, fake_defaults)
    md = to_markdown(tbl.table_main(runs, tbl.select_main(runs)))
    pme_value = 88.0 * math.exp(-math.log10(1.1))
    assert "| FPT+ | **1.03** | **100**† | **88.00 ± — (n=1)** |" in md  # the only ranked row: best everywhere
    assert f"**{pme_value:.2f}**† |" in md


def test_table_efficiency_with_preloading_row(runs) -> None:
    table = tbl.table_efficiency(runs, tbl.select_main(runs))
    md = to_markdown(table)
    assert "dsA" in table.title and "FLOPs (G)" in md and "unit: GMAC" in md
    assert _row(md, "Preloading (FPT+)") == "| Preloading (FPT+) | 87.84 | 30.00 | 33.33 | — | — | — |"
    assert _row(md, "FPT+") == "| FPT+ | **0.06** | **90.00** | **350.00** | **114.00** | **107.00** | **9.70** |"
    assert _row(md, "LoRA").startswith("| LoRA | 107.89 | 1,010.00 | <u>20.00</u> |")  # tied with BitFit
    assert any("reused an existing feature cache" in note for note in table.notes)


def test_preloading_row_from_the_run_that_built_a_shared_cache(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    cache = {"preloaded": True, "cache_path": "cache/x", "num_images": 84}
    store.save(make_record("fpt", "dsA", 80.0, preload={**cache, "cache_reused": False, "preload_seconds": 42.0}))
    store.save(
        make_record(
            "fpt_plus", "dsA", 81.0, preload={**cache, "cache_reused": True, "preload_seconds": 0.0}, train_seconds=50.0
        )
    )
    runs = load_runs(tmp_path, fake_defaults)
    table = tbl.table_efficiency(runs, tbl.select_main(runs))
    assert _row(to_markdown(table), "Preloading (FPT+)") == "| Preloading (FPT+) | — | 42.00 | 2.00 | — | — | — |"
    assert any("fpt-dsA-w-sup-512-s0" in note for note in table.notes)


def test_table_resolution_marks_oom(runs) -> None:
    table = tbl.table_resolution(runs, gpu_mem_mb=parse_gpu_mem("48GB") / 2**20)
    md = to_markdown(table)
    assert "| Method | Memory (MiB) 512 ↓ | Memory (MiB) 1024 ↓ | Average AUC 512 ↑ | Average AUC 1024 ↑ |" in md
    assert _row(md, "Full fine-tuning") == "| Full fine-tuning | 20,000 | / | 85.50 | / |"  # OOM run
    assert _row(md, "Linear probing") == "| Linear probing | 3,000 | / | 75.00 | / |"  # 60,000 MiB > 48 GiB
    assert _row(md, "LoRA") == "| LoRA | 19,000 | — | — | — |"
    assert _row(md, "BitFit") == "| BitFit | <u>18,000</u> | — | — | — |"
    assert _row(md, "FPT+") == "| FPT+ | **700** | **900** | **87.00** | **87.50** |"
    assert r"\multicolumn{2}{c}{Memory (MiB)}" in to_latex(table)


def test_table_sweep_prompts(runs) -> None:
    sel = tbl.select_main(runs)
    table = tbl.table_sweep(runs, sel, tbl.SWEEPS["num_prompts"])
    md = to_markdown(table)
    assert md.splitlines()[4].startswith("| # Prompts | Avg. AUC ↑ | Params (%) ↓ | Mem. (MiB) ↓ | PPE ↑ | PME ↑ |")
    labels = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "Prompts" not in line]
    assert labels == ["4", "16 (default)", "32"]
    pme16 = 87.0 * math.exp(-math.log10(1 + 700 / 20000))
    ppe16 = 87.0 * math.exp(-math.log10(1.0103))
    # every row has the same Params: a full tie marks nothing
    expected = f"| 16 (default) | **87.00** | 1.03 | <u>700</u> | **{ppe16:.2f}** | **{pme16:.2f}** |"
    assert _row(md, "16 (default)") == expected
    assert _row(md, "4").startswith("| 4 | 83.50 | 1.03 | **690** |")
    # side_res / reduction have no varying runs: no table
    assert tbl.table_sweep(runs, sel, tbl.SWEEPS["side_res"]) is None


def test_component_points(runs) -> None:
    points, _ = tbl.component_points(runs, tbl.select_main(runs))
    assert [p["step"] for p in points] == [0, 1, 2, 5]
    assert points[0]["avg_auc"] == 75.0 and points[1]["mem_mb"] == 9000.0
    assert points[-1]["avg_auc"] == 90.0  # default FPT+ on dsA (the datasets every step has)


# ----------------------------------------------------------------------------------------------------------
# Introspection and figures
# ----------------------------------------------------------------------------------------------------------


def test_introspection_roundtrip(tmp_path: Path) -> None:
    assert load_introspection(tmp_path) is None
    save_introspection(tmp_path, {"layer_prompt_attention": [0.1, 0.2]})
    assert load_introspection(tmp_path)["layer_prompt_attention"].tolist() == [0.1, 0.2]
    with pytest.raises(ValueError):
        save_introspection(tmp_path, {"images": np.zeros((1, 8, 8, 3))})  # Figure 9 needs all its keys
    maps = {
        "side_attention_mass": np.array([0.2, 0.3]),
        "prompt_attention": np.random.rand(3, 2, 4, 5, 7),
        "selected_indices": np.random.randint(0, 17, size=(3, 2, 4, 7)),
        "grid": 4,
        "num_prefix_tokens": 1,
        "lpm_layers": [10, 11],
    }
    arrays = introspection_arrays(maps, np.random.rand(3, 3, 64, 64), max_images=2)
    assert arrays["images"].shape == (2, 64, 64, 3) and arrays["token_indices"].shape == (2, 7)
    assert int(arrays["patch_size"]) == 16 and int(arrays["layer"]) == 11
    save_introspection(tmp_path, arrays)


def _png_ok(paths: list[Path]) -> None:
    png = [p for p in paths if p.suffix == ".png"][0]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert png.with_suffix(".pdf").stat().st_size > 0


def test_every_figure_writes_png(tmp_path: Path) -> None:
    points = [
        {"method": "full_ft", "label": "Full FT", "ratio_pct": 100.0, "avg_auc": 85.5, "mem_mb": 20000.0},
        {"method": "fpt_plus", "label": "FPT+", "ratio_pct": 1.03, "avg_auc": 87.0, "mem_mb": 700.0},
        {"method": "lora", "label": "LoRA", "ratio_pct": 0.68, "avg_auc": 86.0, "mem_mb": None},
    ]
    _png_ok(figs.figure_auc_vs_params(points, tmp_path / "f1"))
    rows = [
        {"method": m, "res": r, "est_peak_mem_mb": mem * r * r / 512**2, "exceeds_budget": False}
        for m, mem in (("full_ft", 20000.0), ("fpt_plus", 700.0))
        for r in (128, 256, 512, 1024)
    ]
    rows.append({"method": "lora", "res": 512, "mem_mb": None, "oom": True})
    _png_ok(figs.figure_memory_vs_resolution(rows, tmp_path / "f2", gpu_mem_mb=49152.0, gpu_label="48 GiB"))
    sweep = [
        {"x": 3, "avg_auc": 86.0, "ppe": 85.8, "pme": 85.0, "mem_mb": 600.0},
        {"x": 6, "avg_auc": 87.0, "ppe": 86.7, "pme": 85.9, "mem_mb": 700.0},
        {"x": 9, "avg_auc": None, "ppe": None, "pme": None, "mem_mb": None},
    ]
    _png_ok(figs.figure_sweep(sweep, tmp_path / "f5", "Side layers"))
    _png_ok(
        figs.figure_prompt_attention(
            {"FPT": np.linspace(0.1, 0.4, 12), "FPT+": np.linspace(0.2, 0.3, 6)}, tmp_path / "f6"
        )
    )
    steps = [
        {"label": "Side network only", "avg_auc": 74.7, "mem_mb": 8214.0},
        {"label": "+ LPM knowledge (MLP)", "avg_auc": 84.0, "mem_mb": 35682.0},
        {"label": "+ Preloading (FPT+)", "avg_auc": 87.1, "mem_mb": None},
    ]
    _png_ok(figs.figure_components(steps, tmp_path / "f7"))
    sample = {
        "image": np.random.rand(64, 64, 3),
        "token_indices": [0, 1, 5, 16],
        "token_attention": [0.1, 0.5, 0.3, 0.1],
        "patch_size": 16,
    }
    _png_ok(figs.figure_token_attention([sample, sample], tmp_path / "f9"))


def test_build_report(store: ResultStore, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    (out / "table4_side_res.md").parent.mkdir(parents=True)
    (out / "table4_side_res.md").write_text("stale")
    index = build_report(store.root, out, defaults=fake_defaults)
    text = index.read_text()
    for stem in ("table1_main", "table2_efficiency", "table3_resolution", "table5_prompts"):
        for suffix in ("md", "tex", "csv"):
            assert (out / f"{stem}.{suffix}").stat().st_size > 0
        assert f"({stem}.md)" in text
    for stem in (
        "figure1_auc_vs_params",
        "figure2_memory_vs_resolution",
        "figure5_side_layers",
        "figure6_prompt_attention",
        "figure7_components",
        "figure8_token_ratio",
        "figure9_token_attention",
    ):
        _png_ok([out / f"{stem}.png"])
        assert f"({stem}.png)" in text
    assert "Table IV — *not available*: no FPT+ runs varying side_res" in text
    assert not (out / "table4_side_res.md").exists()  # stale output of an unavailable table is removed
    assert "error while building" not in text


def test_build_report_empty_results(tmp_path: Path) -> None:
    index = build_report(tmp_path / "results", tmp_path / "reports", defaults=fake_defaults)
    text = index.read_text()
    assert "Table I — *not available*" in text and "Figure 1 — *not available*" in text
    assert "error while building" not in text


def test_report_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from petlbench.cli import app

    store = ResultStore(tmp_path / "results")
    store.save(make_record("full_ft", "dsA", 90.0))  # full_ft's real defaults: no options
    result = CliRunner().invoke(app, ["report", "--results", str(store.root), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    index = (tmp_path / "r" / "index.md").read_text()
    assert "(table1_main.md)" in index and "(figure1_auc_vs_params.png)" in index
    bad = CliRunner().invoke(app, ["report", "--results", str(store.root), "--gpu-mem", "lots"])
    assert bad.exit_code == 2


def test_memory_estimate_figure_and_index(tmp_path: Path) -> None:
    from petlbench.reports.build import memory_estimate_figure

    budget = parse_gpu_mem("48GB")
    rows = [
        {
            "method": m,
            "res": r,
            "est_peak_mem_mb": base * (r / 128) ** 2,
            "exceeds_budget": base * (r / 128) ** 2 * 2**20 > budget,
        }
        for m, base in (("full_ft", 7800.0), ("linear_probe", 1600.0), ("fpt_plus", 570.0))
        for r in (128, 256, 384, 512, 640, 1024, 2048)
    ]
    out = tmp_path / "reports"
    paths = memory_estimate_figure(
        ["full_ft", "linear_probe", "fpt_plus"],
        "vit_large_patch16_224",
        [128, 256, 384, 512, 640, 1024, 2048],
        16,
        "48GB",
        out,
        rows=rows,
    )
    _png_ok(paths)
    assert (out / "figure2_memory_estimate.csv").read_text().count("\n") == len(rows) + 1
    index = build_report(tmp_path / "no-results", out, defaults=fake_defaults).read_text()
    assert "**Figure 2** — Estimated peak training memory" in index and "(figure2_memory_estimate.png)" in index


def test_plot_memory_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import petlbench.profiling as profiling
    from petlbench.cli import app

    calls = []

    def fake_sweep(keys, backbone, resolutions, batch_size, gpu_mem_bytes=None, log=None):  # noqa: ANN001, ANN202
        calls.append((list(keys), backbone.name, list(resolutions), batch_size, gpu_mem_bytes))
        return [
            {"method": k, "res": r, "est_peak_mem_mb": 100.0 * r, "exceeds_budget": False}
            for k in keys
            for r in resolutions
        ]

    monkeypatch.setattr(profiling, "memory_sweep", fake_sweep, raising=False)
    args = [
        "plot",
        "memory",
        "--methods",
        "full_ft,fpt_plus",
        "--backbone",
        "vit_large_patch16_224",
        "--res",
        "128,256",
        "--batch-size",
        "16",
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [(["full_ft", "fpt_plus"], "vit_large_patch16_224", [128, 256], 16, 48 * 2**30)]
    _png_ok([tmp_path / "figure2_memory_estimate.png"])


# ----------------------------------------------------------------------------------------------------------
# Table II's step spread, Figure 1's seeds and Figure 9's data from stored runs
# ----------------------------------------------------------------------------------------------------------


def test_table_efficiency_shows_the_step_spread_and_flags_unreliable_throughput(tmp_path: Path, runs) -> None:
    assert "spread" not in [c.key for c in tbl.table_efficiency(runs, tbl.select_main(runs, None, None)).columns]
    store = ResultStore(tmp_path / "results")
    timing = {"fwd_gflops": 1.0, "train_seconds": 10.0, "train_images_per_s": 5.0}
    store.save(make_record("full_ft", "dsA", 90.0, **timing, spread_pct=12.0))
    store.save(make_record("bitfit", "dsA", 86.0, seed=0, **timing, spread_pct=20.0))
    store.save(make_record("bitfit", "dsA", 87.0, seed=1, **timing, spread_pct=180.0))  # one noisy seed flags the row
    store.save(make_record("lora", "dsA", 88.0, **timing))  # no spread recorded
    cpu_runs = load_runs(store.root, fake_defaults)
    table = tbl.table_efficiency(cpu_runs, tbl.select_main(cpu_runs, None, None))
    assert table is not None
    rows = {row.key: row.cells for row in table.sections[0].rows}
    assert [c.key for c in table.columns].index("spread") == [c.key for c in table.columns].index("throughput") + 1
    assert (rows["bitfit"]["spread"].text, rows["bitfit"]["spread"].mark) == ("180", tbl.UNRELIABLE_MARK)
    assert rows["bitfit"]["throughput"].mark == tbl.UNRELIABLE_MARK
    assert rows["full_ft"]["spread"].text == "12" and not rows["full_ft"]["throughput"].mark
    assert rows["lora"]["spread"].text == "—" and not rows["lora"]["throughput"].mark
    markdown = to_markdown(table)
    assert "5.00‡" in markdown and "180‡" in markdown
    assert "timed steps varied by more than 50 %: the throughput is unreliable" in markdown
    assert r"$^{\ddagger}$" in to_latex(table) and "5.00‡" in to_csv(table)


def test_figure1_data_has_seed_counts_and_the_std_over_seeds(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results")
    aucs = {0: (90.0, 80.0), 1: (92.0, 81.0), 2: (91.0, 85.0)}
    for seed, (a, b) in aucs.items():
        store.save(make_record("full_ft", "dsA", a, seed=seed))
        store.save(make_record("full_ft", "dsB", b, seed=seed))
    store.save(make_record("lora", "dsA", 88.0))
    store.save(make_record("lora", "dsB", 78.0))
    store.save(make_record("fpt_plus", "dsA", 89.0, seed=0))
    store.save(make_record("fpt_plus", "dsA", 91.0, seed=1))
    store.save(make_record("fpt_plus", "dsB", 84.0, seed=0))
    out = tmp_path / "reports"
    build_report(store.root, out, defaults=fake_defaults)
    data = pd.read_csv(out / "figure1_auc_vs_params.csv").set_index("method")
    per_seed = [(a + b) / 2 for a, b in aucs.values()]
    assert data.loc["full_ft", "n_seeds"] == 3 and data.loc["full_ft", "auc_std"] == pytest.approx(
        np.std(per_seed, ddof=1)
    )
    assert data.loc["lora", "n_seeds"] == 1 and math.isnan(data.loc["lora", "auc_std"])
    # FPT+: two seeds on dsA, one on dsB: "(n=1–2)", and one seed ran on every dataset: no std
    assert (data.loc["fpt_plus", "n_seeds"], data.loc["fpt_plus", "n_seeds_max"]) == (1, 2)
    assert math.isnan(data.loc["fpt_plus", "auc_std"])


def test_figure9_from_a_run_one_image_per_class_and_the_foreground_share(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results")
    store.save(make_record("fpt_plus", "dsA", 89.0, weights="random-init"))
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, :32] = 180  # foreground: patch columns 0 and 1 of the 4×4 grid
    background = [4, 8, 12, 16]  # patches 3, 7, 11, 15 (class token 0 not counted)
    every = np.array([[[[0, 1, *background]]]] * 4)  # [K=4, L=1, H=1, n]: 1 of 5 patch tokens on the foreground
    save_introspection(
        store.run_dir("fpt_plus-dsA-random-init-512-s0"),
        {
            "images": np.stack([image] * 4),
            "token_indices": every[:, 0, 0],
            "token_attention": np.full((4, 6), 0.1),
            "selected_indices": every,
            "patch_size": 16,
            "layer": 11,
            "head": 0,
            "labels": np.array([1, 1, 0, 1]),
        },
    )
    out = tmp_path / "reports"
    index = build_report(store.root, out, defaults=fake_defaults).read_text()
    line = next(t for t in index.splitlines() if t.startswith("- **Figure 9**"))
    assert "FPT+, run fpt_plus-dsA-random-init-512-s0, weights random-init; one image per class" in line
    assert "20% of selected tokens on the foreground" in line
    assert "most selected tokens lie on the background" in line and "(figure9_token_attention.csv)" in line
    data = pd.read_csv(out / "figure9_token_attention.csv")
    assert data["image"].astype(str).tolist() == ["0", "2", "all"]  # classes 1 and 0, never class 1 twice
    assert data["foreground_fraction"].tolist() == pytest.approx([0.2, 0.2, 0.2])
    assert data["selected_patch_tokens"].tolist() == [5, 5, 10]
    _png_ok([out / "figure9_token_attention.png"])
