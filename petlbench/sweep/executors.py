"""Where sweep runs train: in this process (local), in one process per GPU (local, several GPUs), or on Ray.

Every executor trains a run through `run_job`, which writes the run's own `RESULTS/<run_id>/result.json`
atomically (the run id folder is unique per run, so no two tasks write the same file) under the run's claim: a run
another process (a `petlbench run`, another sweep's worker) is training is skipped with the status "busy", which
is neither done nor failed. A failure or an out-of-memory error inside a run is recorded as that run's status by
the trainer; a worker process or node lost mid-run is retried (bounded by `max_retries`) and, when retries run
out, recorded as failed by the driver.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from petlbench.core.config import RunConfig
from petlbench.core.results import BUSY, FAILED, FINISHED, OOM, RUNNING, ResultStore, describe_holder, utc_now

Summary = dict[str, Any]
Log = Callable[[str], None]
# Environment variables a remote worker needs to find data, plugins and caches like the driver does.
FORWARDED_ENV = (
    "PETLBENCH_DATA",
    "PETLBENCH_DATA_ROOT",
    "PETLBENCH_CACHE",
    "PETLBENCH_PLUGINS",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
)
_SOURCES: dict[tuple[Any, ...], Any] = {}  # per-process cache of opened datasets (Ray reuses worker processes)


def summary_of(record: dict[str, Any]) -> Summary:
    """The few fields of a run record the driver needs back from a task."""
    metrics = record.get("metrics") or {}
    return {
        "run_id": record.get("run_id"),
        "status": record.get("status"),
        "error": record.get("error"),
        "val_auc": metrics.get("val_auc"),
        "test_auc": metrics.get("test_auc"),
        "wall_seconds": (record.get("timestamps") or {}).get("wall_seconds"),
        "worker": record.get("worker"),
    }


def _open_source(job: dict[str, Any], log: Log) -> Any:
    """The job's dataset, opened once per process."""
    from petlbench.data.discover import open_dataset

    key = (job["dataset"], job["split_dir"], job["skip_bad_images"])
    source = _SOURCES.get(key)
    if source is None:
        source = open_dataset(
            job["dataset"], split_dir=Path(job["split_dir"]), seed=0, skip_bad_images=job["skip_bad_images"], log=log
        )
        _SOURCES[key] = source
    return source


def record_failure(store: ResultStore, job: dict[str, Any], status: str, error: str, detail: str = "") -> Summary:
    """Store a run as failed/oom when it could not run or its worker was lost (a finished record is kept)."""
    record = store.load(job["run_id"])
    if record is not None and record.get("status") == FINISHED:
        return summary_of(record)
    if record is None:
        record = store.mark_running(job["run_id"], job["config"], job["config"]["method"])
    record["status"] = status
    record["error"] = error
    if detail:
        record["traceback"] = detail
    record.setdefault("timestamps", {})["finished"] = utc_now()
    store.save(record)
    return summary_of(record)


def run_job(job: dict[str, Any], hooks: Any = None) -> Summary:
    """Train one run described by a job dict (see `plan.job_for`) and return its summary; never raises for a run.

    A run that already finished is not redone (unless the job says `force`): a retried task whose first attempt
    finished, or a second driver, finds it done.
    """
    from petlbench.engine.training import ProgressHooks

    hooks = hooks or ProgressHooks(log=lambda message: print(message, flush=True))
    store = ResultStore(job["results"], log=hooks.log)
    if not job.get("force"):
        record = store.load(job["run_id"])
        if record is not None and record.get("status") == FINISHED:
            return summary_of(record)
    try:
        with store.claim(job["run_id"]) as holder:
            if holder is not None:
                detail = f"{job['run_id']} is being trained by {describe_holder(holder)}; skipping"
                hooks.log(detail)
                return {"run_id": job["run_id"], "status": BUSY, "error": None, "detail": detail, "worker": holder}
            record = store.load(job["run_id"])
            if not job.get("force") and record is not None and record.get("status") == FINISHED:
                return summary_of(record)  # finished by the claim's last holder while this task waited
            return _run_claimed(job, store, hooks)
    except OSError as err:  # the results folder refuses writes: nothing can be recorded there
        error = f"cannot write under {store.root}: {type(err).__name__}: {err}"
        hooks.log(f"{job['run_id']}: {FAILED}: {error}")
        return {"run_id": job["run_id"], "status": FAILED, "error": error}


def _run_claimed(job: dict[str, Any], store: ResultStore, hooks: Any) -> Summary:
    """The body of `run_job` once the run is claimed: check the job still describes this worker's run, train."""
    from petlbench.engine.training import run_training
    from petlbench.reports.callbacks import run_callbacks

    try:
        cfg = RunConfig.from_dict(job["config"])
        cfg.build_method()  # raises if this worker's petlbench resolves the method's options differently
        if cfg.run_id != job["run_id"]:
            raise RuntimeError(
                f"this worker resolves the run to {cfg.run_id}, not {job['run_id']}: its petlbench or method "
                "options differ from the driver's; install the same petlbench version on every node"
            )
        source = _open_source(job, hooks.log)
        if source.fingerprint() != cfg.dataset_fingerprint:
            raise RuntimeError(
                f"the data at {source.root} changed since the sweep was planned (fingerprint "
                f"{source.fingerprint()} != {cfg.dataset_fingerprint}); re-run the sweep to plan it again"
            )
    except Exception as err:  # noqa: BLE001 - a run that cannot start is recorded as failed; the sweep goes on
        return record_failure(store, job, FAILED, f"{type(err).__name__}: {err}", traceback.format_exc(limit=10))
    record = run_training(cfg, source, store, hooks, run_callbacks(job.get("profile", True), job.get("log_to", ())))
    return summary_of(record)


class Executor(Protocol):
    """What the sweep driver needs from an executor."""

    name: str

    def capacity(self) -> int:
        """How many runs may be in flight now."""

    def submit(self, job: dict[str, Any]) -> None:
        """Start a run."""

    def wait(self, timeout: float) -> list[tuple[dict[str, Any], Summary]]:
        """Runs that ended (blocking up to `timeout` seconds while any is in flight)."""

    def in_flight(self) -> int:
        """Number of runs started and not yet returned."""

    def close(self) -> None:
        """Release processes and connections."""


@dataclass
class LocalExecutor:
    """One run at a time in this process (CPU, or the one GPU); progress hooks drive the live view."""

    hooks_for: Callable[[dict[str, Any]], Any] | None = None
    name: str = "local"

    def __post_init__(self) -> None:
        """Start with nothing queued."""
        self._pending: list[dict[str, Any]] = []

    def capacity(self) -> int:
        """One run at a time."""
        return 1

    def submit(self, job: dict[str, Any]) -> None:
        """Queue the run; it trains inside the next `wait`."""
        self._pending.append(job)

    def wait(self, timeout: float) -> list[tuple[dict[str, Any], Summary]]:
        """Train the queued run here and now."""
        if not self._pending:
            time.sleep(min(timeout, 0.05))
            return []
        job = self._pending.pop(0)
        hooks = self.hooks_for(job) if self.hooks_for else None
        return [(job, run_job(job, hooks))]

    def in_flight(self) -> int:
        """0 or 1."""
        return len(self._pending)

    def close(self) -> None:
        """Nothing to release."""


def _bind_device(devices: Any, workers: int) -> None:
    """Pool initializer: pin this worker process to one GPU (before CUDA is initialised) and share the CPU cores."""
    device = devices.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def _pool_entry(job: dict[str, Any]) -> Summary:
    """The pool task: train one run in a worker process."""
    return run_job(job)


class PoolExecutor:
    """One worker process per GPU of this machine, one run at a time on each; a crashed worker is replaced."""

    name = "local"

    def __init__(self, devices: list[int | None], store: ResultStore, max_retries: int = 2, log: Log = print) -> None:
        """Start the pool."""
        self.devices = devices
        self.store = store
        self.max_retries = max_retries
        self.log = log
        self._context = multiprocessing.get_context("spawn")
        self._futures: dict[cf.Future, dict[str, Any]] = {}
        self._attempts: dict[str, int] = {}
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        """A process pool whose workers each take one device from a queue."""
        queue = self._context.Queue()
        for device in self.devices:
            queue.put(device)
        return cf.ProcessPoolExecutor(
            max_workers=len(self.devices),
            mp_context=self._context,
            initializer=_bind_device,
            initargs=(queue, len(self.devices)),
        )

    def capacity(self) -> int:
        """One run per device."""
        return len(self.devices)

    def submit(self, job: dict[str, Any]) -> None:
        """Start the run in a free worker process."""
        self._attempts[job["run_id"]] = self._attempts.get(job["run_id"], 0) + 1
        self._futures[self._pool.submit(_pool_entry, job)] = job

    def wait(self, timeout: float) -> list[tuple[dict[str, Any], Summary]]:
        """Collect ended runs; a broken pool (a worker died) is rebuilt and its runs retried or failed."""
        if not self._futures:
            time.sleep(min(timeout, 0.05))
            return []
        done, _ = cf.wait(list(self._futures), timeout=timeout, return_when=cf.FIRST_COMPLETED)
        ended: list[tuple[dict[str, Any], Summary]] = []
        broken = False
        for future in done:
            job = self._futures.pop(future)
            try:
                ended.append((job, future.result()))
            except cf.process.BrokenProcessPool as err:
                broken = True
                ended.extend(self._retry_or_fail(job, f"worker process died: {err}"))
        if broken:
            lost = list(self._futures.values())
            self._futures.clear()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            for job in lost:
                ended.extend(self._retry_or_fail(job, "worker pool restarted after a crash"))
        return ended

    def _retry_or_fail(self, job: dict[str, Any], reason: str) -> list[tuple[dict[str, Any], Summary]]:
        """Resubmit a run whose worker died, or record it as failed once retries run out."""
        if self._attempts.get(job["run_id"], 0) <= self.max_retries:
            self.log(f"retrying {job['label']}: {reason}")
            self.submit(job)
            return []
        error = f"lost worker: {reason} (tried {self._attempts[job['run_id']]} times)"
        return [(job, record_failure(self.store, job, FAILED, error))]

    def in_flight(self) -> int:
        """Runs started and not yet ended."""
        return len(self._futures)

    def close(self) -> None:
        """Stop the worker processes."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _ray_entry(job: dict[str, Any], threads: int) -> Summary:
    """The Ray task: train one run on whatever node Ray picked."""
    import torch

    torch.set_num_threads(max(1, threads))
    return run_job(job)


def _ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """`ray.init` arguments: the address, quiet logs, and the environment tasks need."""
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address:
        kwargs["address"] = address
        host = address.split("://")[-1].rsplit(":", 1)[0]
        if host.startswith("127."):
            kwargs["_node_ip_address"] = host  # a loopback-only cluster: the driver joins on the same address
    from petlbench.data.cards import DATA_ROOT_ENV, DEFAULT_DATA_ROOT

    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    for name in ("PETLBENCH_DATA", "PETLBENCH_DATA_ROOT", "PETLBENCH_CACHE", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME"):
        if name in env:  # a relative folder would resolve against the task's working directory
            env[name] = str(Path(env[name]).expanduser().absolute())
    # Card data roots default to ./data of the driver; a task's working directory is elsewhere.
    env.setdefault(DATA_ROOT_ENV, str(Path(DEFAULT_DATA_ROOT).absolute()))
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    return kwargs


class RayExecutor:
    """Runs as Ray tasks: `gpus_per_run` GPUs each (fractions share a GPU) on a GPU cluster, else CPU tasks.

    Ray retries a task whose worker process or node died, up to `max_retries` times, on any live node; a run that
    still could not finish is recorded as failed here, so every run ends with exactly one result.
    """

    name = "ray"

    def __init__(
        self,
        store: ResultStore,
        address: str | None = None,
        gpus_per_run: float = 1.0,
        cpus_per_run: float = 1.0,
        max_retries: int = 2,
        log: Log = print,
    ) -> None:
        """Connect to the cluster (or start a local one) and size tasks to its resources."""
        try:
            import ray
        except ImportError as err:
            raise RuntimeError("--executor ray needs Ray: pip install 'petlbench[ray]'") from err
        self._ray = ray
        self.store = store
        self.log = log
        self.max_retries = max_retries
        if not ray.is_initialized():
            try:
                ray.init(**_ray_init_kwargs(address))
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise RuntimeError(f"cannot connect to the Ray cluster at {address or 'auto'}: {err}") from err
        resources = ray.cluster_resources()
        self.gpus = float(resources.get("GPU", 0.0))
        self.gpus_per_run = gpus_per_run if self.gpus > 0 else 0.0
        self.cpus_per_run = cpus_per_run
        if self.gpus_per_run > 1 and self.gpus_per_run != int(self.gpus_per_run):
            raise ValueError(f"--gpus-per-run {gpus_per_run}: use a fraction <= 1 or a whole number")
        self._task = ray.remote(_ray_entry).options(
            num_cpus=cpus_per_run,
            num_gpus=self.gpus_per_run,
            max_retries=max_retries,
            retry_exceptions=False,  # a run's own failure is recorded by the trainer, never retried
        )
        self._refs: dict[Any, dict[str, Any]] = {}

    @property
    def device(self) -> str:
        """Where runs train: "cuda" when the cluster has GPUs, else "cpu"."""
        return "cuda" if self.gpus_per_run > 0 else "cpu"

    def capacity(self) -> int:
        """Runs the live nodes can hold at once (at least 1, so a sweep waits for nodes rather than stopping)."""
        resources = self._ray.cluster_resources()
        if self.gpus_per_run > 0:
            slots = resources.get("GPU", 0.0) / self.gpus_per_run
        else:
            slots = resources.get("CPU", 0.0) / max(self.cpus_per_run, 1e-6)
        return max(1, int(slots + 1e-9))

    def submit(self, job: dict[str, Any]) -> None:
        """Submit the run as a Ray task."""
        self._refs[self._task.remote(job, max(1, int(self.cpus_per_run)))] = job

    def wait(self, timeout: float) -> list[tuple[dict[str, Any], Summary]]:
        """Runs whose task returned; a task Ray gave up on (retries exhausted) is recorded as failed or oom."""
        if not self._refs:
            time.sleep(min(timeout, 0.05))
            return []
        ready, _ = self._ray.wait(list(self._refs), num_returns=len(self._refs), timeout=timeout)
        ended = []
        for ref in ready:
            job = self._refs.pop(ref)
            try:
                ended.append((job, self._ray.get(ref)))
            except self._ray.exceptions.RayError as err:
                status = OOM if isinstance(err, self._ray.exceptions.OutOfMemoryError) else FAILED
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                if isinstance(err, self._ray.exceptions.RayTaskError):
                    error = f"task raised {type(err).__name__}: {first_line}"
                else:
                    error = f"lost worker ({type(err).__name__}) after {self.max_retries} retries: {first_line}"
                self.log(f"{job['label']}: {error}")
                ended.append((job, record_failure(self.store, job, status, error)))
        return ended

    def in_flight(self) -> int:
        """Tasks submitted and not yet returned."""
        return len(self._refs)

    def close(self) -> None:
        """Cancel what is still running (its "running" records are redone next time) and disconnect."""
        for ref in list(self._refs):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self._refs.clear()
        self._ray.shutdown()


class SweepObserver(Protocol):
    """What the driver reports to (the live view implements it)."""

    def started(self, run: Any, job: dict[str, Any]) -> None:
        """A run was handed to the executor."""

    def ended(self, run: Any, job: dict[str, Any], summary: Summary) -> None:
        """A run ended (finished, failed or oom)."""

    def tick(self) -> None:
        """Called between waits (refresh)."""


def run_sweep(
    plan: Any, store: ResultStore, executor: Executor, force: bool = False, observer: SweepObserver | None = None
) -> Any:
    """Drive a sweep to the end: feed ready runs to the executor, settle searches, queue final runs.

    Returns the scheduler (its counts and selections). The results index is rebuilt from every result.json at
    the end, also when interrupted, so the table holds each run exactly once.
    """
    from petlbench.sweep.plan import Scheduler, job_for

    scheduler = Scheduler(plan, store, force)
    if observer is not None and hasattr(observer, "attach"):
        observer.attach(scheduler, executor)
    try:
        while not scheduler.finished:
            while executor.in_flight() < executor.capacity():
                run = scheduler.next()
                if run is None:
                    break
                job = job_for(plan, run, force)
                executor.submit(job)
                if observer is not None:
                    observer.started(run, job)
            for job, summary in executor.wait(timeout=0.5):
                run = scheduler.in_flight[job["run_id"]]
                scheduler.finish(run, summary.get("status") or FAILED)
                if observer is not None:
                    observer.ended(run, job, summary)
            if observer is not None:
                observer.tick()
    finally:
        executor.close()
        store.collect()
    return scheduler


def local_devices(device: str) -> list[int | None]:
    """The local executor's slots: one per visible GPU for CUDA sweeps, else a single in-process slot."""
    if device != "cuda":
        return [None]
    import torch

    return list(range(torch.cuda.device_count())) or [None]


__all__ = [
    "BUSY",
    "FAILED",
    "FINISHED",
    "OOM",
    "RUNNING",
    "Executor",
    "LocalExecutor",
    "PoolExecutor",
    "RayExecutor",
    "local_devices",
    "record_failure",
    "run_job",
    "run_sweep",
    "summary_of",
]
