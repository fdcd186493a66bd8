"""End-to-end CLI behaviour on the embedded synthetic data with a tiny ViT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_contract import PLUGIN  # the one-file plugin of the README's recipe
from typer.testing import CliRunner

from petlbench.cli import app
from petlbench.core.record import record_problems

runner = CliRunner()
TINY = ["--backbone", "test_vit", "--res", "32", "--epochs", "1", "--batch-size", "4"]


def invoke(*args: str):
    """Run the CLI in-process and return the result (output includes stderr)."""
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_methods_lists_every_registered_method_in_rank_order() -> None:
    from petlbench.core.method import get_method, method_keys

    result = invoke("methods", "--json")
    assert result.exit_code == 0
    listed = [(entry["method"], entry["name"]) for entry in json.loads(result.output)]
    assert listed == [(key, get_method(key).display_name) for key in method_keys()]
    keys = [key for key, _ in listed]
    assert keys[:2] == ["full_ft", "linear_probe"] and keys[-2:] == ["fpt", "fpt_plus"] and "ssf" in keys


def test_params_json_keys_on_tiny_vit() -> None:
    result = invoke("params", "--backbone", "test_vit", "--res", "64", "--num-classes", "3", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["method"] for r in rows} >= {"full_ft", "lora", "fpt_plus", "fpt"}
    for row in rows:
        assert set(row) >= {"method", "trainable", "total", "ratio_pct"}
        assert 0 < row["trainable"] <= row["total"]
    full = next(r for r in rows if r["method"] == "full_ft")
    assert full["ratio_pct"] == 100.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "lorra"], "unknown method 'lorra'. Did you mean lora"),
        (["--methods", "lora", "--res", "30"], "not divisible by the patch size 16"),
        (["--methods", "lora", "--dataset", "/nonexistent/folder"], "/nonexistent/folder"),
        (["--methods", "lora", "--opt", "lora.rank=8"], "unknown option lora.rank; valid options: lora.r"),
    ],
)
def test_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke("run", "--results", str(tmp_path), "--backbone", "test_vit", *args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs 0: must be a whole number >= 1"),
        (["--batch-size", "0"], "--batch-size 0: must be a whole number >= 1"),
        (["--epochs", "-2"], "--epochs -2: must be a whole number >= 1"),
        (["--lr", "-1"], "--lr -1.0: must be a finite number > 0"),
        (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
        (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be a finite number >= 0"),
        (["--seeds", "-1"], "--seeds -1: must be a whole number >= 0"),
    ],
)
def test_out_of_range_values_exit_2_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    results = tmp_path / "results"
    result = invoke("run", "--methods", "lora", "--results", str(results), "--backbone", "test_vit", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not results.exists()  # nothing was opened, split or trained


@pytest.mark.slow
def test_attention_flag_builds_and_records_the_kernel_for_every_method(tmp_path: Path) -> None:
    """`--attention explicit` reaches the baselines' models too, and the record says the same thing twice."""
    result = invoke("run", "--methods", "lora,full_ft", "--attention", "explicit", "--results", str(tmp_path), *TINY)
    assert result.exit_code == 0, result.output
    for row in (json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()):
        record = json.loads((tmp_path / row["run_id"] / "result.json").read_text())
        assert record["config"]["attention"] == "explicit"
        assert record["efficiency"]["other"]["attention"] == "explicit"
        assert record_problems(record) == []  # a finished record matches the declared schema


@pytest.mark.slow
def test_run_writes_results_and_skips_on_rerun(tmp_path: Path) -> None:
    methods = "full_ft,linear_probe,bitfit,lora"
    first = invoke("run", "--methods", methods, "--results", str(tmp_path), *TINY)
    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == sorted(methods.split(","))
    assert all(r["status"] == "finished" for r in rows)
    record = json.loads((tmp_path / rows[0]["run_id"] / "result.json").read_text())
    assert record["config"]["weights"] == "random-init"
    assert record["environment"]["versions"]["torch"]
    assert record["history"] and record["metrics"]["best_epoch"] == 1
    second = invoke("run", "--methods", methods, "--results", str(tmp_path), *TINY)
    assert second.exit_code == 0
    assert second.output.count("already finished") == 4


def _write_bad_dataset(root: Path) -> list[str]:
    for k, (split, count) in enumerate((("train", 4), ("val", 2), ("test", 2))):
        for cls, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):  # distinct pixels: identical files across splits would be refused as leakage
                Image.new("RGB", (40, 40), (colour[0], colour[1] + 10 * k + i, colour[2])).save(folder / f"{i}.png")
    bad = root / "train" / "a"
    (bad / "empty.png").write_bytes(b"")
    full = bad / "full.jpg"
    Image.new("RGB", (64, 64), (9, 99, 199)).save(full, quality=95)
    (bad / "truncated.jpg").write_bytes(full.read_bytes()[:200])
    full.unlink()
    (bad / "notes.png").write_text("this is a text file, not a PNG")
    return ["empty.png", "truncated.jpg", "notes.png"]


@pytest.mark.slow
def test_bad_images_stop_before_training_or_are_skipped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bad_names = _write_bad_dataset(data)
    results = tmp_path / "results"
    stopped = invoke("run", "--methods", "linear_probe", "--dataset", str(data), "--results", str(results), *TINY)
    assert stopped.exit_code == 2
    for name in bad_names:
        assert name in stopped.output
    assert "--skip-bad-images" in stopped.output
    assert not (results / "runs.jsonl").exists()
    skipped = invoke(
        "run",
        "--methods",
        "linear_probe",
        "--dataset",
        str(data),
        "--results",
        str(results),
        "--skip-bad-images",
        *TINY,
    )
    assert skipped.exit_code == 0, skipped.output
    row = json.loads((results / "runs.jsonl").read_text().splitlines()[0])
    record = json.loads((results / row["run_id"] / "result.json").read_text())
    recorded = {Path(s["path"]).name for s in record["dataset"]["skipped_files"]}
    assert recorded == set(bad_names)


@pytest.mark.slow
def test_same_seed_same_history_whether_cache_is_built_or_reused(tmp_path: Path) -> None:
    """Preloading must not shift the training random stream: a rerun on the cache reproduces the first run."""
    args = ["run", "--methods", "fpt_plus", "--results", str(tmp_path), "--force", *TINY]
    histories = []
    for _ in range(2):
        assert invoke(*args).exit_code == 0
        (row,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
        record = json.loads((tmp_path / row["run_id"] / "result.json").read_text())
        histories.append([(h["train_loss"], h["val_auc"]) for h in record["history"]])
        reused = record["efficiency"]["prepare"]["info"]["cache_reused"]
    assert reused is True
    assert histories[0] == histories[1]


@pytest.mark.slow
def test_third_party_method_from_one_file(tmp_path: Path) -> None:
    """The README's recipe: one file named in PETLBENCH_PLUGINS adds a method that `run` can train."""
    import os
    import subprocess
    import sys

    plugin = tmp_path / "norm_tuning.py"
    plugin.write_text(PLUGIN)
    env = {**os.environ, "PETLBENCH_PLUGINS": str(plugin)}
    cli = [sys.executable, "-m", "petlbench.cli"]
    listed = subprocess.run([*cli, "methods", "--json"], env=env, capture_output=True, text=True, check=True)
    assert {"method": "norm_tuning", "name": "Norm tuning"}.items() <= next(
        m for m in json.loads(listed.stdout) if m["method"] == "norm_tuning"
    ).items()
    ran = subprocess.run(
        [
            *cli,
            "run",
            "--methods",
            "norm_tuning",
            "--opt",
            "norm_tuning.include_head=false",
            "--results",
            str(tmp_path / "results"),
            *TINY,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0, ran.stderr + ran.stdout
    (row,) = [json.loads(line) for line in (tmp_path / "results" / "runs.jsonl").read_text().splitlines()]
    assert row["status"] == "finished" and row["method_name"] == "Norm tuning"


@pytest.mark.slow
def test_redirected_log_shows_each_epoch_while_the_run_goes_on(tmp_path: Path) -> None:
    """`petlbench run > log` (a SLURM job): one plain line per epoch appears in the file before the run ends."""
    import subprocess
    import sys
    import time

    log = tmp_path / "log.txt"
    args = ["--methods", "linear_probe,bitfit,lora", "--results", str(tmp_path / "r"), "--backbone", "test_vit"]
    args += ["--res", "32", "--epochs", "4", "--batch-size", "4"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "petlbench", "run", *args], stdout=out, stderr=subprocess.STDOUT)
        seen_while_running = False
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if "linear_probe seed 0 · epoch 1/4 · train loss" in log.read_text():
                seen_while_running = proc.poll() is None
                break
            time.sleep(0.2)
        proc.wait(timeout=240)
    text = log.read_text()
    assert seen_while_running, text
    assert proc.returncode == 0, text
    assert text.count(" · epoch ") == 12 and "val AUC" in text and "lr " in text
    assert "━" in text and "Linear probing" in text  # the summary table, full width


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        ("vit_bas_patch16_224", "unknown timm model 'vit_bas_patch16_224'. Did you mean vit_base_patch16_224,"),
        (
            "vit_bas_patch16_224.augreg_in21k",
            "unknown timm model 'vit_bas_patch16_224.augreg_in21k'. Did you mean vit_base_patch16_224.augreg_in21k,",
        ),
        ("qwertyuiop", "unknown timm model 'qwertyuiop'. No similar name. timm.list_models('vit_*')"),
        ("vit_base_patch16_224.augreg_in2k", "has no pretrained tag 'augreg_in2k'. Did you mean augreg_in21k,"),
    ],
)
def test_backbone_name_typos_suggest_timm_names(backbone: str, message: str) -> None:
    result = invoke("params", "--backbone", backbone, "--methods", "lora", "--res", "224")
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_backbone_names_with_a_known_pretrained_tag_pass_the_check() -> None:
    from petlbench.backbones.vit import check_model_name

    check_model_name("vit_base_patch16_224.augreg_in21k")
    check_model_name("vit_base_patch16_224")


def test_every_option_and_argument_of_every_command_has_help() -> None:
    """Walks the click command tree behind the Typer app: groups, their commands and sub-groups, recursively."""
    import typer

    def missing(command: object, path: str) -> list[str]:
        found = [
            f"{path} {'/'.join(param.opts)}"
            for param in getattr(command, "params", [])
            if param.name != "help" and not (getattr(param, "help", None) or "").strip()
        ]
        for name, sub in (getattr(command, "commands", None) or {}).items():
            found += missing(sub, f"{path} {name}")
        return found

    root = typer.main.get_command(app)
    assert {"run", "datasets", "plot", "sweep"} <= set(getattr(root, "commands", {}))  # the walk sees the tree
    assert missing(root, "petlbench") == []


@pytest.mark.slow
def test_log_to_tensorboard_writes_the_stored_history_as_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from petlbench.reports.tracker import scalar_tag

    tiny = ["--backbone", "test_vit", "--res", "32", "--epochs", "2", "--batch-size", "4"]
    result = invoke("run", "--methods", "linear_probe", "--results", str(tmp_path), "--log-to", "tensorboard", *tiny)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    history = json.loads((tmp_path / row["run_id"] / "result.json").read_text())["history"]
    (folder,) = (tmp_path / row["run_id"] / "tensorboard").iterdir()  # one attempt, one event folder
    events = EventAccumulator(str(folder))
    events.Reload()
    fields = [k for k, v in history[0].items() if k != "epoch" and isinstance(v, (int, float))]
    assert {"train_loss", "val_auc", "lr", "epoch_train_seconds"} <= set(fields)
    assert sorted(events.Tags()["scalars"]) == sorted(scalar_tag(k) for k in fields)
    for key in fields:
        scalars = events.Scalars(scalar_tag(key))
        assert [s.step for s in scalars] == [h["epoch"] for h in history] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([h[key] for h in history], rel=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]


@pytest.mark.parametrize(
    ("log_to", "blocked", "message"),
    [
        ("mlflow", False, "--log-to 'mlflow': use tensorboard"),
        ("tensorboard", True, "--log-to tensorboard needs the tensorboard package"),
    ],
)
def test_log_to_errors_exit_2_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_to: str, blocked: bool, message: str
) -> None:
    import sys

    if blocked:  # as if tensorboard were not installed
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    results = tmp_path / "results"
    result = invoke("run", "--methods", "lora", "--results", str(results), "--log-to", log_to, *TINY)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "pip install 'petlbench[tracking]'" in result.output or not blocked
    assert not results.exists()
