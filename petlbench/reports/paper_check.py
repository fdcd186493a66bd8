"""`petlbench paper-check`: the papers' printed efficiency values beside petlbench's, under the paper preset.

Every value comes from `paper_values.yaml` (table, row, column and the line of the paper it was copied from) and
every petlbench value from the estimator and the counters alone, so the check runs on any machine:

* Table I Params (%) and Tables V, VI Param. (%): the official parameter convention;
* Table I Mem.: the papers' memory is device-level (what nvidia-smi shows); petlbench compares it with its device
  estimate when the CUDA context of the device is known, else with the reserved estimate (simulated caching
  allocator), else the allocated one, and names the kind in every row;
* Table II FLOPs: the papers' convention, attention not counted (fvcore's default on fused attention);
* Table III: ViT-L/16 memory at 128–640 px and the out-of-memory ("/") cells of a 48 GB GPU, predicted from the
  same memory kind.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from petlbench.core.method import BackboneSpec, Method, get_method
from petlbench.core.preset import PRESETS, Preset, method_overrides

VALUES_FILE = Path(__file__).with_name("paper_values.yaml")
# Tables I, II, V, VI use ViT-B/16 and Table III ViT-L/16, both the authors' 384-px Google checkpoints' architecture.
BACKBONES = {"vit_b16": "vit_base_patch16_384", "vit_l16": "vit_large_patch16_384"}
BATCH_SIZE = 16
NUM_CLASSES = 5
GPU_GB = 48
MIB = 2**20
# Memory kinds, most device-like first: the first one the estimator gives is compared with the papers' numbers.
MEMORY_KINDS = (
    ("est_device_mem_mb", "device (reserved + CUDA context)"),
    ("est_reserved_mem_mb", "reserved (simulated caching allocator)"),
    ("est_peak_mem_mb", "allocated"),
)


@dataclass
class CheckRow:
    """One printed value next to petlbench's."""

    table: str
    row: str
    column: str
    printed: str
    paper: float | None
    ours: float | None
    kind: str
    cite: str
    paper_oom: bool | None = None
    ours_oom: bool | None = None

    @property
    def rel_error(self) -> float | None:
        """(ours - paper) / paper, when both are numbers."""
        if self.paper in (None, 0) or self.ours is None:
            return None
        return (self.ours - self.paper) / self.paper

    @property
    def matches_digits(self) -> bool | None:
        """Whether ours, rounded to the printed number of decimals, reads as printed (None for OOM cells)."""
        if self.ours is None or self.paper is None:
            return None
        decimals = len(self.printed.split(".")[1]) if "." in self.printed else 0
        return f"{self.ours:,.{decimals}f}".replace(",", "") == self.printed.replace(",", "")


def load_values(path: Path = VALUES_FILE) -> dict[str, Any]:
    """The papers' printed values file."""
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def paper_method(key: str, preset: Preset, options: Mapping[str, Any] | None = None) -> Method:
    """Method `key` with the preset's settings for it and `options` from the table row."""
    cls = get_method(key)
    given = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (options or {}).items()}
    return cls.from_overrides(method_overrides(preset, cls, given))


def _memory(est: Mapping[str, Any]) -> tuple[float | None, str]:
    for field, label in MEMORY_KINDS:
        if est.get(field) is not None:
            return float(est[field]), label
    return None, "not available"


class PaperCheck:
    """Computes petlbench's side of every row, memoising the estimator per configuration."""

    def __init__(self, preset: Preset, log: Callable[[str], None] = lambda _: None) -> None:
        self.preset = preset
        self.log = log
        self._estimates: dict[tuple[Any, ...], dict[str, Any]] = {}

    def backbone(self, name: str) -> BackboneSpec:
        """The architecture of the papers' LPM under the preset (weights never matter here)."""
        return BackboneSpec(BACKBONES[name], pos_interp=self.preset.pos_interp or "timm")

    def estimate(self, key: str, options: Mapping[str, Any] | None, backbone: str, res: int) -> dict[str, Any]:
        """The memory estimate as a dict (memoised)."""
        from petlbench.profiling.memory_estimate import estimate_training_memory

        memo = (key, tuple(sorted((options or {}).items())), backbone, res)
        if memo not in self._estimates:
            started = time.perf_counter()
            est = estimate_training_memory(
                paper_method(key, self.preset, options),
                self.backbone(backbone),
                res,
                BATCH_SIZE,
                NUM_CLASSES,
                attention=self.preset.attention or "auto",
            )
            self._estimates[memo] = est.to_dict()
            self.log(f"estimated {key} {dict(options or {})} {backbone} {res}px ({time.perf_counter() - started:.1f}s)")
        return self._estimates[memo]

    def params_pct(self, key: str, options: Mapping[str, Any] | None, backbone: str, res: int) -> float:
        """Trainable / total parameters in %, under the preset's counting convention."""
        from petlbench.profiling.models import build_meta, make_context

        method = paper_method(key, self.preset, options)
        model, _ = build_meta(method, make_context(self.backbone(backbone), res, NUM_CLASSES))
        trainable, total = model.param_report(self.preset.param_convention)
        return 100.0 * trainable / total

    def flops(self, key: str, options: Mapping[str, Any] | None, backbone: str, res: int, preload: bool) -> float:
        """Forward GFLOPs per image, attention not counted (the papers' convention); the one-off pass with preload."""
        from petlbench.profiling.profile import forward_flops

        counts = forward_flops(
            paper_method(key, self.preset, options),
            self.backbone(backbone),
            res,
            NUM_CLASSES,
            self.preset.attention or "auto",
        )
        field = "preload_gflops_per_image_no_attention" if preload else "fwd_gflops_no_attention"
        return float(counts[field])

    def rows(self, values: Iterable[Mapping[str, Any]], settings: Mapping[str, Any]) -> list[CheckRow]:
        """petlbench's value beside every printed efficiency value petlbench can compute."""
        out: list[CheckRow] = []
        for v in values:
            row = self._row(v, settings)
            if row is not None:
                out.append(row)
        return out

    def _row(self, v: Mapping[str, Any], settings: Mapping[str, Any]) -> CheckRow | None:
        table, key, method = str(v["table"]), str(v["key"]), v.get("method")
        if method is None or table not in ("I", "II", "III", "V", "VI") or v.get("kind") != "efficiency":
            return None
        if table == "I" and not str(v.get("section", "")).startswith("Supervised"):
            return None  # the DINO section prints the same efficiency columns again
        options = v.get("options") or {}
        setting = settings.get(f"table_{table}", {})
        backbone = setting.get("backbone") or "vit_b16"
        res = int(v.get("res") or setting.get("res") or 512)
        paper = None if v.get("value") is None else float(v["value"])

        def row(ours: float | None, kind: str, paper_oom: bool | None = None, ours_oom: bool | None = None) -> CheckRow:
            return CheckRow(
                table, str(v["row"]), str(v["column"]), str(v["printed"]), paper, ours, kind, str(v["cite"]),
                paper_oom, ours_oom,
            )  # fmt: skip

        if key == "params":
            return row(self.params_pct(method, options, backbone, res), "params (official)")
        if key == "flops":
            preload = v.get("phase") == "preload"
            return row(self.flops(method, options, backbone, res, preload), "GFLOPs, no attention")
        if key == "mem" or key.startswith("mem:"):
            mem, kind = _memory(self.estimate(method, options, backbone, res))
            if table != "III":
                return row(mem, kind)
            fits = mem is not None and mem <= GPU_GB * 1024.0
            return row(None if v.get("oom") else mem, kind, paper_oom=bool(v.get("oom")), ours_oom=not fits)
        return None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def check_markdown(rows: list[CheckRow], preset: Preset, seconds: float) -> str:
    """The comparison as Markdown: one table per paper table, relative errors per cell, the OOM cells' verdicts."""
    lines = [
        "# Paper check: the papers' printed efficiency values beside petlbench's",
        "",
        f"Preset `{preset.name}`: {preset.description}. Batch {BATCH_SIZE}, {NUM_CLASSES} classes, estimates only "
        f"(no GPU needed). Memory rows name the kind petlbench compares; the papers' memory is most likely "
        f"device-level (nvidia-smi). Table III's '/' cells: out of memory on a {GPU_GB} GB GPU. Generated in "
        f"{seconds:.0f} s.",
    ]
    for table in ("I", "II", "III", "V", "VI"):
        chosen = [r for r in rows if r.table == table]
        if not chosen:
            continue
        lines += ["", f"## Table {table}", "", "| Row | Column | Paper | petlbench | Rel. error | Kind | Source |"]
        lines.append("|---|---|---:|---:|---:|---|---|")
        for r in chosen:
            if r.paper_oom is not None and (r.paper_oom or r.ours_oom):
                verdict = "agrees" if r.paper_oom == r.ours_oom else "disagrees"
                paper = "/" if r.paper_oom else r.printed
                ours = "/ (predicted OOM)" if r.ours_oom else "fits"
                error = f"OOM {verdict}"
            else:
                paper, ours = r.printed, _fmt(r.ours, 3 if (r.ours or 0) < 10 else 1)
                error = "—" if r.rel_error is None else f"{100 * r.rel_error:+.1f} %"
            lines.append(f"| {r.row} | {r.column} | {paper} | {ours} | {error} | {r.kind} | {r.cite} |")
    params = [r for r in rows if r.kind.startswith("params")]
    if params:
        same = sum(bool(r.matches_digits) for r in params)
        lines += ["", f"Params: {same} of {len(params)} printed values reproduced to the printed digits."]
    oom = [r for r in rows if r.paper_oom is not None]
    if oom:
        agree = sum(r.paper_oom == r.ours_oom for r in oom)
        lines.append(f"Table III: {agree} of {len(oom)} cells agree on fitting in {GPU_GB} GB.")
    return "\n".join(lines) + "\n"


def check_csv(rows: list[CheckRow]) -> str:
    """The comparison as CSV (one row per printed value)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["table", "row", "column", "printed", "paper", "petlbench", "rel_error", "kind", "paper_oom",
                     "petlbench_oom", "matches_printed_digits", "cite"])  # fmt: skip
    for r in rows:
        writer.writerow([r.table, r.row, r.column, r.printed, r.paper, r.ours, r.rel_error, r.kind, r.paper_oom,
                         r.ours_oom, r.matches_digits, r.cite])  # fmt: skip
    return buffer.getvalue()


def paper_check(
    out_dir: str | Path = "reports", preset: str = "paper", log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Write `paper_check.md` and `paper_check.csv` under `out_dir`; returns the rows and paths."""
    from petlbench.core.atomic import write_text_atomic

    started = time.perf_counter()
    chosen = PRESETS[preset]
    data = load_values()
    rows = PaperCheck(chosen, log).rows(data["values"], data["settings"])
    seconds = time.perf_counter() - started
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "paper_check.md", out / "paper_check.csv"
    write_text_atomic(md, check_markdown(rows, chosen, seconds))
    write_text_atomic(csv_path, check_csv(rows))
    return {"rows": rows, "paths": [str(md), str(csv_path)], "seconds": seconds}
