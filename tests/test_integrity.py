"""Results integrity: a finished record is only replaced by a finished one, the index is derived data, one process
trains a run, exit codes, log text is never markup, unusable results folders, umask, weights checked up front."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from petlbench.cli import app
from petlbench.core.atomic import write_json_atomic
from petlbench.core.results import FAILED, FINISHED, RUNNING, ResultStore, summary_row
from petlbench.engine import training
from petlbench.engine.runner import RunRequest, RunRequestError, format_mean_std, resolve, summarise

PETLBENCH = Path(sys.executable).parent / "petlbench"
TINY = ["--backbone", "test_vit", "--res", "32", "--epochs", "1", "--batch-size", "4"]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_CACHE", str(tmp_path / "user-cache"))


def invoke(*args: str) -> Any:
    """Run the CLI in-process (output includes stderr)."""
    return runner.invoke(app, list(args), catch_exceptions=False)


def fake_training(monkeypatch: pytest.MonkeyPatch, error: BaseException | None = None, auc: float = 72.53) -> None:
    """Replace the training loop (not the store around it) by an instant result, or by raising `error`."""

    def train(cfg: Any, method: Any, *args: Any) -> dict[str, Any]:
        if error is not None:
            raise error
        return {
            "method_name": method.display_name,
            "params": {"trainable": 10, "total": 1000, "ratio_pct": 1.0},
            "history": [{"epoch": 1}],
            "metrics": {"best_epoch": 1, "val_auc": auc + 1.0, "test_auc": auc, "test_acc": 50.0},
            "efficiency": {},
            "predictions": {},
            "batch_size_used": cfg.batch_size,
        }

    monkeypatch.setattr(training, "_train_and_test", train)


_RESOLVED: dict[tuple[str, int], Any] = {}


def config_of(results: Path, method: str = "linear_probe", epochs: int = 1) -> Any:
    """The RunConfig `petlbench run --methods METHOD --results RESULTS` with TINY (and `epochs`) resolves to,
    resolved once per session (the embedded data has an official split, so the results folder changes nothing)."""
    if (method, epochs) not in _RESOLVED:
        request = RunRequest(methods=method, backbone="test_vit", res=32, epochs=epochs, batch_size=4, results=results)
        _RESOLVED[method, epochs] = resolve(request, log=lambda message: None).configs[0][1]
    return _RESOLVED[method, epochs]


def finished_record(cfg: Any, test_auc: float = 77.0) -> dict[str, Any]:
    """A finished record of `cfg` with metrics (as an earlier run left it)."""
    return {
        "run_id": cfg.run_id,
        "status": FINISHED,
        "method_name": "Linear probing",
        "config": cfg.to_dict(),
        "metrics": {"best_epoch": 1, "val_auc": 80.0, "test_auc": test_auc, "test_acc": 60.0},
        "params": {"trainable": 1, "total": 10, "ratio_pct": 10.0},
        "timestamps": {"started": "2020-01-01T00:00:00+00:00", "finished": "2020-01-01T00:01:00+00:00"},
    }


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PETLBENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", COLUMNS="200", PYTHONUNBUFFERED="1")
    return env


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the process ended before writing " + str(path)
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------------
# 1. A finished record is replaced only by a finished successor


def test_unfinished_attempt_never_replaces_a_finished_record(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    cfg = config_of(tmp_path)
    store.save(finished_record(cfg))
    attempt = store.mark_running(cfg.run_id, cfg.to_dict(), "Linear probing")
    assert store.is_finished(cfg.run_id) and store.load(cfg.run_id)["metrics"]["test_auc"] == 77.0
    assert store.load_attempt(cfg.run_id)["status"] == RUNNING
    attempt.update(status=FAILED, error="RuntimeError: boom")
    assert store.save(attempt) == store.attempt_path(cfg.run_id)
    assert store.is_finished(cfg.run_id) and store.load_attempt(cfg.run_id)["status"] == FAILED
    assert [row["status"] for row in store.rows()] == [FINISHED]  # the index keeps the finished row
    store.save(finished_record(cfg, test_auc=88.0))  # a finished successor replaces it, and the attempt is gone
    assert store.load(cfg.run_id)["metrics"]["test_auc"] == 88.0 and store.load_attempt(cfg.run_id) is None


def test_forced_rerun_that_fails_keeps_the_finished_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultStore(tmp_path)
    cfg = config_of(tmp_path)
    store.save(finished_record(cfg))
    fake_training(monkeypatch, RuntimeError("diverged"))
    result = invoke("run", "--methods", "linear_probe", "--results", str(tmp_path), "--force", *TINY)
    assert result.exit_code == 1, result.output
    assert store.load(cfg.run_id)["metrics"]["test_auc"] == 77.0
    assert store.load_attempt(cfg.run_id)["error"] == "RuntimeError: diverged"
    assert f"the finished record in {store.result_path(cfg.run_id)} is kept" in result.output
    assert not store.claim_path(cfg.run_id).exists()  # released after the failure


@pytest.mark.slow
def test_forced_rerun_killed_mid_run_keeps_the_finished_record(tmp_path: Path) -> None:
    """`run --force` killed with SIGKILL 2 s into training: result.json is still the finished record."""
    results = tmp_path / "results"
    store = ResultStore(results)
    epochs = 500  # far longer than the 2 s before the kill, on any machine
    cfg = config_of(results, epochs=epochs)
    store.save(finished_record(cfg))
    args = ["run", "--methods", "linear_probe", "--results", str(results), *TINY, "--epochs", str(epochs), "--force"]
    log = open(tmp_path / "forced.log", "w")  # noqa: SIM115 - closed below
    forced = subprocess.Popen([str(PETLBENCH), *args], stdout=log, stderr=subprocess.STDOUT, env=_env(tmp_path))
    try:
        _wait_for(store.attempt_path(cfg.run_id), forced, timeout=120)
        time.sleep(2.0)
        assert forced.poll() is None, (tmp_path / "forced.log").read_text()
        forced.send_signal(signal.SIGKILL)
        forced.wait(timeout=30)
    finally:
        if forced.poll() is None:
            forced.kill()
            forced.wait(timeout=30)
        log.close()
    record = store.load(cfg.run_id)
    assert record is not None and record["status"] == FINISHED and record["metrics"]["test_auc"] == 77.0
    assert store.load_attempt(cfg.run_id)["status"] == RUNNING  # the killed attempt, beside it
    assert [row["status"] for row in store.rows()] == [FINISHED]
    assert store.live_claim(cfg.run_id) is None  # the killed process's claim is stale ...
    assert store.try_claim(cfg.run_id) is None  # ... and taken over
    store.release(cfg.run_id)


# ---------------------------------------------------------------------------------------------------------------
# 2. The runs index is derived data


def _two_records(store: ResultStore) -> list[str]:
    ids = []
    for method in ("lora", "bitfit"):
        record = {"run_id": f"{method}-1", "status": FINISHED, "config": {"method": method}, "metrics": {}}
        store.save(record)
        ids.append(record["run_id"])
    return ids


def test_bad_index_lines_are_skipped_reported_and_rebuilt(tmp_path: Path) -> None:
    messages: list[str] = []
    store = ResultStore(tmp_path, log=messages.append)
    ids = _two_records(store)
    index = tmp_path / "runs.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([lines[0], '{"run_id": "lora-1", "sta', lines[1], "[1, 2]"]) + "\n")
    assert [row["run_id"] for row in store.rows()] == ids
    assert messages == [
        f"warning: {index}: unreadable lines 2, 4 skipped (collect() rebuilds it from the result.json files)"
    ]
    messages.clear()
    store.save({"run_id": "ssf-1", "status": FAILED, "config": {"method": "ssf"}, "error": "boom"})
    assert messages == [f"warning: {index}: unreadable lines 2, 4; rebuilt from the result.json files"]
    assert sorted(row["run_id"] for row in store.rows()) == ["bitfit-1", "lora-1", "ssf-1"]
    assert len(messages) == 1  # the rebuilt index reads cleanly


def test_corrupt_index_does_not_block_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultStore(tmp_path)
    _two_records(store)
    (tmp_path / "runs.jsonl").write_text('{"run_id": "lora-1"\n')
    fake_training(monkeypatch)
    result = invoke("run", "--methods", "linear_probe", "--results", str(tmp_path), *TINY)
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'runs.jsonl'}: unreadable line 1; rebuilt from the result.json files" in result.output
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["bitfit", "linear_probe", "lora"]
    assert all(r["status"] == FINISHED for r in rows)


def test_index_that_cannot_be_written_does_not_fail_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    messages: list[str] = []
    store = ResultStore(tmp_path, log=messages.append)

    def refuse(self: ResultStore, rows: list[dict[str, Any]]) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ResultStore, "_write_index", refuse)
    store.save({"run_id": "lora-1", "status": FINISHED, "config": {"method": "lora"}})
    assert store.is_finished("lora-1")
    assert len(messages) == 1 and "could not update" in messages[0] and "collect()" in messages[0]


# ---------------------------------------------------------------------------------------------------------------
# 3. One process trains a run


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _write_claim(store: ResultStore, run_id: str, **holder: Any) -> None:
    path = store.claim_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "started": "2020-01-01T00:00:00+00:00", **holder}))


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    host = socket.gethostname()
    with store.claim("a-1") as holder:
        assert holder is None
        claim = json.loads(store.claim_path("a-1").read_text())
        assert (claim["pid"], claim["host"]) == (os.getpid(), host) and claim["started"]
        assert store.try_claim("a-1") == claim  # held: nobody else gets it
    assert not store.claim_path("a-1").exists()  # released
    with pytest.raises(RuntimeError), store.claim("a-1"):
        raise RuntimeError("training crashed")
    assert not store.claim_path("a-1").exists()  # released on an exception too

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_claim(store, "b-1", pid=sleeper.pid, host=host)
        assert store.try_claim("b-1")["pid"] == sleeper.pid  # a live process on this host holds it
    finally:
        sleeper.kill()
        sleeper.wait()
    _write_claim(store, "c-1", pid=_dead_pid(), host=host)
    assert store.try_claim("c-1") is None  # its process is gone: stale, taken over
    store.release("c-1")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)  # exited, not reaped: kill(pid, 0) still succeeds
    _write_claim(store, "z-1", pid=zombie.pid, host=host)
    assert store.try_claim("z-1") is None  # a killed process not yet reaped holds nothing
    store.release("z-1")
    zombie.wait()
    _write_claim(store, "d-1", pid=1, host="elsewhere")
    assert store.try_claim("d-1")["host"] == "elsewhere"  # another machine's live claim
    old = time.time() - 3600
    os.utime(store.claim_path("d-1"), (old, old))
    assert store.try_claim("d-1") is None  # ... that its holder stopped touching long ago: its node died
    store.release("d-1")
    store.claim_path("e-1").parent.mkdir()
    store.claim_path("e-1").write_text("")  # torn by a crash between create and write
    assert store.try_claim("e-1") is None
    store.release("e-1")


def test_run_skips_a_run_another_process_is_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultStore(tmp_path)
    busy = config_of(tmp_path, "linear_probe")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fake_training(monkeypatch)
    try:
        _write_claim(store, busy.run_id, pid=sleeper.pid, host=socket.gethostname())
        result = invoke("run", "--methods", "linear_probe,bitfit", "--results", str(tmp_path), *TINY)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert result.exit_code == 0, result.output  # skipped, not failed
    assert f"{busy.run_id} (linear_probe seed 0) is being trained by pid {sleeper.pid} on " in result.output
    assert store.load(busy.run_id) is None and store.claim_holder(busy.run_id)["pid"] == sleeper.pid
    assert [row["method"] for row in store.rows()] == ["bitfit"]
    assert "0/1 (busy)" in result.output


def test_sweep_worker_skips_a_run_another_process_is_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from petlbench.sweep.executors import run_job
    from petlbench.sweep.plan import build_plan, job_for
    from petlbench.sweep.spec import load_spec

    results = tmp_path / "results"
    plan = build_plan(load_spec(str(_tiny_sweep_spec(tmp_path)), {}), results, device="cpu")
    job = job_for(plan, plan.cells[0].search[0])
    store = ResultStore(results)
    fake_training(monkeypatch)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_claim(store, job["run_id"], pid=sleeper.pid, host=socket.gethostname())
        busy = run_job(job)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert busy["status"] == "busy" and f"is being trained by pid {sleeper.pid}" in busy["detail"]
    assert store.load(job["run_id"]) is None  # nothing written: the other process owns the run
    assert run_job(job)["status"] == FINISHED  # its process is gone: the claim is stale and taken over


@pytest.mark.slow
def test_two_concurrent_runs_train_each_run_once(tmp_path: Path) -> None:
    results = tmp_path / "results"
    cmd = [str(PETLBENCH), "run", "--methods", "linear_probe,bitfit", "--results", str(results), *TINY]
    processes = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path))
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    trained = [m for output in outputs for m in re.findall(r"^train \S+ seed 0 \((\S+)\)$", output, re.MULTILINE)]
    rows = ResultStore(results).rows()
    assert sorted(trained) == sorted(row["run_id"] for row in rows), outputs  # each run trained exactly once
    assert len(rows) == 2 and all(row["status"] == FINISHED for row in rows)
    everything = "".join(outputs)
    for row in rows:  # the process that did not train it skipped it: busy, or finished by then
        busy = re.search(rf"^{re.escape(row['run_id'])} \(.*\) is being trained by pid \d+", everything, re.MULTILINE)
        assert busy or f"already finished ({row['run_id']})" in everything, everything
    assert not list(results.glob("*/claim.json"))


# ---------------------------------------------------------------------------------------------------------------
# 4. Exit codes; 5. log text is not markup


def test_every_run_failing_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_training(monkeypatch, RuntimeError("boom"))
    result = invoke("run", "--methods", "linear_probe,bitfit", "--results", str(tmp_path), *TINY)
    assert result.exit_code == 1, result.output
    assert "2 of 2 runs failed or ran out of memory (exit status 1)" in result.output
    assert sorted(row["status"] for row in ResultStore(tmp_path).rows()) == [FAILED, FAILED]
    assert "Exit status: 0 every run finished" in invoke("run", "--help").output


def test_error_text_with_brackets_is_printed_not_read_as_markup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = "cannot read /data/[/x]/[bold]img.png"
    fake_training(monkeypatch, OSError(message))
    result = invoke("run", "--methods", "linear_probe,bitfit", "--results", str(tmp_path), *TINY)
    assert result.exit_code == 1, result.output
    assert f"failed: OSError: {message}" in result.output  # verbatim, both runs tried
    records = ResultStore(tmp_path).records()
    assert len(records) == 2 and all(r["status"] == FAILED and message in r["error"] for r in records)


# ---------------------------------------------------------------------------------------------------------------
# 6. Unusable results folders; a full disk at the final save


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` read-only: chmod where that binds this user, else refuse writes under it by monkeypatching."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for path in modes:
            path.chmod(0o555)
        try:
            yield
        finally:
            for path, mode in modes.items():
                path.chmod(stat.S_IMODE(mode))
        return
    inside = str(folder.resolve())

    def under(path: Any) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(inside)

    def denied(path: Any) -> OSError:
        return PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    real_open, real_os_open = io.open, os.open

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if under(file) and any(flag in mode for flag in "wax+"):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("builtins.open", guarded_open)
        patch.setattr(io, "open", guarded_open)
        patch.setattr(os, "open", guarded_os_open)
        for name in ("mkdir", "unlink", "remove", "rmdir", "replace", "rename", "utime"):
            real = getattr(os, name)

            def guarded(path: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
                if under(path) or any(under(a) for a in args):
                    raise denied(path)
                return _real(path, *args, **kwargs)

            patch.setattr(os, name, guarded)
        yield


@pytest.mark.parametrize("case", ["file", "parent-is-file", "read-only"])
def test_unusable_results_folder_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    fake_training(monkeypatch)
    if case == "file":
        results = tmp_path / "results"
        results.write_text("not a folder")
        expected = f"error: results folder {results} is not a directory: choose another with --results"
    elif case == "parent-is-file":
        (tmp_path / "file").write_text("")
        results = tmp_path / "file" / "results"
        expected = f"results folder {results} cannot be created: {tmp_path / 'file'} is not a directory"
    else:
        results = tmp_path / "results"
        results.mkdir()
        expected = f"error: results folder {results} is not writable (Permission denied): choose another with --results"
    with read_only(results) if case == "read-only" else contextlib.nullcontext():
        result = invoke("run", "--methods", "linear_probe", "--results", str(results), *TINY)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


def _fail_final_saves(monkeypatch: pytest.MonkeyPatch, after: int = 1) -> list[str]:
    """Let the first `after` result.json writes through, then fail every one with ENOSPC (as a full disk)."""
    calls: list[str] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(dst).endswith("result.json"):
            calls.append(os.fspath(dst))
            if len(calls) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_full_disk_at_the_final_save_keeps_the_record_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, spare = tmp_path / "results", tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spare))
    fake_training(monkeypatch, auc=64.5)
    calls = _fail_final_saves(monkeypatch)
    result = invoke("run", "--methods", "linear_probe", "--results", str(results), *TINY)
    assert result.exit_code == 0, result.output
    assert len(calls) == 3  # the "running" record, the final save and its one retry
    (fallback,) = spare.glob("petlbench-linear_probe-*.json")
    record = json.loads(fallback.read_text())
    assert record["status"] == FINISHED and record["metrics"]["test_auc"] == 64.5
    assert f"the finished record was written to {fallback} instead" in result.output.replace("\n", "")


def test_nowhere_to_write_fails_the_run_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_training(monkeypatch)
    _fail_final_saves(monkeypatch)

    def nowhere(self: ResultStore, record: dict[str, Any]) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ResultStore, "save_fallback", nowhere)
    result = invoke("run", "--methods", "linear_probe", "--results", str(tmp_path), *TINY)
    assert result.exit_code == 1, result.output
    assert "failed: could not store the record:" in result.output and "No space left on device" in result.output


def _tiny_sweep_spec(tmp_path: Path) -> Path:
    import yaml

    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "methods": ["linear_probe"],
                "backbones": ["test_vit"],
                "resolutions": [32],
                "seeds": [0, 1],
                "grid": {"lr": [1e-3]},
                "epochs": 1,
                "batch_size": 4,
                "device": "cpu",
                "profile": False,
            }
        )
    )
    return spec


def test_sweep_status_works_on_a_read_only_results_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, results = _tiny_sweep_spec(tmp_path), tmp_path / "results"
    fake_training(monkeypatch)
    ran = invoke("sweep", str(spec), "--results", str(results))
    assert ran.exit_code == 0, ran.output
    before = sorted(str(p) for p in results.rglob("*"))
    with read_only(results):
        status = invoke("sweep", str(spec), "--status", "--results", str(results))
        assert status.exit_code == 0, status.output
        assert "│ done    │    2 │" in status.output
        assert "72.53 ± 0.00 (n=2)" in status.output
    assert sorted(str(p) for p in results.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------------
# 7. Written files follow the umask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "plain.json", {"a": 1})
        store = ResultStore(tmp_path / "results")
        store.save({"run_id": "lora-1", "status": FINISHED, "config": {"method": "lora"}})
        with store.claim("lora-2"):
            claim_mode = stat.S_IMODE(store.claim_path("lora-2").stat().st_mode)
    finally:
        os.umask(previous)
    for path in (tmp_path / "plain.json", store.result_path("lora-1"), store.root / "runs.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert claim_mode == mode


# ---------------------------------------------------------------------------------------------------------------
# 8. --weights checked once, before any run


def _state_dict(**kwargs: Any) -> dict[str, torch.Tensor]:
    import timm

    return timm.create_model("test_vit", num_classes=0, **kwargs).state_dict()


def test_weights_are_checked_before_any_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_training(monkeypatch)
    results = tmp_path / "results"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 100)
    narrow = tmp_path / "narrow.pt"
    torch.save(_state_dict(embed_dim=32, num_heads=2), narrow)
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.layer.0.weight": torch.zeros(3)}, foreign)
    cases = {
        garbage: f"--weights {garbage}: not a readable checkpoint (",
        narrow: f"--weights {narrow} is for another architecture than test_vit: ",
        foreign: f"--weights {foreign} does not hold the weights of test_vit: ",
    }
    for path, message in cases.items():
        result = invoke(
            "run", "--methods", "linear_probe,lora", "--results", str(results), "--weights", str(path), *TINY
        )
        assert result.exit_code == 2, result.output
        assert message in result.output.replace("\n", ""), result.output
        assert not results.exists() or not list(results.glob("*/result.json"))  # nothing trained or recorded
    assert "blocks.0.attn.qkv.weight is [96, 32] in the file and [192, 64] in test_vit" in invoke(
        "run", "--methods", "lora", "--results", str(results), "--weights", str(narrow), *TINY
    ).output.replace("\n", "")
    with pytest.raises(RunRequestError, match=r"tensors missing, such as blocks\.0\.attn\.qkv\.weight"):
        resolve(RunRequest(methods="lora", backbone="test_vit", res=32, results=results, weights=str(foreign)))
    good = tmp_path / "good.pt"
    torch.save({"state_dict": _state_dict()}, good)
    resolved = resolve(RunRequest(methods="lora", backbone="test_vit", res=32, results=results, weights=str(good)))
    assert resolved.configs[0][1].weights.startswith("file:good.pt#")


# ---------------------------------------------------------------------------------------------------------------
# 9. One seed has no spread


def test_one_seed_shows_no_spread_and_n(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert format_mean_std(72.534, 0.0, 1) == "72.53 ± — (n=1)"
    assert format_mean_std(72.534, 0.414, 3) == "72.53 ± 0.41 (n=3)"
    assert format_mean_std(float("nan"), float("nan"), 0) == "—"
    cfg = config_of(tmp_path)
    (row,) = summarise([finished_record(cfg)])
    assert row["n"] == 1 and row["test_auc"][0] == 77.0 and row["test_auc"][1] != row["test_auc"][1]  # NaN std
    fake_training(monkeypatch)
    result = invoke("run", "--methods", "linear_probe", "--results", str(tmp_path), *TINY)
    assert result.exit_code == 0, result.output
    assert "72.53 ± — (n=1)" in result.output and "± 0.00" not in result.output
    assert summary_row(ResultStore(tmp_path).records()[0])["test_auc"] == 72.53
