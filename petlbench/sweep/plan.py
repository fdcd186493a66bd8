"""Expanding a sweep spec into runs: a search phase per cell, then the final seeds at the chosen point.

A *cell* is one (method, option point, dataset, backbone, resolution). Its search runs are the grid points with
the first seed; once all of them have settled, the point with the highest best-epoch validation AUC is chosen
(ties go to the earlier grid point) and the remaining seeds are run there. The search run at the chosen point is
the final run of the first seed (same config, same run id), so it is never redone. The choice is a pure function
of the stored results, so a restarted sweep makes the same choice. Each settled cell's choice is recorded in
`RESULTS/_sweeps/<sweep>.selection.json` (`record_selection`), so `petlbench report` shows the point the sweep chose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petlbench.core.atomic import write_json_atomic
from petlbench.core.config import RunConfig
from petlbench.core.results import FAILED, FINISHED, OOM, RUNNING, ResultStore, utc_now
from petlbench.sweep.spec import BackboneChoice, SweepSpec, SweepSpecError

SEARCH, FINAL = "search", "final"
SELECTIONS_DIR = "_sweeps"  # the sweep state folder under the results root (also `sweep.status.STATE_DIR`)
SELECTION_RULE = (
    "highest best-epoch validation AUC of the search seed's run at each grid point (failed runs do not compete); "
    "ties: the earlier grid point (lr-major, in the spec's order)"
)
SETTLED = (FINISHED, FAILED, OOM)
Point = tuple[float | None, float | None]


@dataclass(frozen=True)
class Cell:
    """One searched unit: a method at one option point on one dataset, backbone and resolution."""

    method: str
    options: tuple[tuple[str, str], ...]  # option overrides as `--opt` text, sorted by name
    dataset: str | None  # None = the embedded synthetic dataset
    backbone: BackboneChoice | None  # None = `petlbench run`'s default
    res: int

    @property
    def label(self) -> str:
        """`method[opt=v] · dataset · backbone · res` for tables and logs."""
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        backbone = self.backbone.label if self.backbone else "default"
        return f"{self.method}{f'[{opts}]' if opts else ''} · {self.dataset or 'embedded'} · {backbone} · {self.res}px"


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep; `config` is None when the data is missing (dry run)."""

    cell: int  # index into SweepPlan.cells
    phase: str  # SEARCH or FINAL
    lr: float | None
    weight_decay: float | None
    seed: int
    config: RunConfig | None = None

    @property
    def run_id(self) -> str | None:
        """The run id (hash of the resolved config), or None without data."""
        return self.config.run_id if self.config else None

    @property
    def point(self) -> Point:
        """Its (lr, weight decay) grid point."""
        return (self.lr, self.weight_decay)


@dataclass
class Group:
    """What cells sharing (dataset, backbone, resolution) share: the opened data and the base configs."""

    dataset: str | None
    backbone: BackboneChoice | None
    res: int
    split_dir: Path
    base: dict[str, RunConfig] = field(default_factory=dict)  # per method key, before options/lr/wd/seed
    backbone_spec: dict[str, Any] = field(default_factory=dict)  # BackboneSpec fields, as resolved
    source_name: str = ""
    error: str | None = None  # why the data could not be opened (missing root, bad files, ...)
    notes: list[str] = field(default_factory=list)


@dataclass
class CellPlan:
    """A cell with its group and its search runs; final runs are derived once a point is chosen."""

    index: int
    cell: Cell
    group: Group
    search: list[PlannedRun]
    final_seeds: tuple[int, ...]
    options_resolved: dict[str, Any] = field(default_factory=dict)

    def run_at(self, point: Point, seed: int, phase: str) -> PlannedRun:
        """The planned run of this cell at a grid point and seed."""
        lr, wd = point
        config = None
        base = self.group.base.get(self.cell.method)
        if base is not None:
            config = dataclasses.replace(
                base,
                method_options=self.options_resolved,
                lr=base.lr if lr is None else float(lr),
                weight_decay=base.weight_decay if wd is None else float(wd),
                seed=int(seed),
            )
        return PlannedRun(self.index, phase, lr, wd, int(seed), config)

    def finals(self, point: Point) -> list[PlannedRun]:
        """The final runs at the chosen point (seeds after the first: the first is the search run)."""
        return [self.run_at(point, seed, FINAL) for seed in self.final_seeds]

    @property
    def run_count(self) -> int:
        """Search runs plus final runs."""
        return len(self.search) + len(self.final_seeds)


@dataclass(frozen=True)
class Selection:
    """The outcome of a cell's search: a chosen point, still pending, or failed (no finished search run)."""

    state: str  # "chosen", "pending" or "failed"
    point: Point | None = None
    val_auc: float | None = None
    reason: str = ""


@dataclass
class SweepPlan:
    """Every cell of a sweep with its runs, and what is missing to run them."""

    spec: SweepSpec
    results: Path
    cells: list[CellPlan]
    groups: list[Group]
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of runs the sweep trains in all (search + final)."""
        return sum(c.run_count for c in self.cells)

    @property
    def search_total(self) -> int:
        """Number of search runs."""
        return sum(len(c.search) for c in self.cells)

    @property
    def missing(self) -> list[Group]:
        """Groups whose data could not be opened."""
        return [g for g in self.groups if g.error]

    @property
    def searched(self) -> bool:
        """True when the grid has more than one point (otherwise the "search" is just the first seed)."""
        return len(self.spec.grid.points()) > 1

    def phase_label(self, run: PlannedRun) -> str:
        """ "search"/"final", or "final" for the first seed when there is nothing to search."""
        return run.phase if self.searched else FINAL

    def select(self, cell: CellPlan, store: ResultStore) -> Selection:
        """Choose the cell's point from the stored search results (pending while any search run is unsettled)."""
        return select_point(cell, store.load)


def select_point(cell: CellPlan, load: Callable[[str], dict[str, Any] | None]) -> Selection:
    """Highest best-epoch validation AUC among finished search runs; ties go to the earlier grid point."""
    if len(cell.search) == 1:  # nothing to search: the final seeds need not wait for the first one
        run = cell.search[0]
        record = load(run.run_id) if run.run_id else None
        val = ((record or {}).get("metrics") or {}).get("val_auc") if (record or {}).get("status") == FINISHED else None
        return Selection("chosen", run.point, float(val) if isinstance(val, (int, float)) else None)
    best: tuple[float, PlannedRun] | None = None
    errors: list[str] = []
    for run in cell.search:
        if run.run_id is None:
            return Selection("pending", reason="data missing")
        record = load(run.run_id) or {}
        status = record.get("status")
        if status not in SETTLED:
            return Selection("pending", reason="search runs not finished")
        if status != FINISHED:
            errors.append(f"{status}: {record.get('error') or 'no error recorded'}")
            continue
        val = (record.get("metrics") or {}).get("val_auc")
        score = float(val) if isinstance(val, (int, float)) and math.isfinite(val) else -math.inf
        if best is None or score > best[0]:
            best = (score, run)
    if best is None:
        return Selection("failed", reason=f"all {len(cell.search)} search run(s) failed; first: {errors[0]}")
    score, run = best
    return Selection("chosen", run.point, score if math.isfinite(score) else None)


def selection_path(results: str | Path, name: str) -> Path:
    """Where a sweep records its cells' choices: `RESULTS/_sweeps/<name>.selection.json`."""
    return Path(results) / SELECTIONS_DIR / f"{name}.selection.json"


def record_selection(plan: SweepPlan, cell: CellPlan, selection: Selection, results: str | Path) -> None:
    """Record a settled cell's choice (point, search runs, final run ids) in the sweep's selection file.

    The file maps each cell label to its latest choice; the report keeps the runs at the recorded point. Pending
    cells are not recorded; a write error never stops the sweep.
    """
    if selection.state == "pending":
        return
    entry: dict[str, Any] = {
        "state": selection.state,
        "reason": selection.reason,
        "rule": SELECTION_RULE,
        "search_seed": plan.spec.seeds[0],
        "val_auc": selection.val_auc,
        "search": [
            {
                "run_id": run.run_id,
                "lr": run.config.lr if run.config else run.lr,
                "weight_decay": run.config.weight_decay if run.config else run.weight_decay,
            }
            for run in cell.search
        ],
        "recorded": utc_now(),
    }
    if selection.state == "chosen" and selection.point is not None:
        first = cell.run_at(selection.point, plan.spec.seeds[0], FINAL)
        entry["lr"] = first.config.lr if first.config else selection.point[0]
        entry["weight_decay"] = first.config.weight_decay if first.config else selection.point[1]
        entry["final_run_ids"] = [r.run_id for r in [first, *cell.finals(selection.point)] if r.run_id]
    path = selection_path(results, plan.spec.name)
    try:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        data = data if isinstance(data, dict) else {}
        found = data.get("cells")
        cells: dict[str, Any] = found if isinstance(found, dict) else {}
        cells[cell.cell.label] = entry
        write_json_atomic(path, {"sweep": plan.spec.name, "rule": SELECTION_RULE, "cells": cells})
    except OSError:
        pass  # the report falls back to the same rule applied to the stored runs


def _options_key(options: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Option overrides as a sorted, hashable tuple."""
    return tuple(sorted(options.items()))


def _split_dir(results: Path, dataset: str | None) -> Path:
    """Where `petlbench run` keeps a dataset's split and caches under the results root."""
    from petlbench.data.discover import split_dir_for

    return split_dir_for(results, dataset)


def _open_group(
    group: Group, spec: SweepSpec, results: Path, device: str, read_only: bool, log: Callable[[str], None]
) -> None:
    """Open the group's data through `petlbench run`'s own resolution, so run ids match `petlbench run`."""
    from petlbench.data.source import DatasetError
    from petlbench.engine.runner import RunRequest, resolve

    backbone = group.backbone
    resolve_results = results
    scratch = None
    if read_only and not group.split_dir.exists():
        # A dry run or --status writes nothing: a generated split is drawn (deterministically) in a scratch folder.
        scratch = tempfile.TemporaryDirectory(prefix="petlbench-plan-")
        resolve_results = Path(scratch.name)
    request = RunRequest(
        methods=list(spec.methods),
        dataset=group.dataset,
        results=resolve_results,
        res=group.res,
        backbone=backbone.name if backbone else None,
        pretrained=backbone.pretrained if backbone else False,
        weights=str(Path(backbone.weights).expanduser().absolute()) if backbone and backbone.weights else None,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        seeds=[spec.seeds[0]],
        device=device if device == "cpu" or _local_cuda() else "cpu",
        amp=spec.amp,
        attention=spec.attention,
        preset=spec.preset,
        skip_bad_images=spec.skip_bad_images,
        workers=spec.workers,
        profile=spec.profile,
    )
    try:
        resolved = resolve(request, log=log)
    except DatasetError as err:
        group.error = str(err)
        return
    finally:
        if scratch is not None:
            scratch.cleanup()
    group.notes.extend(resolved.notes)
    group.source_name = resolved.source.name
    group.backbone_spec = dataclasses.asdict(resolved.backbone)
    for method, cfg in resolved.configs:
        if cfg.device != device:  # the executor's device (e.g. a GPU cluster driven from a CPU-only machine)
            cfg = dataclasses.replace(cfg, device=device, amp=spec.amp if device.startswith("cuda") else "none")
        group.base[method.key] = cfg


def _local_cuda() -> bool:
    """True if this process sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def build_plan(
    spec: SweepSpec,
    results: str | Path,
    device: str = "cpu",
    read_only: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> SweepPlan:
    """Expand a spec into cells and search runs, opening each (dataset, backbone, resolution) once.

    `device` is where the runs will train ("cpu" or "cuda"; part of every run id). A group whose data cannot be
    opened keeps its error and gets no configs: a dry run still lists and counts its runs.
    """
    from petlbench.core.method import get_method
    from petlbench.core.options import OptionError

    results = Path(results).absolute()
    points = spec.grid.points()
    cells: list[CellPlan] = []
    groups: list[Group] = []
    seen: dict[str, str] = {}
    for dataset in spec.datasets:
        for backbone in spec.backbones:
            for res in spec.resolutions:
                group = Group(dataset, backbone, res, _split_dir(results, dataset))
                _open_group(group, spec, results, device, read_only, log)
                groups.append(group)
                for method in spec.methods:
                    for options in spec.option_points(method):
                        try:
                            resolved_options = get_method(method).from_overrides(options).resolved_options()
                        except OptionError as err:
                            raise SweepSpecError(f"sweep spec {spec.source}: method {method}: {err}") from None
                        cell = Cell(method, _options_key(options), dataset, backbone, res)
                        plan_cell = CellPlan(len(cells), cell, group, [], tuple(spec.seeds[1:]), resolved_options)
                        plan_cell.search = [plan_cell.run_at(p, spec.seeds[0], SEARCH) for p in points]
                        for run in plan_cell.search:
                            if run.run_id is None:
                                continue
                            if run.run_id in seen:
                                raise SweepSpecError(
                                    f"sweep spec {spec.source}: cells {seen[run.run_id]} and {cell.label} resolve to "
                                    f"the same run ({run.run_id}); remove the duplicate option point"
                                )
                            seen[run.run_id] = cell.label
                        cells.append(plan_cell)
    notes = sorted({note for g in groups for note in g.notes})
    return SweepPlan(spec, results, cells, groups, device, notes)


def job_for(plan: SweepPlan, run: PlannedRun, force: bool = False) -> dict[str, Any]:
    """Everything a worker process (local or on a Ray node) needs to train one run, as plain data."""
    if run.config is None:
        raise ValueError(f"run of {plan.cells[run.cell].cell.label} has no config: its data is missing")
    cell = plan.cells[run.cell]
    dataset = cell.cell.dataset
    if dataset is not None and Path(dataset).expanduser().exists():
        dataset = str(Path(dataset).expanduser().absolute())
    return {
        "run_id": run.run_id,
        "config": run.config.to_dict(),
        "options": dict(cell.cell.options),
        "dataset": dataset,
        "split_dir": str(cell.group.split_dir),
        "skip_bad_images": plan.spec.skip_bad_images,
        "backbone": dict(cell.group.backbone_spec),
        "results": str(plan.results),
        "force": force,
        "profile": plan.spec.profile,
        "log_to": list(plan.spec.log_to),
        "label": f"{cell.cell.label} · {plan.phase_label(run)} lr={_fmt(run.config.lr)} "
        f"wd={_fmt(run.config.weight_decay)} seed={run.seed}",
    }


def _fmt(value: float | None) -> str:
    """A grid value for labels."""
    return "default" if value is None else f"{value:g}"


class Scheduler:
    """Hands out runs in dependency order: search runs first, a cell's final runs once its search has settled.

    Finished runs are skipped (unless `force`); unfinished ones, including failed runs and runs a killed process
    left "running", are queued again. Within one session every run is attempted at most once.
    """

    def __init__(self, plan: SweepPlan, store: ResultStore, force: bool = False) -> None:
        """Queue every unfinished search run; settle cells whose search is already complete."""
        self.plan = plan
        self.store = store
        self.force = force
        self.queue: deque[PlannedRun] = deque()
        self.in_flight: dict[str, PlannedRun] = {}
        self.outcomes: Counter[str] = Counter()  # statuses of runs settled (or skipped) in this session
        self.skipped = 0
        self.blocked = 0
        self.selections: dict[int, Selection] = {}
        self._open_search: dict[int, int] = {}
        for cell in plan.cells:
            todo = [run for run in cell.search if self._needs_run(run)]
            self._open_search[cell.index] = len(todo)
            self.queue.extend(todo)
        for cell in plan.cells:
            if self._open_search[cell.index] == 0 or len(cell.search) == 1:
                self._settle_cell(cell)

    def _needs_run(self, run: PlannedRun) -> bool:
        """False (and counted as done) for a run that already finished, unless forced."""
        if run.run_id is None:
            raise ValueError(f"cannot run {self.plan.cells[run.cell].cell.label}: its data is missing")
        if not self.force and self.store.is_finished(run.run_id):
            self.skipped += 1
            self.outcomes[FINISHED] += 1
            return False
        return True

    def _settle_cell(self, cell: CellPlan) -> None:
        """Choose the cell's point and queue its unfinished final runs (or count them blocked)."""
        selection = self.plan.select(cell, self.store)
        self.selections[cell.index] = selection
        record_selection(self.plan, cell, selection, self.store.root)
        if selection.state == "chosen" and selection.point is not None:
            self.queue.extend(run for run in cell.finals(selection.point) if self._needs_run(run))
        else:
            self.blocked += len(cell.final_seeds)

    def next(self) -> PlannedRun | None:
        """The next run to start, or None if nothing is ready now."""
        if not self.queue:
            return None
        run = self.queue.popleft()
        self.in_flight[run.run_id or ""] = run
        return run

    def finish(self, run: PlannedRun, status: str) -> None:
        """Record a run's outcome; when it settles its cell's search, queue the cell's final runs."""
        self.in_flight.pop(run.run_id or "", None)
        self.outcomes[status] += 1
        if run.phase == SEARCH:
            self._open_search[run.cell] -= 1
            cell = self.plan.cells[run.cell]
            if self._open_search[run.cell] == 0 and len(cell.search) > 1:
                self._settle_cell(cell)

    @property
    def finished(self) -> bool:
        """True when nothing is queued or running."""
        return not self.queue and not self.in_flight

    def counts(self) -> dict[str, int]:
        """done / failed / running / pending / blocked counts over the whole sweep."""
        done = self.outcomes[FINISHED]
        failed = self.outcomes[FAILED] + self.outcomes[OOM]
        running = len(self.in_flight)
        total = self.plan.total
        return {
            "total": total,
            "done": done,
            "skipped": self.skipped,
            "failed": failed,
            "running": running,
            "blocked": self.blocked,
            "pending": max(0, total - done - failed - running - self.blocked),
        }


def iter_runs(plan: SweepPlan, store: ResultStore | None = None) -> Iterator[tuple[PlannedRun, Selection | None]]:
    """Every run of the plan as far as it is known: search runs, then final runs at chosen points.

    Final runs of a cell whose search has not settled are yielded with their point unknown (lr/wd None and no
    config) together with the pending selection, so listings and counts stay complete.
    """
    for cell in plan.cells:
        yield from ((run, None) for run in cell.search)
        selection = plan.select(cell, store) if store is not None else Selection("pending", reason="not run")
        for seed in cell.final_seeds:
            if selection.state == "chosen" and selection.point is not None:
                yield cell.run_at(selection.point, seed, FINAL), selection
            else:
                yield PlannedRun(cell.index, FINAL, None, None, seed, None), selection


__all__ = [
    "FINAL",
    "RUNNING",
    "SEARCH",
    "Cell",
    "CellPlan",
    "Group",
    "PlannedRun",
    "Scheduler",
    "Selection",
    "SweepPlan",
    "build_plan",
    "iter_runs",
    "job_for",
    "record_selection",
    "select_point",
    "selection_path",
]
