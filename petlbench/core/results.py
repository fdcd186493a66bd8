"""The results store: one JSON document per run, plus a table of one row per run readable with pandas.

Layout under the results root:
    <run_id>/result.json   the full record (schema below), written atomically
    runs.jsonl             one flat summary row per run id, rewritten atomically under a lock
    <dataset>/split.csv    the generated split of a dataset without an official one

A run's record moves through statuses "running" -> "finished" | "failed" | "oom". Only "finished" runs
are skipped on re-run; a process killed mid-run leaves "running", which is redone.
"""

from __future__ import annotations

import json
import math
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from petlbench.core.atomic import file_lock, write_json_atomic, write_text_atomic
from petlbench.core.record import SCHEMA_VERSION, flat_efficiency, upgrade_record

FINISHED, RUNNING, FAILED, OOM = "finished", "running", "failed", "oom"
INDEX_NAME = "runs.jsonl"


def utc_now() -> str:
    """ISO-8601 UTC timestamp."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """The flat row of `runs.jsonl` for one result record."""
    config = result.get("config", {})
    metrics = result.get("metrics") or {}
    params = result.get("params") or {}
    eff = flat_efficiency(result.get("efficiency"))
    power = eff.get("power") or {}
    return {
        "run_id": result.get("run_id"),
        "status": result.get("status"),
        "error": result.get("error"),
        "method": config.get("method"),
        "method_name": result.get("method_name"),
        "dataset": config.get("dataset"),
        "backbone": config.get("backbone"),
        "weights": config.get("weights"),
        "res": config.get("res"),
        "seed": config.get("seed"),
        "lr": config.get("lr"),
        "weight_decay": config.get("weight_decay"),
        "epochs": config.get("epochs"),
        "batch_size": config.get("batch_size"),
        "method_options": json.dumps(config.get("method_options", {}), sort_keys=True),
        "device": (result.get("environment") or {}).get("device", {}).get("name"),
        "best_epoch": metrics.get("best_epoch"),
        "val_auc": metrics.get("val_auc"),
        "test_auc": metrics.get("test_auc"),
        "test_acc": metrics.get("test_acc"),
        "trainable": params.get("trainable"),
        "total": params.get("total"),
        "ratio_pct": params.get("ratio_pct"),
        "peak_mem_mb": eff.get("peak_mem_mb"),
        "peak_mem_source": eff.get("peak_mem_source"),
        "est_peak_mem_mb": eff.get("est_peak_mem_mb"),
        "measured_peak_allocated_mb": eff.get("measured_peak_allocated_mb"),
        "fwd_gflops": eff.get("fwd_gflops"),
        "train_step_gflops": eff.get("train_step_gflops"),
        "preload_gflops_per_image": eff.get("preload_gflops_per_image"),
        "flops_unit": eff.get("flops_unit"),
        "train_images_per_s": eff.get("train_images_per_s"),
        "end_to_end_images_per_s": eff.get("end_to_end_images_per_s"),
        "train_seconds": eff.get("train_seconds"),
        "preload_seconds": eff.get("preload_seconds"),
        "peak_power_w": power.get("power_peak_w"),
        "mean_power_w": power.get("power_avg_w"),
        "energy_j": power.get("energy_j"),
        "power_reason": power.get("reason"),
        "started_at": (result.get("timestamps") or {}).get("started"),
        "finished_at": (result.get("timestamps") or {}).get("finished"),
    }


class ResultStore:
    """Reads and writes run records under one results root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def run_dir(self, run_id: str) -> Path:
        """Folder of one run."""
        return self.root / run_id

    def result_path(self, run_id: str) -> Path:
        """Path of a run's result.json."""
        return self.run_dir(run_id) / "result.json"

    def load(self, run_id: str) -> dict[str, Any] | None:
        """A run's record in the current schema, or None if it has none (or an unreadable one)."""
        try:
            return upgrade_record(json.loads(self.result_path(run_id).read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def status(self, run_id: str) -> str | None:
        """A run's status, or None if it never started."""
        record = self.load(run_id)
        return record.get("status") if record else None

    def is_finished(self, run_id: str) -> bool:
        """True if the run finished; failed, out-of-memory and interrupted runs are not."""
        return self.status(run_id) == FINISHED

    def mark_running(self, run_id: str, config: dict[str, Any], method_name: str) -> dict[str, Any]:
        """Write the "running" record at the start of a run (so a kill leaves no finished row)."""
        record = {
            "schema": SCHEMA_VERSION,
            "run_id": run_id,
            "status": RUNNING,
            "method_name": method_name,
            "config": config,
            "worker": {"host": socket.gethostname(), "pid": os.getpid()},
            "timestamps": {"started": utc_now()},
        }
        self.save(record)
        return record

    def save(self, record: dict[str, Any], update_index: bool = True) -> None:
        """Write a record atomically in the current schema and refresh its row in the index (distributed workers
        skip the index and the driver calls `collect()` once instead of every task rewriting it)."""
        record.update(upgrade_record(record))
        write_json_atomic(self.result_path(record["run_id"]), record)
        if update_index:
            self._update_index([summary_row(record)])

    def records(self) -> list[dict[str, Any]]:
        """Every run record found under the root (the source of truth for reports)."""
        found = []
        for path in sorted(self.root.glob("*/result.json")):
            try:
                found.append(upgrade_record(json.loads(path.read_text())))
            except json.JSONDecodeError:
                continue  # a torn file cannot exist (atomic writes), but a hand-edited one might
        return found

    def collect(self) -> int:
        """Rebuild `runs.jsonl` from every result.json (after a distributed sweep); returns the row count."""
        rows = [summary_row(r) for r in self.records()]
        with file_lock(self.root / ".index.lock"):
            self._write_index(rows)
        return len(rows)

    def rows(self) -> list[dict[str, Any]]:
        """The rows of `runs.jsonl`."""
        path = self.root / INDEX_NAME
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def table(self):  # -> pandas.DataFrame
        """The results table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def _update_index(self, new_rows: list[dict[str, Any]]) -> None:
        with file_lock(self.root / ".index.lock"):
            rows = {row["run_id"]: row for row in self.rows()}
            for row in new_rows:
                rows[row["run_id"]] = row
            self._write_index(list(rows.values()))

    def _write_index(self, rows: list[dict[str, Any]]) -> None:
        lines = [json.dumps(_clean(row), sort_keys=False) for row in rows]
        write_text_atomic(self.root / INDEX_NAME, "\n".join(lines) + ("\n" if lines else ""))


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
