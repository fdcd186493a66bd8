"""Where a sweep stands: the driver lock, `--status` counts with failure reasons, and the live progress view."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from petlbench.core.atomic import write_json_atomic
from petlbench.core.results import (
    FAILED,
    FINISHED,
    OOM,
    RUNNING,
    ResultStore,
    describe_holder,
    pid_alive,
    utc_now,
)
from petlbench.sweep.plan import FINAL, PlannedRun, SweepPlan, iter_runs

STATE_DIR = "_sweeps"  # under the results root; holds no result.json, so the results table ignores it


class SweepBusyError(RuntimeError):
    """Another process is driving the same sweep on the same results folder."""


def state_path(results: Path, name: str) -> Path:
    """The sweep's state file (device, executor, driver) under the results root."""
    return Path(results) / STATE_DIR / f"{name}.json"


def read_state(results: Path, name: str) -> dict[str, Any]:
    """The last saved state of a sweep, or {}."""
    try:
        return json.loads(state_path(results, name).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class DriverLock:
    """An exclusive, non-blocking flock held by the process driving a sweep; the kernel drops it if that dies."""

    def __init__(self, results: Path, name: str) -> None:
        """The lock file of sweep `name` under `results`."""
        self.path = Path(results) / STATE_DIR / f"{name}.lock"
        self._handle: IO[str] | None = None

    def acquire(self, state: dict[str, Any]) -> None:
        """Take the lock and record who holds it; raise SweepBusyError if another live process does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the whole sweep
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            holder = read_state(self.path.parent.parent, self.path.stem).get("driver", {})
            raise SweepBusyError(
                f"sweep {self.path.stem!r} is already being run on {self.path.parent.parent} by pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('started', '?')}); "
                "wait for it, or follow it with --status"
            ) from None
        self._handle = handle
        state = dict(state)
        state["driver"] = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}
        write_json_atomic(state_path(self.path.parent.parent, self.path.stem), state)

    def release(self) -> None:
        """Drop the lock."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def driver_alive(results: Path, name: str) -> bool:
    """True while some process holds the sweep's driver lock (read-only: works on a folder this user cannot write)."""
    path = Path(results) / STATE_DIR / f"{name}.lock"
    try:
        handle = open(path)  # noqa: SIM115 - closed below; flock needs no write access
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


@dataclass
class RunStatus:
    """One planned run's standing."""

    run: PlannedRun
    label: str
    phase: str
    state: str  # done, running, failed, pending
    detail: str = ""  # failure reason, or why it is pending


@dataclass
class SweepStatus:
    """Counts and per-run standing of a sweep, computed from the stored results."""

    plan: SweepPlan
    runs: list[RunStatus] = field(default_factory=list)
    driver_running: bool = False

    def counts(self) -> Counter[str]:
        """done / running / failed / pending."""
        counts: Counter[str] = Counter({"done": 0, "running": 0, "failed": 0, "pending": 0})
        counts.update(r.state for r in self.runs)
        return counts

    def pending_reasons(self) -> Counter[str]:
        """Why pending runs are pending."""
        return Counter(r.detail for r in self.runs if r.state == "pending")

    def failure_reasons(self) -> Counter[str]:
        """Failed runs grouped by status and first line of their error."""
        return Counter(r.detail for r in self.runs if r.state == "failed")


def sweep_status(plan: SweepPlan, store: ResultStore) -> SweepStatus:
    """Classify every planned run as done, running, failed or pending (with the reason)."""
    alive = driver_alive(plan.results, plan.spec.name)
    host = socket.gethostname()
    status = SweepStatus(plan, driver_running=alive)
    for run, selection in iter_runs(plan, store):
        cell = plan.cells[run.cell]
        label = cell.cell.label
        phase = plan.phase_label(run)
        if run.config is None:
            if cell.group.error:
                detail = "data missing"
            elif selection is not None and selection.state == "failed":
                detail = "blocked: every search run of its cell failed"
            else:
                detail = "waiting for the search"
            status.runs.append(RunStatus(run, label, phase, "pending", detail))
            continue
        record = store.load(run.run_id or "")
        state = (record or {}).get("status")
        if state == FINISHED:
            status.runs.append(RunStatus(run, label, phase, "done"))
        elif state in (FAILED, OOM):
            error = ((record or {}).get("error") or "no error recorded").strip().splitlines()
            status.runs.append(RunStatus(run, label, phase, "failed", f"{state}: {error[0][:240] if error else ''}"))
        elif state == RUNNING:
            worker = (record or {}).get("worker") or {}
            dead_here = worker.get("host") == host and not pid_alive(worker.get("pid"))
            claim = store.live_claim(run.run_id or "")
            if claim is not None:
                status.runs.append(RunStatus(run, label, phase, "running", f"on {describe_holder(claim)}"))
            elif alive and not dead_here and store.claim_holder(run.run_id or "") is None:
                status.runs.append(RunStatus(run, label, phase, "running", f"on {worker.get('host', '?')}"))
            else:
                status.runs.append(RunStatus(run, label, phase, "pending", "interrupted (will be redone)"))
        else:
            status.runs.append(RunStatus(run, label, phase, "pending", "not started"))
    return status


def _fmt(value: float | None, spec: str = ".2f") -> str:
    """A number for tables ('—' when missing)."""
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def render_status(status: SweepStatus, console: Console, max_failures: int = 20) -> None:
    """Print counts, the reasons of pending and failed runs, and each cell's search outcome."""
    counts = status.counts()
    plan = status.plan
    total = sum(counts.values())
    driver = "a sweep process is running" if status.driver_running else "no sweep process is running"
    console.print(
        f"sweep [bold]{plan.spec.name}[/bold] · {escape(str(plan.results))} · {total} runs · {driver}", soft_wrap=True
    )
    table = Table(title="Runs")
    for column in ("state", "runs", "detail"):
        table.add_column(column, justify="right" if column == "runs" else "left")
    table.add_row("[green]done[/green]", str(counts["done"]), "")
    table.add_row("[cyan]running[/cyan]", str(counts["running"]), "")
    table.add_row("[red]failed[/red]", str(counts["failed"]), "")
    pending = status.pending_reasons()
    table.add_row(
        "pending", str(counts["pending"]), escape("; ".join(f"{n} {why}" for why, n in pending.most_common()))
    )
    console.print(table)
    failures = status.failure_reasons()
    if failures:
        reasons = Table(title="Failure reasons")
        reasons.add_column("runs", justify="right")
        reasons.add_column("status: error")
        for reason, n in failures.most_common():
            reasons.add_row(str(n), escape(reason))
        console.print(reasons)
        title = f"Failed runs (first {max_failures})" if counts["failed"] > max_failures else "Failed runs"
        failed = Table(title=title)
        for column in ("run id", "cell", "phase", "lr", "wd", "seed"):
            failed.add_column(column)
        for entry in [r for r in status.runs if r.state == "failed"][:max_failures]:
            cfg = entry.run.config
            failed.add_row(
                entry.run.run_id or "—",
                escape(entry.label),
                entry.phase,
                _fmt(cfg.lr if cfg else None, "g"),
                _fmt(cfg.weight_decay if cfg else None, "g"),
                str(entry.run.seed),
            )
        console.print(failed)
    missing = {g.dataset or "embedded": g.error for g in plan.missing}
    for dataset, error in missing.items():
        console.print(
            f"[yellow]data missing for {escape(dataset)}:[/yellow] {escape((error or '').splitlines()[0])}",
            soft_wrap=True,
        )


def cell_rows(plan: SweepPlan, store: ResultStore) -> list[dict[str, Any]]:
    """Per cell: chosen point, its validation AUC, and test AUC mean ± std over the seeds finished there."""
    rows = []
    for cell in plan.cells:
        selection = plan.select(cell, store)
        row: dict[str, Any] = {
            "cell": cell.cell.label,
            "state": selection.state,
            "reason": selection.reason,
            "lr": None,
            "weight_decay": None,
            "val_auc": selection.val_auc,
            "test_auc": (math.nan, math.nan),
            "test_n": 0,
            "seeds_done": 0,
            "seeds": len(plan.spec.seeds),
        }
        if selection.state == "chosen" and selection.point is not None:
            runs = [cell.run_at(selection.point, plan.spec.seeds[0], FINAL), *cell.finals(selection.point)]
            records = [store.load(r.run_id or "") for r in runs]
            done = [r for r in records if r and r.get("status") == FINISHED]
            tests = [
                float(r["metrics"]["test_auc"]) for r in done if (r.get("metrics") or {}).get("test_auc") is not None
            ]
            mean = statistics.fmean(tests) if tests else math.nan
            std = statistics.stdev(tests) if len(tests) > 1 else math.nan  # one seed: no spread ("± —")
            config = runs[0].config
            row.update(
                lr=config.lr if config else None,
                weight_decay=config.weight_decay if config else None,
                test_auc=(mean, std),
                test_n=len(tests),
                seeds_done=len(done),
            )
        rows.append(row)
    return rows


def render_cells(plan: SweepPlan, store: ResultStore, console: Console) -> None:
    """Print the per-cell outcome table (chosen lr/wd, validation AUC, test AUC over seeds)."""
    from petlbench.engine.runner import format_mean_std

    table = Table(title=f"Sweep {plan.spec.name}: chosen points (validation) and test AUC over seeds")
    for column in ("cell", "lr", "wd", "val AUC", "test AUC", "seeds"):
        table.add_column(column, justify="left" if column == "cell" else "right")
    for row in cell_rows(plan, store):
        mean, std = row["test_auc"]
        test = format_mean_std(mean, std, row["test_n"])
        if row["state"] != "chosen":
            test = f"[dim]{row['state']}: {escape(row['reason'])}[/dim]" if row["reason"] else row["state"]
        table.add_row(
            escape(row["cell"]),
            _fmt(row["lr"], "g"),
            _fmt(row["weight_decay"], "g"),
            _fmt(row["val_auc"]),
            test,
            f"{row['seeds_done']}/{row['seeds']}",
        )
    console.print(table)


@dataclass
class _Active:
    """A run in flight: its job, start time and last progress text."""

    job: dict[str, Any]
    started: float
    progress: str = ""


class LiveView:
    """The live terminal view of a running sweep: a progress bar, counts, ETA and the runs in flight."""

    def __init__(self, console: Console, plan: SweepPlan, executor_name: str) -> None:
        """Prepare the display (it starts when the driver attaches)."""
        self.console = console
        self.plan = plan
        self.executor_name = executor_name
        self.scheduler: Any = None
        self.executor: Any = None
        self.active: dict[str, _Active] = {}
        self.durations: list[float] = []
        self.started_at = time.monotonic()
        self.ended_count = 0
        self.slots = 1
        self._slots_at = 0.0
        self.live = Live(get_renderable=self.render, console=console, refresh_per_second=2, transient=False)

    def attach(self, scheduler: Any, executor: Any) -> None:
        """Called by the driver once the scheduler exists; starts the display."""
        self.scheduler, self.executor = scheduler, executor
        self.tick()
        counts = scheduler.counts()
        if counts["skipped"]:
            self.console.print(f"resuming: {counts['skipped']} of {counts['total']} runs already finished")
        self.live.start()

    def hooks_for(self, job: dict[str, Any]) -> Any:
        """Progress hooks for a run trained in this process: epoch and batch progress in the run's row."""
        from petlbench.engine.training import ProgressHooks

        run_id = job["run_id"]

        def on_epoch(epoch: int, epochs: int) -> None:
            """Show the epoch."""
            if run_id in self.active:
                self.active[run_id].progress = f"epoch {epoch}/{epochs}"

        def on_batch(done: int, total: int, phase: str) -> None:
            """Show the batch within the epoch."""
            if run_id in self.active:
                epoch = self.active[run_id].progress.split(" · ")[0]
                self.active[run_id].progress = f"{epoch} · {phase} {done}/{total}"

        def log(message: str) -> None:
            """Print a run's message as it is (error text and paths may hold brackets that are not markup)."""
            self.live.console.print(message, markup=False, highlight=False, soft_wrap=True)

        return ProgressHooks(on_epoch=on_epoch, on_batch=on_batch, log=log)

    def started(self, run: PlannedRun, job: dict[str, Any]) -> None:
        """A run was submitted."""
        self.active[job["run_id"]] = _Active(job, time.monotonic())

    def ended(self, run: PlannedRun, job: dict[str, Any], summary: dict[str, Any]) -> None:
        """A run ended: print one line for it."""
        active = self.active.pop(job["run_id"], None)
        seconds = time.monotonic() - active.started if active else 0.0
        self.durations.append(seconds)
        self.ended_count += 1
        counts = self.scheduler.counts() if self.scheduler else {}
        done = counts.get("done", 0) + counts.get("failed", 0) + counts.get("blocked", 0)
        status = summary.get("status")
        colour = {"finished": "green", "failed": "red", "oom": "red"}.get(status or "", "yellow")
        extra = (
            f"val {_fmt(summary.get('val_auc'))} test {_fmt(summary.get('test_auc'))}"
            if status == FINISHED
            else (summary.get("error") or summary.get("detail") or "")[:200]
        )
        self.live.console.print(
            f"\\[{done}/{counts.get('total', '?')}] [{colour}]{status}[/{colour}] {escape(job['label'])} · "
            f"{escape(extra)} ({seconds:.1f}s)",
            highlight=False,
            soft_wrap=True,
        )

    def tick(self) -> None:
        """Refresh the executor's slot count now and then (from the driver's thread, never the display's)."""
        if self.executor is not None and time.monotonic() - self._slots_at > 5.0:
            self.slots = max(1, self.executor.capacity())
            self._slots_at = time.monotonic()

    def eta_seconds(self) -> float | None:
        """Remaining runs x mean run time this session / runs in parallel."""
        if not self.durations or self.scheduler is None:
            return None
        counts = self.scheduler.counts()
        remaining = counts["pending"] + counts["running"]
        return statistics.fmean(self.durations) * remaining / self.slots

    def render(self) -> RenderableType:
        """The current view (drawn from the display's thread; a race with the driver skips one frame)."""
        try:
            return self._render()
        except RuntimeError:  # a dict changed size while being read: draw the next frame instead
            return Text("…")

    def _render(self) -> RenderableType:
        """Header with counts and ETA, a progress bar, and the runs in flight."""
        if self.scheduler is None:
            return Text("planning…")
        counts = self.scheduler.counts()
        settled = counts["done"] + counts["failed"] + counts["blocked"]
        eta = self.eta_seconds()
        elapsed = time.monotonic() - self.started_at
        head = Text.from_markup(
            f"sweep [bold]{self.plan.spec.name}[/bold] · {self.executor_name} · "
            f"[green]{counts['done']} done[/green] · [cyan]{counts['running']} running[/cyan] · "
            f"[red]{counts['failed']} failed[/red] · {counts['pending']} pending"
            + (f" · {counts['blocked']} blocked" if counts["blocked"] else "")
            + f" · elapsed {_clock(elapsed)} · ETA {_clock(eta) if eta is not None else '—'}"
        )
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(1, counts["total"]), completed=settled, width=50),
            Text(f"{settled}/{counts['total']}"),
        )
        parts: list[RenderableType] = [head, bar]
        if self.active:
            table = Table(show_edge=False, box=None, padding=(0, 1))
            for column in ("running", "elapsed", "progress"):
                table.add_column(column)
            now = time.monotonic()
            for active in list(self.active.values())[:12]:
                table.add_row(Text(active.job["label"]), _clock(now - active.started), active.progress)
            parts.append(table)
        return Group(*parts)

    def stop(self) -> None:
        """Stop the display (prints its last state)."""
        if self.live.is_started:
            self.live.stop()
            if not self.console.is_terminal:
                self.console.print()


def _clock(seconds: float | None) -> str:
    """Seconds as m:ss or h:mm:ss."""
    if seconds is None:
        return "—"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def dry_run_lines(plan: SweepPlan) -> list[str]:
    """One line per planned run (final runs show the point as 'best' until the search has chosen it)."""
    lines = []
    by_cell: dict[int, list[str]] = defaultdict(list)
    for run, _ in iter_runs(plan):
        cell = plan.cells[run.cell]
        if run.phase == FINAL and run.config is None:
            point = "lr=best wd=best"
        else:
            cfg = run.config
            lr = cfg.lr if cfg else run.lr
            wd = cfg.weight_decay if cfg else run.weight_decay
            point = f"lr={'default' if lr is None else f'{lr:g}'} wd={'default' if wd is None else f'{wd:g}'}"
        by_cell[run.cell].append(
            f"{plan.phase_label(run):6} {cell.cell.label} · {point} seed={run.seed} · {run.run_id or '(id after data)'}"
        )
    for index in sorted(by_cell):
        lines.extend(by_cell[index])
    return lines
