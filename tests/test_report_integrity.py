"""Report integrity: the sweep's (lr, wd) selection rule, a jointly chosen setting with listed exclusions and
`--filter`, datasets kept apart by fingerprint, '± —' for one seed, and bootstrap CIs with a paired test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from petlbench.core.config import RunConfig
from petlbench.core.results import ResultStore
from petlbench.engine.metrics import auc_percent
from petlbench.reports import bootstrap as bs
from petlbench.reports import build_report
from petlbench.reports import tables as tbl
from petlbench.reports.collect import HPARAM_RULE, load_runs
from petlbench.reports.model import Cell, Table
from petlbench.reports.render import to_csv, to_latex, to_markdown

NAMES = {"full_ft": "Full fine-tuning", "bitfit": "BitFit", "lora": "LoRA", "fpt_plus": "FPT+"}


def no_options(method: str) -> dict[str, Any]:
    """Every fixture method's defaults: no options."""
    return {}


def predictions(labels: list[int], probs: np.ndarray, prefix: str = "img") -> dict[str, Any]:
    """A record's `predictions` block (the same for val and test)."""
    block = {
        "sample_ids": [f"{prefix}{i:04d}" for i in range(len(labels))],
        "labels": [int(v) for v in labels],
        "probs": [[float(p) for p in row] for row in probs],
    }
    return {"val": block, "test": block}


def rec(
    method: str,
    dataset: str,
    auc: float | None,
    seed: int = 0,
    lr: float = 1e-3,
    wd: float = 0.1,
    val: float | None = None,
    batch: int = 16,
    epochs: int = 20,
    res: int = 512,
    fingerprint: str | None = None,
    preds: dict[str, Any] | None = None,
    status: str = "finished",
    weights: str = "w",
    run_id: str | None = None,
) -> dict[str, Any]:
    """One fake finished (or failed) record with what the report reads."""
    run_id = run_id or f"{method}-{dataset}-lr{lr:g}-wd{wd:g}-b{batch}-e{epochs}-s{seed}{fingerprint or ''}"
    record: dict[str, Any] = {
        "schema": 2,
        "run_id": run_id,
        "status": status,
        "error": None if status == "finished" else "boom",
        "method_name": NAMES[method],
        "config": {
            "method": method,
            "dataset": dataset,
            "dataset_fingerprint": fingerprint,
            "backbone": "vit_base_patch16_224",
            "weights": weights,
            "res": res,
            "epochs": epochs,
            "batch_size": batch,
            "lr": lr,
            "weight_decay": wd,
            "seed": seed,
            "method_options": {},
            "device": "cuda",
        },
        "params": {"trainable": 10, "total": 1000, "ratio_pct": 1.0},
    }
    if status == "finished":
        record["metrics"] = {"best_epoch": 1, "val_auc": auc if val is None else val, "test_auc": auc}
        record["efficiency"] = {"memory": {"peak_mem_mb": 100.0, "measured_peak_allocated_mb": 100.0}}
        if preds is not None:
            record["predictions"] = preds
    return record


def save_all(root: Path, records: list[dict[str, Any]]) -> ResultStore:
    """Write the records to a results store."""
    store = ResultStore(root)
    for record in records:
        store.save(record)
    return store


def cell(table: Table, row_key: str, column: str, section: int = 0) -> Cell:
    """One cell of a table by row key and column key."""
    row = next(r for r in table.sections[section].rows if r.key == row_key)
    return row.cells[column]


# ----------------------------------------------------------------------------------------------------------
# 1. The sweep's selection rule
# ----------------------------------------------------------------------------------------------------------


def bitfit_regression_runs() -> list[dict[str, Any]]:
    """The reproduced case: the sweep chose BitFit lr 0.003 by seed 0's validation AUC (85 > 84); seeds 1-4 at
    0.003 then regressed on validation (80), so the mean over 0.003's five seeds (81) is below 0.01's one seed."""
    runs = [
        rec("bitfit", "dsA", 88.0, seed=0, lr=0.003, val=85.0),
        rec("bitfit", "dsA", 70.0, seed=0, lr=0.01, val=84.0),
    ]
    runs += [rec("bitfit", "dsA", 86.0 + s, seed=s, lr=0.003, val=80.0) for s in range(1, 5)]
    runs += [rec("full_ft", "dsA", 90.0, seed=s) for s in range(2)]
    return runs


def test_table1_shows_the_search_seed_choice_with_all_its_seeds(tmp_path: Path) -> None:
    save_all(tmp_path, bitfit_regression_runs())
    runs = load_runs(tmp_path, no_options)
    table = tbl.table_main(runs, tbl.select_main(runs))
    assert table is not None
    auc = cell(table, "bitfit", "auc:dsA")
    assert auc.n == 5 and all("lr0.003" in r for r in auc.run_ids)  # the chosen point, every seed
    assert auc.value == pytest.approx((88 + 87 + 88 + 89 + 90) / 5)
    assert to_markdown(table).count("88.40 ± ") == 1
    notes = " ".join(table.notes)
    assert HPARAM_RULE in notes and "1 cell(s) by the validation AUC of search seed 0" in notes


def test_search_seed_is_the_smallest_seed_run_at_every_point_and_failures_do_not_compete(tmp_path: Path) -> None:
    records = [
        rec("lora", "dsA", 80.0, seed=3, lr=1e-4, val=70.0),  # the sweep's first seed was 3 (seeds: [3, 1])
        rec("lora", "dsA", 82.0, seed=3, lr=1e-3, val=75.0),
        rec("lora", "dsA", 83.0, seed=1, lr=1e-3, val=60.0),
        rec("lora", "dsA", None, seed=3, lr=1e-2, status="failed"),
    ]
    save_all(tmp_path, records)
    runs = load_runs(tmp_path, no_options)
    auc = cell(tbl.table_main(runs, tbl.select_main(runs)), "lora", "auc:dsA")
    assert auc.n == 2 and auc.value == pytest.approx(82.5)


def _sweep_plan(results: Path, grid: list[tuple[float, float]], seeds: tuple[int, ...]):  # noqa: ANN202
    """A one-cell sweep plan (as `build_plan` makes it) whose search runs sit at `grid` with the first seed."""
    from petlbench.sweep.plan import Cell as SweepCell
    from petlbench.sweep.plan import CellPlan, Group, SweepPlan
    from petlbench.sweep.spec import SweepSpec

    base = RunConfig(method="bitfit", dataset="dsA", dataset_fingerprint="fp1", weights="w", epochs=20, batch_size=16)
    group = Group("dsA", None, 512, results / "datasets" / "dsA", base={"bitfit": base})
    plan_cell = CellPlan(0, SweepCell("bitfit", (), "dsA", None, 512), group, [], seeds[1:])
    plan_cell.search = [plan_cell.run_at(p, seeds[0], "search") for p in grid]
    spec = SweepSpec(name="tiny", methods=("bitfit",), seeds=seeds)
    return SweepPlan(spec, results, [plan_cell], [group], "cpu"), plan_cell


def _from_config(config: RunConfig, test_auc: float, val_auc: float) -> dict[str, Any]:
    """A finished record of a planned run."""
    return {
        "schema": 2,
        "run_id": config.run_id,
        "status": "finished",
        "method_name": "BitFit",
        "config": config.to_dict(),
        "metrics": {"best_epoch": 1, "val_auc": val_auc, "test_auc": test_auc},
        "params": {"trainable": 10, "total": 1000, "ratio_pct": 1.0},
    }


def test_sweep_records_its_choice_and_the_report_uses_it(tmp_path: Path) -> None:
    from petlbench.sweep.plan import Scheduler, selection_path

    results = tmp_path / "results"
    # Grid listed 0.01 first: on a validation tie the sweep takes 0.01; the fallback rule would take 0.003.
    plan, plan_cell = _sweep_plan(results, [(0.01, 0.1), (0.003, 0.1)], (0, 1, 2))
    store = ResultStore(results)
    for run, test in zip(plan_cell.search, (80.0, 90.0), strict=True):
        assert run.config is not None
        store.save(_from_config(run.config, test, 85.0))
    scheduler = Scheduler(plan, store)
    assert scheduler.selections[0].point == (0.01, 0.1)
    recorded = json.loads(selection_path(results, "tiny").read_text())
    entry = recorded["cells"][plan_cell.cell.label]
    assert entry["state"] == "chosen" and entry["lr"] == 0.01 and entry["search_seed"] == 0
    assert len(entry["final_run_ids"]) == 3 and entry["final_run_ids"][0] == plan_cell.search[0].run_id
    while (run := scheduler.next()) is not None:  # the final seeds at the chosen point
        assert run.config is not None and run.config.lr == 0.01
        store.save(_from_config(run.config, 81.0 + run.seed, 70.0))
        scheduler.finish(run, "finished")
    runs = load_runs(results, no_options)
    table = tbl.table_main(runs, tbl.select_main(runs))
    auc = cell(table, "bitfit", "auc:dsA")
    assert auc.n == 3 and auc.value == pytest.approx((80 + 82 + 83) / 3)
    assert "1 cell(s) by the choice recorded by sweep 'tiny'" in " ".join(table.notes)
    # Without the record, the same runs fall back to the rule: tie -> the smaller lr, 0.003 (its single seed).
    selection_path(results, "tiny").unlink()
    runs = load_runs(results, no_options)
    auc = cell(tbl.table_main(runs, tbl.select_main(runs)), "bitfit", "auc:dsA")
    assert auc.n == 1 and auc.value == 90.0


def test_index_states_the_rules(tmp_path: Path) -> None:
    save_all(tmp_path / "results", bitfit_regression_runs())
    index = build_report(tmp_path / "results", tmp_path / "out", defaults=no_options).read_text()
    assert f"Hyperparameters: {HPARAM_RULE}" in index and "Setting rule:" in index
    assert "## Runs not in Table I" in index
    assert (
        "- at a (lr, weight decay) point other than the one selected for its cell: 1 run(s), e.g. bitfit-dsA-lr0.01"
        in index
    )
    assert HPARAM_RULE in (tmp_path / "out" / "table1_main.md").read_text()
    assert "Table CI — *not available*: no run at the main setting carries per-image test predictions" in index


# ----------------------------------------------------------------------------------------------------------
# 2. The setting, chosen jointly; --filter; exclusions listed
# ----------------------------------------------------------------------------------------------------------


def setting_runs() -> list[dict[str, Any]]:
    """Batch 16 and 20 epochs are each the most common value, but no run has both: the joint choice is (32, 20)."""
    records = [rec("full_ft", "dsA", 80.0 + s, seed=s, batch=16, epochs=30) for s in range(2)]
    records += [rec("full_ft", "dsA", 81.0 + s, seed=s, batch=16, epochs=40) for s in range(2)]
    records += [rec("full_ft", "dsA", 85.0 + s, seed=s, batch=32, epochs=20) for s in range(2)]
    records += [rec("bitfit", "dsA", 84.0, batch=32, epochs=20), rec("bitfit", "dsA", 70.0, batch=64, epochs=20)]
    return records


def test_setting_is_chosen_jointly_and_exclusions_are_listed(tmp_path: Path) -> None:
    save_all(tmp_path / "results", setting_runs())
    runs = load_runs(tmp_path / "results", no_options)
    sel = tbl.select_main(runs)
    assert (sel.batch_size, sel.epochs) == (32, 20) and len(sel.runs) == 3
    lines = [e.line() for e in sel.excluded]
    assert lines == [
        "batch size is not 32 (16: 4, 64: 1): 5 run(s), e.g. bitfit-dsA-lr0.001-wd0.1-b64-e20-s0, "
        "full_ft-dsA-lr0.001-wd0.1-b16-e30-s0, full_ft-dsA-lr0.001-wd0.1-b16-e30-s1, …"
    ]
    index = build_report(tmp_path / "results", tmp_path / "out", defaults=no_options).read_text()
    assert "- batch size is not 32 (16: 4, 64: 1): 5 run(s)" in index
    assert "batch 32, 20 epochs (the most common setting, 3 finished run(s))." in index


def test_report_filter_flag(tmp_path: Path) -> None:
    from petlbench.cli import app

    save_all(tmp_path / "results", setting_runs())
    base = ["report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")]
    runner = CliRunner()
    ok = runner.invoke(app, [*base, "--filter", "batch_size=16", "--filter", "epochs=40"])
    assert ok.exit_code == 0, ok.output
    md = (tmp_path / "out" / "table1_main.md").read_text()
    assert "batch 16, 40 epochs" in md and "| Full fine-tuning |" in md
    assert "81.50 ± 0.71" in md
    unknown = runner.invoke(app, [*base, "--filter", "colour=red"])
    assert unknown.exit_code == 2 and "unknown key 'colour'" in unknown.output
    nothing = runner.invoke(app, [*base, "--filter", "res=999"])
    assert nothing.exit_code == 2 and "--filter res=999 matches no stored run" in nothing.output
    assert "stored resolution values: 512" in nothing.output
    bad_dataset = runner.invoke(app, [*base, "--dataset", "nope"])
    assert bad_dataset.exit_code == 2 and "--dataset nope: no stored run on it" in bad_dataset.output
    # Each filter matches runs, together none: a clear message, no table, never a "(None)" caption.
    empty = runner.invoke(app, [*base, "--filter", "batch_size=64", "--filter", "epochs=30"])
    assert empty.exit_code == 0, empty.output
    assert "no finished default-option run matches the selection" in empty.output
    index = (tmp_path / "out" / "index.md").read_text()
    assert "**No finished default-option run matches the selection**" in index
    assert "Table I — *not available*: no finished default-option run matches" in index
    assert not (tmp_path / "out" / "table1_main.md").exists()
    for path in (tmp_path / "out").glob("*.md"):
        assert "(None)" not in path.read_text()


def test_dataset_flag_for_a_dataset_outside_the_main_setting_gives_no_empty_table(tmp_path: Path) -> None:
    records = setting_runs() + [rec("full_ft", "dsB", 70.0, batch=64, epochs=20)]
    save_all(tmp_path / "results", records)
    index = build_report(tmp_path / "results", tmp_path / "out", dataset="dsB", defaults=no_options).read_text()
    assert "Table II — *not available*: no finished run on dsB at the main setting" in index
    assert not (tmp_path / "out" / "table2_efficiency.md").exists()


def test_parse_filters() -> None:
    assert tbl.parse_filters(["res=512", "batch-size=16", "weights=w", "dataset=dsA [ab]"]) == {
        "res": 512,
        "batch_size": 16,
        "weights": "w",
        "dataset": "dsA [ab]",
    }
    for bad, message in (("res", "use key=value"), ("res=big", "whole number"), ("lr=1", "unknown key 'lr'")):
        with pytest.raises(ValueError, match=message):
            tbl.parse_filters([bad])
    with pytest.raises(ValueError, match="given twice"):
        tbl.parse_filters(["res=512", "res=224"])


# ----------------------------------------------------------------------------------------------------------
# 3. Same name, different content
# ----------------------------------------------------------------------------------------------------------


def test_same_dataset_name_with_different_fingerprints_stays_apart(tmp_path: Path) -> None:
    records = [
        rec("full_ft", "dsA", 90.0, fingerprint="aaaa1111ffff0000"),
        rec("full_ft", "dsA", 60.0, fingerprint="bbbb2222ffff0000"),
        rec("full_ft", "dsB", 80.0, fingerprint="cccc3333ffff0000"),
        rec("fpt_plus", "dsA", 88.0, fingerprint="aaaa1111ffff0000"),
    ]
    save_all(tmp_path / "results", records)
    runs = load_runs(tmp_path / "results", no_options)
    table = tbl.table_main(runs, tbl.select_main(runs))
    assert table is not None
    assert [c.header for c in table.columns if c.key.startswith("auc:")] == ["dsA [aaaa1111]", "dsA [bbbb2222]", "dsB"]
    assert cell(table, "full_ft", "auc:dsA [aaaa1111]").value == 90.0
    assert cell(table, "full_ft", "auc:dsA [bbbb2222]").value == 60.0
    assert any("dataset 'dsA' has 2 different contents" in n for n in table.notes)
    index = build_report(tmp_path / "results", tmp_path / "out", defaults=no_options).read_text()
    assert "> note: dataset 'dsA' has 2 different contents" in index
    filtered = tbl.select_main(runs, filters={"dataset": "dsA [bbbb2222]"})
    assert list(filtered.runs["run_id"]) == ["full_ft-dsA-lr0.001-wd0.1-b16-e20-s0bbbb2222ffff0000"]
    with pytest.raises(ValueError, match="several contents share that name"):
        tbl.resolve_dataset(runs.df, "dsA")


# ----------------------------------------------------------------------------------------------------------
# 4. '± —' for a single seed
# ----------------------------------------------------------------------------------------------------------


def test_single_seed_prints_dash_in_markdown_latex_and_csv(tmp_path: Path) -> None:
    records = [rec("full_ft", "dsA", 90.0), rec("full_ft", "dsB", 80.0, seed=0), rec("full_ft", "dsB", 82.0, seed=1)]
    records += [rec("full_ft", "dsC", 70.0 + s, seed=s) for s in range(3)]  # the usual count: 3 seeds
    save_all(tmp_path, records)
    runs = load_runs(tmp_path, no_options)
    table = tbl.table_main(runs, tbl.select_main(runs))
    assert table is not None
    md = to_markdown(table)
    assert "| Full fine-tuning | 1.00 | 100 | 90.00 ± — (n=1) | 81.00 ± 1.41 (n=2) | 71.00 ± 1.00 |" in md
    assert "n = 3 seeds; other counts are marked '(n=k)'" in md
    assert r"90.00 $\pm$ --- (n=1) & 81.00 $\pm$ 1.41 (n=2) & 71.00 $\pm$ 1.00" in to_latex(table)
    frame = pd.read_csv(pd.io.common.StringIO(to_csv(table)))
    one = frame[frame["column"] == "auc:dsA"].iloc[0]
    two = frame[frame["column"] == "auc:dsB"].iloc[0]
    assert one["text"] == "90.00 ± — (n=1)" and one["n_runs"] == 1 and pd.isna(one["std"])
    assert two["n_runs"] == 2 and two["std"] == pytest.approx(np.std([80.0, 82.0], ddof=1))


# ----------------------------------------------------------------------------------------------------------
# 5. Bootstrap CIs and the paired test
# ----------------------------------------------------------------------------------------------------------


def _binary(n: int, seed: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and 2-class probabilities whose positive-class score carries `signal` (0 = random)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    score = np.clip(rng.random(n) * (1 - signal) + signal * labels, 0, 1).round(2)  # rounding makes ties
    return labels, np.stack([1 - score, score], axis=1)


def test_resampled_auc_equals_sklearn_on_the_resampled_images() -> None:
    labels, probs = _binary(60, 1, 0.3)
    rng = np.random.default_rng(5)
    multi_labels = rng.integers(0, 4, 80)
    multi_probs = rng.dirichlet(np.ones(4), 80).round(2)
    for lab, prob in ((labels, probs), (multi_labels, multi_probs)):
        counts = bs.resample_counts(len(lab), 40, seed=3)
        fast = bs.auc_resamples(lab, prob, counts)
        for b in range(40):
            idx = np.repeat(np.arange(len(lab)), counts[b])
            if len(set(lab[idx].tolist())) < len(set(lab.tolist())):
                assert np.isnan(fast[b])  # a class missing: skipped
            else:
                assert fast[b] == pytest.approx(auc_percent(lab[idx], prob[idx])[0], abs=1e-9)
        assert bs.auc_resamples(lab, prob, np.ones(len(lab)))[0] == pytest.approx(auc_percent(lab, prob)[0])


def _aligned(**methods: tuple[np.ndarray, np.ndarray]) -> bs.Aligned:
    """Predictions of one run per method on the same images, aligned."""
    preds = [
        bs.Predictions(name, [f"i{k:03d}" for k in range(len(lab))], lab, prob) for name, (lab, prob) in methods.items()
    ]
    return bs.align(preds)


def test_identical_predictions_give_p_one_half_and_the_ci_brackets_the_point() -> None:
    labels, probs = _binary(80, 2, 0.4)
    aligned = _aligned(a=(labels, probs), b=(labels, probs.copy()))
    counts = bs.resample_counts(80)
    a, b = bs.method_stats(aligned, ["a"], counts), bs.method_stats(aligned, ["b"], counts)
    assert a is not None and b is not None
    assert a.low < a.point < a.high and a.point == pytest.approx(auc_percent(labels, probs)[0])
    delta, low, high, p = bs.paired_test(a, b)
    assert (delta, low, high, p) == (0.0, 0.0, 0.0, 0.5)


def test_perfect_against_random_is_significant() -> None:
    labels, perfect = _binary(60, 3, 1.0)
    _, random = _binary(60, 4, 0.0)
    aligned = _aligned(fpt_plus=(labels, perfect), other=(labels, random))
    counts = bs.resample_counts(60)
    ref, other = bs.method_stats(aligned, ["fpt_plus"], counts), bs.method_stats(aligned, ["other"], counts)
    assert ref is not None and other is not None
    assert (ref.point, ref.low, ref.high) == (100.0, 100.0, 100.0)
    delta, low, high, p = bs.paired_test(ref, other)
    assert p < 0.05 and low > 0 and delta == pytest.approx(100.0 - other.point)
    assert bs.paired_test(other, ref)[3] > 0.95  # the other direction


def test_seeds_are_averaged_on_the_same_resample_and_missing_classes_are_counted() -> None:
    labels = np.array([0] * 18 + [1] * 2)  # a rare class: some resamples miss it
    _, p1 = _binary(20, 5, 0.2)
    _, p2 = _binary(20, 6, 0.2)
    aligned = _aligned(s1=(labels, p1), s2=(labels, p2))
    counts = bs.resample_counts(20, 200)
    both = bs.method_stats(aligned, ["s1", "s2"], counts)
    assert both is not None and both.seeds == 2
    per_seed = [bs.auc_resamples(labels, p, counts) for p in (p1, p2)]
    np.testing.assert_allclose(both.resampled, np.mean(per_seed, axis=0))
    missing = int(np.sum(counts[:, labels == 1].sum(axis=1) == 0))
    assert missing > 0 and int(np.isnan(both.resampled).sum()) == missing


def test_table_ci_in_the_report(tmp_path: Path) -> None:
    labels, perfect = _binary(40, 7, 1.0)
    _, weak = _binary(40, 8, 0.1)
    records = [
        rec("fpt_plus", "dsA", auc_percent(labels, perfect)[0], seed=s, preds=predictions(list(labels), perfect))
        for s in range(2)
    ]
    records += [rec("lora", "dsA", auc_percent(labels, weak)[0], preds=predictions(list(labels), weak))]
    records += [rec("full_ft", "dsA", 85.0)]  # an old record: no predictions
    save_all(tmp_path / "results", records)
    out = tmp_path / "out"
    index = build_report(tmp_path / "results", out, defaults=no_options).read_text()
    assert "**Table CI** — Bootstrap 95% confidence intervals" in index and "(table_ci.md)" in index
    md = (out / "table_ci.md").read_text()
    assert "| ***Weights: w · dsA*** |" in md
    assert md.count("| FPT+ | 100.00 | 100.00 | 100.00 | ref. | ref. | ref. | ref. | 2 | 40 |") == 1
    assert "| Full fine-tuning | — | — | — | — | — | — | — | 0/1 | — |" in md
    assert "no per-image predictions" in md and "averaged, not pooled" in md
    frame = pd.read_csv(out / "table_ci.csv")
    p_value = frame[(frame["row_key"] == "lora") & (frame["column"] == "p")]["value"].item()
    assert p_value < 0.05
    low = frame[(frame["row_key"] == "lora") & (frame["column"] == "auc_low")]["value"].item()
    high = frame[(frame["row_key"] == "lora") & (frame["column"] == "auc_high")]["value"].item()
    assert low <= auc_percent(labels, weak)[0] <= high


def test_runs_of_another_augmentation_pipeline_are_never_seeds_of_these(tmp_path: Path) -> None:
    """Records from before augmentation was drawn per sample (no `augmentation` in their config) are another setting:
    listed as excluded, never averaged with runs of the current pipeline."""
    new = [rec("full_ft", "dsA", 80.0 + s, seed=s) for s in range(3)]
    for record in new:
        record["config"]["augmentation"] = "per-sample"
    old = rec("full_ft", "dsA", 50.0, seed=3, run_id="full_ft-old")
    save_all(tmp_path, [*new, old])
    runs = load_runs(tmp_path, no_options)
    sel = tbl.select_main(runs)
    assert sel.augmentation == "per-sample" and "full_ft-old" not in set(sel.runs["run_id"])
    assert any(
        "augmentation pipeline is not per-sample" in e.reason and "full_ft-old" in e.run_ids for e in sel.excluded
    )
