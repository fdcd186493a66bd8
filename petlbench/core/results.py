"""The results store: one JSON document per run, plus a table of one row per run readable with pandas.

Layout under the results root:
    <run_id>/result.json   the full record (schema below), written atomically
    <run_id>/attempt.json  a re-run (--force) of a finished run while it trains, or its failure: a finished
                           result.json is replaced only by a finished successor
    <run_id>/claim.json    the process training the run now (pid, host, started); created exclusively, removed
                           when the run ends; stale, and taken over, once its process is gone (same host) or it
                           was not touched for CLAIM_EXPIRES_S (another host: its holder touches it meanwhile)
    runs.jsonl             one flat summary row per run id, rewritten atomically under a lock; derived data:
                           rebuilt from the result.json files when it cannot be read
    <dataset>/split.csv    the generated split of a dataset without an official one

A run's record moves through statuses "running" -> "finished" | "failed" | "oom". Only "finished" runs
are skipped on re-run; a process killed mid-run leaves "running", which is redone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from petlbench.core.atomic import (
    FolderError,
    check_writable_folder,
    file_lock,
    file_mode,
    json_text,
    write_json_atomic,
    write_text_atomic,
)
from petlbench.core.record import SCHEMA_VERSION, flat_efficiency, upgrade_record

FINISHED, RUNNING, FAILED, OOM = "finished", "running", "failed", "oom"
BUSY = "busy"  # never stored: the outcome of a run skipped because another process holds its claim
INDEX_NAME = "runs.jsonl"
ATTEMPT_NAME = "attempt.json"
CLAIM_NAME = "claim.json"


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
        "dataset_path": config.get("dataset_path") or (result.get("dataset") or {}).get("root"),
        "dataset_fingerprint": config.get("dataset_fingerprint"),
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
        "official_ratio_pct": params.get("official_ratio_pct"),
        "peak_mem_mb": eff.get("peak_mem_mb"),
        "peak_mem_source": eff.get("peak_mem_source"),
        "est_peak_mem_mb": eff.get("est_peak_mem_mb"),
        "measured_peak_allocated_mb": eff.get("measured_peak_allocated_mb"),
        "fwd_gflops": eff.get("fwd_gflops"),
        "fwd_gflops_no_attention": eff.get("fwd_gflops_no_attention"),
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


class ResultsFolderError(ValueError):
    """A results folder that cannot hold results (missing and not creatable, not a folder, not writable)."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def running_record(run_id: str, config: dict[str, Any], method_name: str) -> dict[str, Any]:
    """The record of a run that starts now in this process (not yet written)."""
    return {
        "schema": SCHEMA_VERSION,
        "run_id": run_id,
        "status": RUNNING,
        "method_name": method_name,
        "config": config,
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        "timestamps": {"started": utc_now()},
    }


def pid_alive(pid: Any) -> bool:
    """True if a process with this pid runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here: the signal check is all there is
    return state not in ("Z", "X")


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), to tell a reused pid apart; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


_HELD: dict[tuple[str, str], threading.Event] = {}  # claims this process holds now -> stops their heartbeat
CLAIM_HEARTBEAT_S = 30.0  # a holder touches its claim this often ...
CLAIM_EXPIRES_S = 600.0  # ... so a claim of another host untouched this long is stale (its node died)


def claim_alive(holder: dict[str, Any], age_s: float = 0.0) -> bool:
    """True unless the claim's process is known to be gone: on this host its pid is dead (or reused); a claim of
    another host is stale once its holder stopped touching it (`age_s`, seconds since it was last touched)."""
    if holder.get("host") != socket.gethostname():
        return age_s < CLAIM_EXPIRES_S
    pid = holder.get("pid")
    if pid == os.getpid():
        return (str(holder.get("root")), str(holder.get("run_id"))) in _HELD
    if not pid_alive(pid):
        return False
    started = holder.get("pid_started")
    now = process_start(int(str(pid))) if started is not None else None
    return started is None or now is None or now == started


def _heartbeat(path: Path, stop: threading.Event) -> None:
    """Touch a held claim now and then, so that other hosts can tell it from one whose node died."""
    while not stop.wait(CLAIM_HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def describe_holder(holder: dict[str, Any]) -> str:
    """'pid N on HOST' of a claim."""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


class ResultStore:
    """Reads and writes run records under one results root; `log` receives warnings (default: stderr)."""

    def __init__(self, root: str | Path, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.log = log or _stderr

    def run_dir(self, run_id: str) -> Path:
        """Folder of one run."""
        return self.root / run_id

    def result_path(self, run_id: str) -> Path:
        """Path of a run's result.json."""
        return self.run_dir(run_id) / "result.json"

    def attempt_path(self, run_id: str) -> Path:
        """Path of the record of a re-run of a finished run (in progress, killed, failed or out of memory)."""
        return self.run_dir(run_id) / ATTEMPT_NAME

    def claim_path(self, run_id: str) -> Path:
        """Path of the claim of the process training the run now."""
        return self.run_dir(run_id) / CLAIM_NAME

    def check_writable(self) -> None:
        """Raise ResultsFolderError unless results can be written under the root (creating nothing)."""
        try:
            check_writable_folder(self.root, "results folder")
        except FolderError as err:
            raise ResultsFolderError(str(err)) from None

    def load(self, run_id: str) -> dict[str, Any] | None:
        """A run's record in the current schema, or None if it has none (or an unreadable one)."""
        return self._read(self.result_path(run_id))

    def load_attempt(self, run_id: str) -> dict[str, Any] | None:
        """The record of the latest re-run of a finished run that did not finish, or None."""
        return self._read(self.attempt_path(run_id))

    def status(self, run_id: str) -> str | None:
        """A run's status, or None if it never started."""
        record = self.load(run_id)
        return record.get("status") if record else None

    def is_finished(self, run_id: str) -> bool:
        """True if the run finished; failed, out-of-memory and interrupted runs are not."""
        return self.status(run_id) == FINISHED

    def mark_running(self, run_id: str, config: dict[str, Any], method_name: str) -> dict[str, Any]:
        """Write the "running" record at the start of a run (so a kill leaves no finished row); for a finished run
        it goes to attempt.json and result.json keeps the finished record."""
        record = running_record(run_id, config, method_name)
        self.save(record)
        return record

    def save(self, record: dict[str, Any], update_index: bool = True) -> Path:
        """Write a record atomically in the current schema and refresh its row in the index (distributed workers
        skip the index and the driver calls `collect()` once instead of every task rewriting it).

        A record that is not finished never replaces a finished result.json: it is written to attempt.json beside
        it. Returns the path written. Only the record's own write raises (OSError); the index is derived data, so a
        failure to update it is reported through `log` and the run goes on.
        """
        record.update(upgrade_record(record))
        run_id = record["run_id"]
        if record.get("status") != FINISHED and self.is_finished(run_id):
            path = self.attempt_path(run_id)
            write_json_atomic(path, record)
            return path
        path = self.result_path(run_id)
        write_json_atomic(path, record)
        with contextlib.suppress(OSError):
            self.attempt_path(run_id).unlink()
        if update_index:
            try:
                self._update_index([summary_row(record)])
            except Exception as err:  # noqa: BLE001 - the record is stored; the index can be rebuilt from it
                self.log(
                    f"warning: could not update {self.root / INDEX_NAME} ({type(err).__name__}: {err}); the run is "
                    f"stored in {path}, and ResultStore({str(self.root)!r}).collect() rebuilds the index"
                )
        return path

    def save_fallback(self, record: dict[str, Any]) -> Path:
        """Write a record that could not be stored under the root to the system temp folder, else the home
        folder (a new file; no rename, which a full disk may refuse too); raises OSError if neither works."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        text = json_text(upgrade_record(record)).encode("utf-8")
        errors = []
        for folder in (Path(tempfile.gettempdir()), Path.home()):
            path = folder / f"petlbench-{record['run_id']}-{stamp}-{os.getpid()}.json"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
                with os.fdopen(fd, "wb") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                return path
            except OSError as err:
                errors.append(f"{folder}: {err.strerror or err}")
                with contextlib.suppress(OSError):
                    path.unlink()
        raise OSError(errno.EIO, f"could not write the record anywhere ({'; '.join(errors)})")

    def claim_holder(self, run_id: str) -> dict[str, Any] | None:
        """Who claimed the run (pid, host, started), or None if nobody; {} for a claim that cannot be read."""
        path = self.claim_path(run_id)
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {} if path.exists() else None
        return holder if isinstance(holder, dict) else {}

    def live_claim(self, run_id: str) -> dict[str, Any] | None:
        """The claim of the process training the run now, or None (no claim, or a stale one)."""
        holder = self.claim_holder(run_id)
        return holder if holder and claim_alive(holder, self._claim_age(run_id)) else None

    def _claim_age(self, run_id: str) -> float:
        try:
            return time.time() - self.claim_path(run_id).stat().st_mtime
        except OSError:
            return 0.0

    def try_claim(self, run_id: str) -> dict[str, Any] | None:
        """Claim the run for this process: None when claimed (then `release` it), else the live holder's claim (a
        stale claim, whose process is gone, is taken over). Raises OSError if the claim cannot be written."""
        path = self.claim_path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = {
            "run_id": run_id,
            "root": str(self.root.absolute()),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": utc_now(),
            "pid_started": process_start(os.getpid()),
        }
        # The flock makes "read the claim, find it stale, replace it" one step for every claimer on this machine.
        with file_lock(self.root / ".claims.lock"):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
            except FileExistsError:
                holder = self.live_claim(run_id)
                if holder is not None:
                    return holder
                path.unlink(missing_ok=True)  # stale, or torn by a crash between create and write
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(json.dumps(mine) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        stop = threading.Event()
        _HELD[(str(self.root.absolute()), run_id)] = stop
        threading.Thread(target=_heartbeat, args=(path, stop), name=f"claim {run_id}", daemon=True).start()
        return None

    def release(self, run_id: str) -> None:
        """Drop this process's claim on the run (a claim of another process is left alone)."""
        stop = _HELD.pop((str(self.root.absolute()), run_id), None)
        if stop is not None:
            stop.set()
        holder = self.claim_holder(run_id)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(OSError):
                self.claim_path(run_id).unlink()

    @contextlib.contextmanager
    def claim(self, run_id: str) -> Iterator[dict[str, Any] | None]:
        """Hold the run's claim for the block: yields None when this process holds it, else the live holder's claim
        (then nothing is held and the run must be skipped). Released on any exit, exceptions included."""
        holder = self.try_claim(run_id)
        try:
            yield holder
        finally:
            if holder is None:
                self.release(run_id)

    def records(self) -> list[dict[str, Any]]:
        """Every run record found under the root (the source of truth for reports)."""
        found = []
        for path in sorted(self.root.glob("*/result.json")):
            record = self._read(path)
            if record is not None:  # a torn file cannot exist (atomic writes), but a hand-edited one might
                found.append(record)
        return found

    def collect(self) -> int:
        """Rebuild `runs.jsonl` from every result.json (after a distributed sweep); returns the row count."""
        rows = [summary_row(r) for r in self.records()]
        with file_lock(self.root / ".index.lock"):
            self._write_index(rows)
        return len(rows)

    def rows(self) -> list[dict[str, Any]]:
        """The rows of `runs.jsonl`; unreadable lines are skipped and reported through `log`."""
        path = self.root / INDEX_NAME
        try:
            rows, bad = self._read_index()
        except OSError as err:
            self.log(f"warning: {path} cannot be read ({err.strerror or err}); no rows (collect() rebuilds it)")
            return []
        if bad:
            self.log(
                f"warning: {path}: unreadable {_lines(bad)} skipped (collect() rebuilds it from the result.json files)"
            )
        return rows

    def table(self):  # -> pandas.DataFrame
        """The results table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return upgrade_record(record) if isinstance(record, dict) else None

    def _read_index(self) -> tuple[list[dict[str, Any]], list[int]]:
        """The index's rows and the numbers of its unreadable lines (raises OSError if the file cannot be read)."""
        try:
            text = (self.root / INDEX_NAME).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return [], []
        rows, bad = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("run_id"), str):
                rows.append(row)
            else:
                bad.append(number)
        return rows, bad

    def _update_index(self, new_rows: list[dict[str, Any]]) -> None:
        path = self.root / INDEX_NAME
        with file_lock(self.root / ".index.lock"):
            try:
                current, bad = self._read_index()
                problem = f"unreadable {_lines(bad)}" if bad else ""
            except OSError as err:
                current, problem = [], f"cannot be read ({err.strerror or err})"
            if problem:
                self.log(f"warning: {path}: {problem}; rebuilt from the result.json files")
                current = [summary_row(r) for r in self.records()]
            rows = {row["run_id"]: row for row in current}
            for row in new_rows:
                rows[row["run_id"]] = row
            self._write_index(list(rows.values()))

    def _write_index(self, rows: list[dict[str, Any]]) -> None:
        lines = [json.dumps(_clean(row), sort_keys=False) for row in rows]
        write_text_atomic(self.root / INDEX_NAME, "\n".join(lines) + ("\n" if lines else ""))


def _lines(numbers: list[int]) -> str:
    """'line 3' / 'lines 3, 7, 9' (the first 20)."""
    shown = ", ".join(map(str, numbers[:20])) + (f" and {len(numbers) - 20} more" if len(numbers) > 20 else "")
    return f"line{'s' if len(numbers) > 1 else ''} {shown}"


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
