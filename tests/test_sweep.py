"""Sweeps: spec validation, search-point selection, the paper spec's dry run, and kill/resume of a real sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from petlbench.cli import app
from petlbench.core.config import RunConfig
from petlbench.core.results import FAILED, FINISHED, RUNNING, ResultStore
from petlbench.sweep.plan import Cell, CellPlan, Group, select_point
from petlbench.sweep.spec import SweepSpecError, load_spec, parse_spec

PETLBENCH = Path(sys.executable).parent / "petlbench"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_CACHE", str(tmp_path / "user-cache"))


def invoke(*args: str) -> Any:
    """Run the CLI in-process (output includes stderr)."""
    return runner.invoke(app, list(args), catch_exceptions=False)


# ---------------------------------------------------------------------------------------------------------------
# Spec validation


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"methds": ["lora"]}, "key 'methds': unknown key; did you mean 'methods'?"),
        ({"methods": ["lorra"]}, "key 'methods[0]': unknown method 'lorra' (did you mean lora?)"),
        ({"grid": {"lr": ["fast"]}}, "key 'grid.lr[0]': expected a number, got 'fast'"),
        ({"grid": {"lr": [-1e-3]}}, "key 'grid.lr[0]': must be > 0"),
        ({"grid": {"learning_rate": [1e-3]}}, "key 'grid.learning_rate': unknown key"),
        ({"seeds": [0, 0]}, "key 'seeds': duplicate value(s) 0"),
        ({"method_grids": {"lora": {"rank": [4, 8]}}}, "key 'method_grids.lora.rank': unknown key"),
        ({"method_grids": {"lora": {"r": ["four"]}}}, "'method_grids.lora.r': --opt lora.r: 'four' is not a valid int"),
        ({"backbones": [{"name": "test_vit", "pretraind": True}]}, "did you mean 'backbones[0].pretrained'?"),
        ({"resolutions": [30]}, "key 'backbones[0]': resolution 30 is not divisible by the patch size 16"),
        ({"amp": "fp16"}, "key 'amp': 'fp16' is not one of none, bf16"),
        ({"epochs": 0}, "key 'epochs': must be >= 1"),
        ({"log_to": ["mlflow"]}, "key 'log_to[0]': 'mlflow' is not one of tensorboard"),
    ],
)
def test_spec_errors_name_file_key_and_problem(patch: dict[str, Any], message: str) -> None:
    data = {"methods": ["lora"], "backbones": ["test_vit"], "resolutions": [32], **patch}
    data = {k: v for k, v in data.items() if not (k == "methods" and "methds" in patch)}
    with pytest.raises(SweepSpecError) as err:
        parse_spec(data, "specs/bad.yaml")
    assert str(err.value).startswith("sweep spec specs/bad.yaml: key ")
    assert message in str(err.value)


def test_spec_yaml_numbers_grids_and_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "methods: [lora, bitfit]\nbackbones: [test_vit]\nresolutions: [32]\nseeds: [3, 1]\n"
        "grid: {lr: [1e-5, 5e-4], weight_decay: [0, 0.1]}\nmethod_grids: {lora: {r: [4, 8]}}\n"
    )
    spec = load_spec(path)
    assert spec.name == "s" and spec.grid.lr == (1e-5, 5e-4) and spec.grid.weight_decay == (0.0, 0.1)
    assert spec.option_points("lora") == [{"r": "4"}, {"r": "8"}] and spec.option_points("bitfit") == [{}]
    assert spec.grid.points()[0] == (1e-5, 0.0) and len(spec.grid.points()) == 4
    # Flags win: a single --opt value fixes the option (dropping the spec's grid over it), the lr list replaces.
    spec = load_spec(path, {"grid": {"lr": "1e-3"}, "method_options": {"lora": {"r": "16"}}})
    assert spec.grid.lr == (1e-3,) and spec.grid.weight_decay == (0.0, 0.1)
    assert spec.option_points("lora") == [{"r": "16"}] and "(with command-line overrides)" in spec.source
    with pytest.raises(SweepSpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")
    for name in ("paper", "smoke"):
        assert load_spec(name).name == name


# ---------------------------------------------------------------------------------------------------------------
# Search-point selection


def _cell_with(records: dict[str, dict[str, Any] | None]) -> tuple[CellPlan, dict[str, Any]]:
    base = RunConfig(method="lora", dataset="d", dataset_fingerprint="f")
    group = Group(None, None, 32, Path("x"), base={"lora": base})
    cell = CellPlan(0, Cell("lora", (), None, None, 32), group, [], (1, 2))
    points = [(1e-4, 0.0), (1e-3, 0.0), (1e-2, 0.0)]
    cell.search = [cell.run_at(p, 0, "search") for p in points]
    stored = {run.run_id: records.get(str(run.lr)) for run in cell.search}
    return cell, stored


def _rec(status: str, val: float | None = None) -> dict[str, Any]:
    return {"status": status, "metrics": {"val_auc": val}, "error": "boom" if status != FINISHED else None}


def test_selection_highest_val_auc_ties_first_failures_ignored() -> None:
    cell, stored = _cell_with({"0.0001": _rec(FINISHED, 70.0), "0.001": _rec(FINISHED, 80.0), "0.01": _rec(FAILED)})
    selection = select_point(cell, stored.get)
    assert (selection.state, selection.point, selection.val_auc) == ("chosen", (1e-3, 0.0), 80.0)
    finals = cell.finals(selection.point)
    assert [(r.lr, r.seed) for r in finals] == [(1e-3, 1), (1e-3, 2)]
    # The final run of seed 0 is the search run at the chosen point: same config, same run id.
    assert cell.run_at(selection.point, 0, "final").run_id == cell.search[1].run_id
    cell, stored = _cell_with({"0.0001": _rec(FINISHED, 75.0), "0.001": _rec(FINISHED, 75.0), "0.01": _rec(FINISHED)})
    assert select_point(cell, stored.get).point == (1e-4, 0.0)  # tie: the earlier grid point
    cell, stored = _cell_with({"0.0001": _rec(FINISHED, 75.0), "0.001": _rec(RUNNING), "0.01": _rec(FINISHED, 90.0)})
    assert select_point(cell, stored.get).state == "pending"
    cell, stored = _cell_with({"0.0001": _rec(FAILED), "0.001": _rec("oom"), "0.01": _rec(FAILED)})
    failed = select_point(cell, stored.get)
    assert failed.state == "failed" and "all 3 search run(s) failed" in failed.reason


# ---------------------------------------------------------------------------------------------------------------
# Dry run of the paper spec without data


def test_paper_dry_run_counts_runs_and_names_missing_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_DATA_ROOT", str(tmp_path / "nodata"))
    spec = Path(__file__).resolve().parents[1] / "datasets" / "sweeps" / "paper.yaml"
    result = invoke("sweep", str(spec), "--dry-run", "--results", str(tmp_path / "results"))
    assert result.exit_code == 0, result.output
    out = result.output
    # 10 methods x 8 datasets x 2 weight sets = 160 cells; each 24 grid points (seed 0) + 4 more seeds.
    assert "4480 runs planned" in out and "3840 search + 640 final" in out
    assert out.count("\nsearch ") + out.startswith("search ") == 3840
    assert out.count("\nfinal ") == 640
    assert "vit_base_patch16_384.orig_in21k_ft_in1k" in out and "vit_base_patch16_224.dino" in out
    assert "data missing for 8 of 8 datasets" in out
    assert f"no data at {tmp_path / 'nodata' / 'ddr'}" in out
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


# ---------------------------------------------------------------------------------------------------------------
# A real sweep: tiny ViT on synthetic data, killed mid-run and resumed


def _records(results: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in results.glob("*/result.json"):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # never torn (atomic writes), but a file may vanish between glob and read
    return found


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PETLBENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", COLUMNS="160", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2-class synthetic dataset (32 px; 8/2/4 images per class in train/val/test)."""
    from petlbench.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "lesions", n_per_class=14, size=32, num_classes=2, seed=0)


@pytest.mark.slow
def test_sweep_selects_best_lr_and_survives_sigkill(tiny_data: Path, tmp_path: Path) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "methods": ["full_ft", "linear_probe"],
                "datasets": [str(tiny_data)],
                "backbones": ["test_vit"],
                "resolutions": [32],
                "seeds": [0, 1],
                "grid": {"lr": [1e-4, 3e-2], "weight_decay": [0.1]},
                "epochs": 2,
                "batch_size": 4,
                "device": "cpu",
                "profile": False,
            }
        )
    )
    results = tmp_path / "results"
    # The dry run knows the search run ids once the data is there.
    dry = invoke("sweep", str(spec), "--dry-run", "--results", str(results))
    assert dry.exit_code == 0, dry.output
    assert "6 runs planned" in dry.output and "4 search + 2 final" in dry.output
    search_ids = {line.rsplit("· ", 1)[1].strip() for line in dry.output.splitlines() if line.startswith("search")}
    assert len(search_ids) == 4 and all(i.startswith(("full_ft-", "linear_probe-")) for i in search_ids)

    cmd = [str(PETLBENCH), "sweep", str(spec), "--results", str(results)]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(tmp_path), start_new_session=True)
    killed_running: set[str] = set()
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and first.poll() is None:
            records = _records(results)
            finished = [r for r in records.values() if r.get("status") == FINISHED]
            running = [k for k, r in records.items() if r.get("status") == RUNNING]
            if len(finished) >= 2 and running:
                killed_running = set(running)
                break
            time.sleep(0.05)
        assert first.poll() is None, "the sweep ended before it could be killed mid-run"
        os.killpg(first.pid, signal.SIGKILL)  # no chance to clean up: the run in progress stays "running"
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        log.close()
    assert killed_running, (tmp_path / "first.log").read_text()[-3000:]
    before = _records(results)
    done_before = {k: r["timestamps"]["started"] for k, r in before.items() if r["status"] == FINISHED}

    # --status after the kill: the finished runs are done, the killed one is pending (interrupted).
    status = invoke("sweep", str(spec), "--status", "--results", str(results))
    assert status.exit_code == 0, status.output
    assert "interrupted (will be redone)" in status.output

    second = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=180)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert f"resuming: {len(done_before)} of 6 runs already finished" in second.stdout

    store = ResultStore(results)
    rows = store.rows()
    ids = [row["run_id"] for row in rows]
    assert len(ids) == len(set(ids)) == 6, ids  # every run exactly once in the results table
    assert all(row["status"] == FINISHED for row in rows)
    assert search_ids <= set(ids)
    after = _records(results)
    for run_id, started in done_before.items():
        assert after[run_id]["timestamps"]["started"] == started  # finished before the kill: not redone
    for run_id in killed_running:
        assert after[run_id]["status"] == FINISHED  # interrupted: redone to the end
    for method in ("full_ft", "linear_probe"):
        search = sorted((r for r in rows if r["method"] == method and r["seed"] == 0), key=lambda r: r["lr"])
        assert [r["lr"] for r in search] == [1e-4, 3e-2]
        best = max(search, key=lambda r: (r["val_auc"], -r["lr"]))  # highest val AUC; tie -> first grid point
        final = [r for r in rows if r["method"] == method and r["seed"] == 1]
        assert len(final) == 1 and final[0]["lr"] == best["lr"], (search, final)

    status = invoke("sweep", str(spec), "--status", "--results", str(results))
    assert "│ done    │    6 │" in status.output and "│ failed  │    0 │" in status.output


def test_flags_alone_make_a_sweep(tiny_data: Path, tmp_path: Path) -> None:
    result = invoke(
        "sweep",
        "--methods",
        "linear_probe,lora",
        "--datasets",
        str(tiny_data),
        "--backbones",
        "test_vit",
        "--res",
        "32",
        "--seeds",
        "0,1,2",
        "--lr",
        "1e-3,1e-2",
        "--weight-decay",
        "0,0.1",
        "--opt",
        "lora.r=4",
        "--opt",
        "lora.r=8",
        "--epochs",
        "1",
        "--dry-run",
        "--results",
        str(tmp_path / "r"),
    )
    assert result.exit_code == 0, result.output
    # 3 cells (linear_probe, lora r=4, lora r=8) x (4 grid points + 2 more seeds)
    assert "18 runs planned" in result.output and "12 search + 6 final" in result.output
    assert "lora[r=8]" in result.output
    bad = invoke("sweep", "--methods", "lora", "--opt", "lora.rank=4", "--dry-run")
    assert bad.exit_code == 2 and "method_options.lora.rank': unknown key" in bad.output


@pytest.mark.slow
def test_sweep_runs_feed_the_tracker_named_by_log_to(tiny_data: Path, tmp_path: Path) -> None:
    """Sweep workers train through the same callbacks as `petlbench run`, trackers included."""
    results = tmp_path / "r"
    args = ["--methods", "linear_probe", "--datasets", str(tiny_data), "--backbones", "test_vit", "--res", "32"]
    args += ["--seeds", "0", "--lr", "1e-3", "--epochs", "1", "--no-profile", "--results", str(results)]
    result = invoke("sweep", *args, "--log-to", "tensorboard")
    assert result.exit_code == 0, result.output
    (record,) = ResultStore(results).records()
    assert record["status"] == FINISHED
    (folder,) = (results / record["run_id"] / "tensorboard").iterdir()
    assert list(folder.glob("events.out.tfevents.*"))


def test_failed_runs_are_recorded_with_reasons_and_block_their_finals(tiny_data: Path, tmp_path: Path) -> None:
    import shutil

    from petlbench.sweep.executors import LocalExecutor, run_sweep
    from petlbench.sweep.plan import build_plan
    from petlbench.sweep.status import sweep_status

    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    spec = parse_spec(
        {
            "methods": ["linear_probe"],
            "datasets": [str(data)],
            "backbones": ["test_vit"],
            "resolutions": [32],
            "seeds": [0, 1],
            "grid": {"lr": [1e-3, 1e-2]},
            "epochs": 1,
            "batch_size": 4,
            "profile": False,
        },
        "t.yaml",
    )
    results = tmp_path / "results"
    plan = build_plan(spec, results, device="cpu")
    assert plan.total == 3 and not plan.missing
    shutil.rmtree(data / "train")  # the data goes away between planning and training
    store = ResultStore(results)
    scheduler = run_sweep(plan, store, LocalExecutor())
    assert scheduler.counts() == {
        "total": 3,
        "done": 0,
        "skipped": 0,
        "failed": 2,
        "running": 0,
        "blocked": 1,
        "pending": 0,
    }
    rows = store.rows()
    assert len(rows) == 2 and all(r["status"] == FAILED and r["error"] for r in rows)
    status = sweep_status(plan, store)
    assert status.counts()["failed"] == 2 and status.counts()["pending"] == 1
    assert "blocked: every search run of its cell failed" in status.pending_reasons()
    assert all(reason.startswith("failed: ") for reason in status.failure_reasons())


@pytest.mark.slow
def test_local_pool_runs_in_parallel_exactly_once(tiny_data: Path, tmp_path: Path) -> None:
    """The one-process-per-GPU pool, on two CPU slots: same runs, same ids, each once."""
    from petlbench.sweep.executors import PoolExecutor, run_sweep
    from petlbench.sweep.plan import build_plan

    spec = parse_spec(
        {
            "methods": ["linear_probe", "bitfit"],
            "datasets": [str(tiny_data)],
            "backbones": ["test_vit"],
            "resolutions": [32],
            "seeds": [0, 1],
            "grid": {"lr": [1e-3, 1e-2]},
            "epochs": 1,
            "batch_size": 4,
            "profile": False,
        },
        "t.yaml",
    )
    results = tmp_path / "results"
    plan = build_plan(spec, results, device="cpu")
    store = ResultStore(results)
    scheduler = run_sweep(plan, store, PoolExecutor([None, None], store))
    assert scheduler.counts()["done"] == 6
    rows = store.rows()
    assert len({r["run_id"] for r in rows}) == len(rows) == 6 and all(r["status"] == FINISHED for r in rows)
    assert os.getpid() not in {r["worker"]["pid"] for r in store.records()}  # trained in the pool's processes
