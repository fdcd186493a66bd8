"""The declared schema of a run's record (`result.json`): what the results store writes and the reports read.

Schema 2 (this version):

    schema        2
    run_id        "<method>-<hash of the identity fields of config>"
    status        "running" | "finished" | "failed" | "oom"
    method_name   display name of the method
    config        RunConfig.to_dict()
    worker        {"host", "pid"}
    timestamps    {"started", "finished", "wall_seconds"}
    environment   device, library versions, git state (core.environment)       [once training starts]
    dataset       name, root, split origin, classes, counts, fingerprint, ...    [once training starts]
    params        {"trainable", "total", "ratio_pct"}                            [finished]
    history       one row per epoch                                             [finished]
    metrics       best epoch, val/test AUC and accuracy, per-split details      [finished]
    efficiency    {"memory", "flops", "time", "power", "prepare", "other"}       [finished]
    predictions   {"val", "test"}: each {"sample_ids", "labels", "probs"} of the best epoch          [finished]
    batch_size_used                                                             [finished]
    error, traceback                                                            [failed / oom]

Schema 1 kept `efficiency` flat (every field at one level, `power` and `preload` as sub-objects); it is upgraded on
read, so old results folders still load. Writers may hand a flat `efficiency` to the store: it is sectioned on save.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

SCHEMA_VERSION = 2
SECTIONS = ("memory", "flops", "time", "power", "prepare", "other")


class EfficiencyRecord(TypedDict):
    """The efficiency block, one section per kind of measurement."""

    memory: dict[str, Any]  # estimates (`est_*`), measured CUDA peaks (`measured_*`), `peak_mem_mb` and its source
    flops: dict[str, Any]  # `fwd_gflops`, `train_step_gflops`, per-operator counts, unit and rule
    time: dict[str, Any]  # step throughput and its spread, wall-clock seconds of training
    power: dict[str, Any]  # NVML power and energy, or `available: false` with the reason
    prepare: dict[str, Any]  # what `prepare_data` did (`info`), and how long it took
    other: dict[str, Any]  # attention kernel, errors of the profilers, anything unclassified


class RunRecordDict(TypedDict):
    """One run's record as stored in `result.json` (see the module docstring for when each key exists)."""

    schema: int
    run_id: str
    status: str
    method_name: str
    config: dict[str, Any]
    worker: NotRequired[dict[str, Any]]
    timestamps: dict[str, Any]
    environment: NotRequired[dict[str, Any]]
    dataset: NotRequired[dict[str, Any]]
    params: NotRequired[dict[str, Any]]
    history: NotRequired[list[dict[str, Any]]]
    metrics: NotRequired[dict[str, Any]]
    efficiency: NotRequired[EfficiencyRecord]
    predictions: NotRequired[dict[str, dict[str, list[Any]]]]
    batch_size_used: NotRequired[int]
    error: NotRequired[str]
    traceback: NotRequired[str]


_PREPARE_KEYS = ("prepare_seconds", "preload_seconds")
_TIME_MARKS = ("seconds", "images_per_s", "step", "spread", "warmup", "timed")


def _section(key: str) -> str:
    """Which section a flat efficiency field belongs to."""
    if key in _PREPARE_KEYS:
        return "prepare"
    if "flops" in key:
        return "flops"
    if "mem" in key or key.startswith(("est_", "measured_", "batch_")):
        return "memory"
    if any(mark in key for mark in _TIME_MARKS):
        return "time"
    return "other"


def section_efficiency(flat: Mapping[str, Any]) -> EfficiencyRecord:
    """A flat efficiency dict (what callbacks and schema 1 produce) -> the sectioned schema-2 block."""
    out: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        if key == "power":
            out["power"] = dict(value or {})
        elif key == "preload":
            out["prepare"]["info"] = value
        else:
            out[_section(key)][key] = value
    return EfficiencyRecord(
        memory=out["memory"],
        flops=out["flops"],
        time=out["time"],
        power=out["power"],
        prepare=out["prepare"],
        other=out["other"],
    )


def flat_efficiency(efficiency: Mapping[str, Any] | None) -> dict[str, Any]:
    """The efficiency block as one flat dict (`power` and `preload` as sub-objects), from either schema."""
    if not efficiency:
        return {}
    if not is_sectioned(efficiency):
        return dict(efficiency)
    flat: dict[str, Any] = {}
    for name in SECTIONS:
        section = dict(efficiency.get(name) or {})
        if name == "power":
            if section:
                flat["power"] = section
        elif name == "prepare":
            if "info" in section:
                flat["preload"] = section.pop("info")
            flat.update(section)
        else:
            flat.update(section)
    return flat


def is_sectioned(efficiency: Mapping[str, Any]) -> bool:
    """True for a schema-2 efficiency block."""
    return set(efficiency) <= set(SECTIONS) and all(isinstance(v, dict) for v in efficiency.values())


def upgrade_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Any stored record -> the current schema (a copy; unknown keys are kept)."""
    out = dict(record)
    efficiency = out.get("efficiency")
    if isinstance(efficiency, Mapping) and not is_sectioned(efficiency):
        out["efficiency"] = section_efficiency(efficiency)
    out["schema"] = SCHEMA_VERSION
    return out


REQUIRED_BY_STATUS = {
    "running": ("run_id", "status", "method_name", "config", "timestamps"),
    "finished": ("params", "history", "metrics", "efficiency", "environment", "dataset", "predictions"),
    "failed": ("error",),
    "oom": ("error",),
}


def record_problems(record: Mapping[str, Any]) -> list[str]:
    """What a record lacks for its status, as readable phrases (empty when it matches the schema)."""
    status = record.get("status")
    if status not in REQUIRED_BY_STATUS:
        return [f"status {status!r} is not one of {', '.join(REQUIRED_BY_STATUS)}"]
    needed = [*REQUIRED_BY_STATUS["running"], *REQUIRED_BY_STATUS[str(status)]]
    problems = [f"no {key!r}" for key in dict.fromkeys(needed) if key not in record]
    efficiency = record.get("efficiency")
    if isinstance(efficiency, Mapping) and not is_sectioned(efficiency):
        problems.append("efficiency is not sectioned (schema 1: upgrade it with upgrade_record)")
    return problems
