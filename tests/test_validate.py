"""`petlbench validate`: plan, comparisons, report writing and the CPU rehearsal of the GPU checks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from petlbench.core.method import method_keys
from petlbench.profiling import validate as v

CPU = torch.device("cpu")
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")


def _app() -> typer.Typer:
    from petlbench.cli.validate import register

    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)

    @app.callback()
    def _root() -> None:
        """A fresh app holding only `validate` (the callback keeps it a subcommand)."""

    register(app)
    return app


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(_app(), ["validate", *args], catch_exceptions=False)


# ----------------------------------------------------------------------------------------- plan
def test_plan_lists_every_check_cell_and_budget() -> None:
    config = v.ValidateConfig()
    plan = v.build_plan(config, 480)
    assert [item.check for item in plan] == ["startup", "cuda_context", "power", "throughput", "memory", "write"]
    assert sum(item.budget_s for item in plan) == pytest.approx(480)
    memory = plan[4]
    assert len(memory.configurations) == 2 * len(method_keys())
    assert "full_ft / fused" in memory.configurations and "fpt_plus / explicit" in memory.configurations
    assert sum(item.estimate_s for item in plan) < 480  # the default configuration fits its budget
    text = v.format_plan(plan, config, 480, "no CUDA device visible here")
    for word in ("cuda_context", "power", "throughput", "memory", "fpt_plus / explicit", "budget 480 s"):
        assert word in text
    small = v.budgets(240)
    assert small["power"] == pytest.approx(22.5) and sum(small.values()) == pytest.approx(240)


def test_quick_config_is_tiny() -> None:
    config = v.quick_config()
    assert (config.backbone, config.res, config.batch_size) == ("test_vit", 64, 2)
    assert config.cells() == [
        ("full_ft", "fused"),
        ("full_ft", "explicit"),
        ("fpt_plus", "fused"),
        ("fpt_plus", "explicit"),
    ]


# ----------------------------------------------------------------------------------------- pure helpers
def test_rel_error_slug_and_context_line() -> None:
    assert v.rel_error(110.0, 100.0) == pytest.approx(0.1)
    assert v.rel_error(90.0, 100.0) == pytest.approx(-0.1)
    assert v.rel_error(None, 1.0) is None and v.rel_error(1.0, None) is None and v.rel_error(1.0, 0.0) is None
    assert v.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert v.gpu_slug("NVIDIA GeForce RTX 4090 (MIG 1g.10gb)") == "nvidia-geforce-rtx-4090-mig-1g-10gb"
    line = v.context_line("NVIDIA H200", 517.25, "results/reference/nvidia-h200.json", "nvml_process")
    assert line.startswith('    "NVIDIA H200": 517.2,  # results/reference/nvidia-h200.json') and len(line) <= 120
    entry = line.split("#")[0].strip().rstrip(",")
    assert eval("{" + entry + "}") == {"NVIDIA H200": 517.2}  # a valid dict entry


def test_context_from_probe_prefers_the_process_then_the_device_delta() -> None:
    base = {"device_name": "Fake GPU", "mem_get_info_used_bytes": 900 * 2**20, "torch_reserved_bytes": 0}
    per_process = base | {
        "nvml_process_used_bytes": 500 * 2**20,
        "nvml_device_used_before_bytes": 100 * 2**20,
        "nvml_device_used_after_bytes": 610 * 2**20,
    }
    result = v.context_from_probe(per_process)
    assert result["status"] == "ok" and result["source"] == "nvml_process" and result["context_mb"] == 500.0
    assert result["nvml_device_delta_mb"] == 510.0 and result["mem_get_info_used_mb"] == 900.0
    hidden = per_process | {"nvml_process_used_bytes": None}
    result = v.context_from_probe(hidden)
    assert result["source"] == "nvml_device_delta" and result["context_mb"] == 510.0
    result = v.context_from_probe(base | {"nvml_error": "NVMLError_LibraryNotFound"})
    assert result["status"] == "unavailable" and "LibraryNotFound" in result["reason"]
    assert v.context_from_probe({"error": "no CUDA device visible"})["context_mb"] is None


def test_memory_comparison_and_summary_with_fake_measurements() -> None:
    row = v.compare_memory(
        {"est_allocated_mb": 1000.0, "est_reserved_mb": 1100.0},
        {"measured_allocated_mb": 1050.0, "measured_reserved_mb": 1100.0},
    )
    assert row["rel_err_allocated"] == pytest.approx(1000 / 1050 - 1) and row["rel_err_reserved"] == 0.0
    rows = [
        row | {"status": "ok", "nvml_process_mem_mb": 1600.0, "context_after_step_mb": 500.0},
        v.compare_memory({"est_allocated_mb": 200.0, "est_reserved_mb": 220.0}, {"measured_allocated_mb": 100.0})
        | {"status": "ok"},
        {"status": "oom"},
        {"status": "skipped"},
    ]
    summary = v.memory_summary(rows, context_mb=500.0)
    assert summary["cells"] == 4 and summary["measured"] == 2 and summary["oom"] == 1 and summary["skipped"] == 1
    assert summary["max_abs_rel_err_allocated"] == pytest.approx(1.0)
    assert summary["max_abs_rel_err_reserved"] == 0.0 and summary["context_after_step_mb_median"] == 500.0
    assert summary["max_abs_rel_err_device"] == 0.0  # 1100 reserved + 500 context == 1600 NVML
    assert v.memory_summary([])["max_abs_rel_err_allocated"] is None


def test_check_memory_stops_at_the_budget_and_survives_a_failing_cell() -> None:
    config = v.quick_config()
    calls: list[tuple[str, str]] = []

    def fake_cell(key: str, attention: str, cfg: v.ValidateConfig, device: torch.device) -> dict[str, Any]:
        calls.append((key, attention))
        if attention == "explicit":
            raise RuntimeError("boom")
        return {"method": key, "status": "ok"} | v.compare_memory(
            {"est_allocated_mb": 9.0, "est_reserved_mb": None}, {"measured_allocated_mb": 10.0}
        )

    seen: list[int] = []
    result = v.check_memory(CPU, config, on_cell=lambda partial: seen.append(len(partial["rows"])), cell_fn=fake_cell)
    assert calls == config.cells() and seen == [1, 2, 3, 4]
    assert result["status"] == "error" and [r["status"] for r in result["rows"]] == ["ok", "error", "ok", "error"]
    assert "boom" in result["rows"][1]["error"]
    late = v.check_memory(CPU, config, stop_at=time.monotonic() - 1, cell_fn=fake_cell)
    assert late["status"] == "partial" and all(r["status"] == "skipped" for r in late["rows"])
    assert len(late["rows"]) == 4 and len(calls) == 4
    assert v.exit_code({"memory": late}) == v.EXIT_BUDGET and v.exit_code({"memory": result}) == v.EXIT_CHECK_FAILED
    assert v.exit_code({"power": {"status": "unavailable"}, "memory": {"status": "ok"}}) == v.EXIT_OK


# ----------------------------------------------------------------------------------------- power
def _samples(watts: Any, seconds: float, dt: float = 0.1) -> list[tuple[float, float, None]]:
    return [(i * dt, 1000.0 * watts(i * dt), None) for i in range(round(seconds / dt) + 1)]


def test_compare_energy_trapezoid_against_the_counter() -> None:
    samples = _samples(lambda t: 200.0, 10.0)
    assert v.trapezoid_energy_j(samples) == pytest.approx(2000.0)
    record = {"energy_j": 2020.0, "energy_source": "nvml_energy_counter", "duration_s": 10.0, "power_peak_field": "x"}
    result = v.compare_energy(samples, record)
    assert result["rel_err_energy"] == pytest.approx(2000 / 2020 - 1) and result["reason"] is None
    assert result["counter_avg_w"] == pytest.approx(202.0) and result["sampled_avg_w"] == pytest.approx(200.0)
    assert result["n_samples"] == 101 and result["max_gap_s"] == pytest.approx(0.1)
    step = v.compare_energy(
        _samples(lambda t: 100.0 if t < 5.0 else 300.0, 10.0),
        {"energy_j": 2000.0, "energy_source": "nvml_energy_counter", "duration_s": 10.0},
    )
    assert abs(step["rel_err_energy"]) < 0.01  # one 0.1 s interval straddles the step
    polled = v.compare_energy(samples, {"energy_j": 2000.0, "energy_source": "nvml_power_poll", "duration_s": 10.0})
    assert polled["rel_err_energy"] is None and "energy counter" in polled["reason"]
    assert v.compare_energy(samples[:1], record)["reason"] == "fewer than 2 power samples"


class FakeNvml:
    """NVML with a constant power draw on the real monotonic clock; the energy counter is its exact integral."""

    def __init__(self, watts: float = 150.0, fail_init: bool = False, energy: bool = True) -> None:
        self.watts, self.fail_init, self.energy = watts, fail_init, energy
        self.power_field = "fake"
        self.t0 = time.monotonic()

    def init(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVMLError_LibraryNotFound")

    def shutdown(self) -> None:
        return None

    def handle(self, index: int, uuid: str | None) -> int:
        return index

    def name(self, handle: int) -> str:
        return "Fake GPU"

    def power_mw(self, handle: int) -> float:
        return 1000.0 * self.watts

    def energy_mj(self, handle: int) -> float | None:
        return 1000.0 * self.watts * (time.monotonic() - self.t0) if self.energy else None

    def mig_enabled(self, handle: int) -> bool:
        return False

    def processes(self, handle: int) -> dict[int, int | None]:
        return {}


def _sleep_until(until: float) -> int:
    time.sleep(max(0.0, until - time.monotonic()))
    return 1


def test_check_power_with_a_fake_nvml_backend() -> None:
    result = v.check_power(CPU, 0.5, 0.0, 0.02, nvml=FakeNvml(), workload=_sleep_until, sync=lambda: None)
    assert result["status"] == "ok" and result["power"]["available"]
    assert abs(result["rel_err_energy"]) < 0.05 and result["n_samples"] >= 10
    assert result["counter_energy_j"] == pytest.approx(75.0, rel=0.1)  # 150 W x 0.5 s
    assert result["sampled_peak_w"] == 150.0 and result["workload"] == "custom"
    no_counter = v.check_power(CPU, 0.1, 0.0, 0.02, nvml=FakeNvml(energy=False), workload=_sleep_until)
    assert no_counter["status"] == "unavailable" and "energy counter" in no_counter["reason"]
    failing = v.check_power(CPU, 0.1, 0.0, 0.02, nvml=FakeNvml(fail_init=True), workload=_sleep_until)
    assert failing["status"] == "unavailable" and "LibraryNotFound" in failing["reason"]
    off = v.check_power(CPU)
    assert off["status"] == "unavailable" and "not a CUDA device" in off["reason"]


# ----------------------------------------------------------------------------------------- report
def _fake_report() -> dict[str, Any]:
    config = v.quick_config()
    plan = v.build_plan(config, 480)
    rows = [
        {"method": "full_ft", "attention": "fused", "status": "ok", "nvml_process_mem_mb": 1600.0}
        | v.compare_memory(
            {"est_allocated_mb": 1000.0, "est_reserved_mb": 1100.0},
            {"measured_allocated_mb": 1050.0, "measured_reserved_mb": 1100.0},
        ),
        {"method": "full_ft", "attention_requested": "explicit", "status": "skipped", "error": "time budget"},
    ]
    return {
        "schema": v.SCHEMA,
        "generated": "2026-01-01T00:00:00Z",
        "complete": False,
        "exit_code": v.EXIT_BUDGET,
        "budget_s": 480.0,
        "elapsed_s": 123.0,
        "device": {"name": "Fake GPU", "slug": "fake-gpu", "type": "cuda", "driver": "1.0", "cuda": "13.0"},
        "config": {"backbone": "vit_base_patch16_224", "res": 512, "batch_size": 16, "quick": False},
        "plan": [item.__dict__ for item in plan],
        "checks": {
            "cuda_context": v.context_from_probe({"device_name": "Fake GPU", "nvml_process_used_bytes": 500 * 2**20})
            | {"seconds": 3.0, "budget_s": 30.0},
            "power": {"status": "ok", "workload": "fp32", "counter_window_s": 20.0, "n_samples": 200}
            | v.compare_energy(
                _samples(lambda t: 300.0, 20.0),
                {"energy_j": 6000.0, "energy_source": "nvml_energy_counter", "duration_s": 20.0},
            ),
            "throughput": {
                "status": "ok",
                "train": {"fpt_plus": {"train_images_per_s": 400.0}, "full_ft": {"train_images_per_s": 50.0}},
                "summary": v.throughput_summary(
                    {"fpt_plus": {"train_images_per_s": 400.0}, "full_ft": {"train_images_per_s": 50.0}},
                    {"lpm_pass": {"images_per_s": 90.0}, "fused_forward": {"images_per_s": 100.0}},
                    ("fpt_plus", "full_ft"),
                ),
            },
            "memory": {
                "status": "partial",
                "reason": "time budget",
                "rows": rows,
                "summary": v.memory_summary(rows, 500.0),
            },
        },
        "cuda_context_line": v.context_line("Fake GPU", 500.0, "results/reference/fake-gpu.json", "nvml_process"),
    }


def test_report_is_written_atomically_as_json_and_markdown(tmp_path: Path) -> None:
    report = _fake_report()
    assert report["checks"]["throughput"]["summary"]["train_ratio"] == 8.0
    assert report["checks"]["throughput"]["summary"]["preload_ratio"] == pytest.approx(0.9)
    json_path, md_path = v.write_report(report, tmp_path / "reference")
    assert json_path.name == "fake-gpu.json" and md_path.name == "fake-gpu.md"
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["fake-gpu.json", "fake-gpu.md"]  # no temp files
    assert json.loads(json_path.read_text())["checks"]["memory"]["rows"][0]["rel_err_reserved"] == 0.0
    md = md_path.read_text()
    assert "# petlbench validate: Fake GPU" in md and "PARTIAL" in md
    assert "| full_ft | fused | 1,000.0 | 1,050.0 | -4.8% | 1,100.0 | 1,100.0 | +0.0% | 1,600.0 | ok |" in md
    assert "| full_ft | explicit |" in md and "skipped" in md
    assert '"Fake GPU": 500.0' in md and "8.000" in md and "0.900" in md
    assert "+0.0%" in md.split("## NVML power and energy")[1]


# ----------------------------------------------------------------------------------------- CLI and rehearsal
def test_cli_dry_run_prints_the_plan_without_cuda(tmp_path: Path) -> None:
    result = _invoke("--dry-run", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    cells = 2 * len(method_keys())
    for word in ("cuda_context", "power", "throughput", "memory", f"[{cells}/{cells}]", "budget 480 s"):
        assert word in result.output
    assert not (tmp_path / "out").exists()
    quick = _invoke("--dry-run", "--device", "cpu", "--quick", "--budget-s", "120")
    assert quick.exit_code == 0 and "[4/4] fpt_plus / explicit" in quick.output and "budget 120 s" in quick.output


@needs_no_cuda
def test_cli_without_cuda_says_so_and_writes_nothing(tmp_path: Path) -> None:
    result = _invoke("--out", str(tmp_path / "out"))
    assert result.exit_code == v.EXIT_NO_CUDA == 3
    assert "no CUDA device visible" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_rejects_bad_options() -> None:
    assert _invoke("--device", "cpu").exit_code == 2  # cpu only with --quick
    assert _invoke("--budget-s", "0", "--dry-run").exit_code == 2
    assert _invoke("--device", "tpu", "--dry-run").exit_code == 2
    assert _invoke("--methods", "nope", "--dry-run").exit_code == 2


def test_quick_cpu_rehearsal_runs_the_same_code_path(tmp_path: Path) -> None:
    result = _invoke("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert result.exit_code == v.EXIT_OK, result.output
    (path,) = tmp_path.glob("cpu-quick-*.json")
    report = json.loads(path.read_text())
    assert report["complete"] and report["exit_code"] == 0 and path.with_suffix(".md").exists()
    checks = report["checks"]
    assert checks["cuda_context"]["status"] == "unavailable" and checks["power"]["status"] == "unavailable"
    assert checks["throughput"]["status"] == "ok"
    summary = checks["throughput"]["summary"]
    assert summary["train_ratio"] > 0 and summary["preload_ratio"] > 0
    rows = checks["memory"]["rows"]
    assert [(r["method"], r["attention"]) for r in rows] == v.quick_config().cells()
    for row in rows:
        assert row["status"] == "ok" and row["measured_allocated_mb"] > 0 and row["est_allocated_mb"] > 0
        assert row["rel_err_allocated"] is not None and row["measured_reserved_mb"] is None
    assert report["device"]["torch_build"] == torch.__version__ and report["device"]["slug"] in path.name
    assert report["environment"]["versions"]["timm"] == report["device"]["timm"] is not None
    assert report["cpu_threads"] == 1 and torch.get_num_threads() == 1  # conftest's setting is restored


def test_validate_never_imports_fvcore(tmp_path: Path) -> None:
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "fvcore":
            raise ModuleNotFoundError("fvcore is blocked", name=name)
sys.meta_path.insert(0, Block())
import torch
torch.set_num_threads(1)
from petlbench.cli.validate import register
from petlbench.profiling import validate as v
config = v.quick_config(("linear_probe",))
print(v.format_plan(v.build_plan(config), config, 480, "cpu").splitlines()[0])
row = v.memory_cell("linear_probe", "fused", config, torch.device("cpu"))
assert row["status"] == "ok", row
assert "fvcore" not in sys.modules
print("no fvcore")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no fvcore" in done.stdout, done.stderr[-2000:]


@needs_no_cuda
def test_context_probe_script_runs_and_reports_no_cuda() -> None:
    done = subprocess.run([sys.executable, "-c", v.CONTEXT_PROBE, "0"], capture_output=True, text=True, timeout=120)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["error"] == "no CUDA device visible"
    assert v.check_cuda_context(CPU)["status"] == "unavailable"
    assert v.context_from_probe(probe)["status"] == "unavailable"
