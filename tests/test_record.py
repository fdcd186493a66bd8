"""The declared record schema: sectioned efficiency, old records upgraded on read, what each status requires."""

from __future__ import annotations

import json
from pathlib import Path

from petlbench.core.record import (
    SCHEMA_VERSION,
    SECTIONS,
    flat_efficiency,
    record_problems,
    section_efficiency,
    upgrade_record,
)
from petlbench.core.results import ResultStore, summary_row

FLAT = {
    "est_peak_mem_mb": 12.5,
    "measured_peak_allocated_mb": None,
    "peak_mem_mb": 12.5,
    "peak_mem_source": "estimated",
    "fwd_gflops": 0.1,
    "train_step_gflops": 0.3,
    "flops_unit": "GFLOPs per image",
    "train_images_per_s": 40.0,
    "spread_pct": 12.0,
    "train_seconds": 3.0,
    "prepare_seconds": 0.5,
    "preload_seconds": 0.4,
    "preload": {"preloaded": True, "cache_reused": False},
    "power": {"available": False, "reason": "cpu"},
    "attention": "fused",
}


def test_sections_are_a_lossless_view_of_the_flat_block() -> None:
    sectioned = section_efficiency(FLAT)
    assert set(sectioned) == set(SECTIONS)
    assert sectioned["memory"]["est_peak_mem_mb"] == 12.5 and sectioned["flops"]["train_step_gflops"] == 0.3
    assert sectioned["time"]["train_images_per_s"] == 40.0 and sectioned["time"]["spread_pct"] == 12.0
    assert sectioned["prepare"] == {"prepare_seconds": 0.5, "preload_seconds": 0.4, "info": FLAT["preload"]}
    assert sectioned["power"] == FLAT["power"] and sectioned["other"] == {"attention": "fused"}
    assert flat_efficiency(sectioned) == FLAT
    assert flat_efficiency(FLAT) == FLAT  # a schema-1 block reads the same


def test_schema_1_record_loads_upgraded_and_reads_the_same(tmp_path: Path) -> None:
    old = {
        "schema": 1,
        "run_id": "lora-abc",
        "status": "finished",
        "method_name": "LoRA",
        "config": {"method": "lora"},
        "timestamps": {"started": "t"},
        "efficiency": dict(FLAT),
        "metrics": {"test_auc": 70.0},
    }
    (tmp_path / "lora-abc").mkdir()
    (tmp_path / "lora-abc" / "result.json").write_text(json.dumps(old))
    store = ResultStore(tmp_path)
    loaded = store.load("lora-abc")
    assert loaded is not None and loaded["schema"] == SCHEMA_VERSION
    assert set(loaded["efficiency"]) == set(SECTIONS)
    assert store.records() == [loaded]
    assert summary_row(loaded) == summary_row(old)
    assert upgrade_record(loaded) == loaded  # idempotent


def test_store_writes_the_current_schema(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    record = store.mark_running("x-1", {"method": "x"}, "X")
    record.update(status="failed", error="RuntimeError: boom", efficiency=dict(FLAT))
    store.save(record)
    on_disk = json.loads((tmp_path / "x-1" / "result.json").read_text())
    assert on_disk["schema"] == SCHEMA_VERSION and set(on_disk["efficiency"]) == set(SECTIONS)
    assert record_problems(on_disk) == []


def test_record_problems_name_what_a_status_needs() -> None:
    running = {"run_id": "a", "status": "running", "method_name": "A", "config": {}, "timestamps": {}}
    assert record_problems(running) == []
    assert record_problems({**running, "status": "finished"}) == [
        "no 'params'",
        "no 'history'",
        "no 'metrics'",
        "no 'efficiency'",
        "no 'environment'",
        "no 'dataset'",
        "no 'predictions'",
    ]
    assert record_problems({**running, "status": "done"}) == [
        "status 'done' is not one of running, finished, failed, oom"
    ]
    assert "not sectioned" in record_problems({**running, "status": "failed", "error": "e", "efficiency": FLAT})[0]


def test_runs_index_names_the_dataset_by_path_and_content() -> None:
    row = summary_row(
        {"config": {"dataset": "data", "dataset_path": "/a/data", "dataset_fingerprint": "abc"}, "efficiency": FLAT}
    )
    assert row["dataset"] == "data" and row["dataset_path"] == "/a/data" and row["dataset_fingerprint"] == "abc"
