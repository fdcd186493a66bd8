"""A sweep on a real two-node Ray cluster on this machine (loopback only), losing its worker node mid-run.

The cluster is a head and a worker node started with `ray start --block`, each in its own process group, so the
worker node can be killed on its own and everything can be cleaned up by process group (never by process name:
`ray stop` would also stop other Ray clusters on the machine). Ray rewrites the node address 127.0.0.1 into the
machine's routable address, so the nodes use 127.0.0.2, another loopback address that Ray keeps as given.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from petlbench.core.results import FINISHED, ResultStore

pytest.importorskip("ray")

RAY = Path(sys.executable).parent / "ray"
PETLBENCH = Path(sys.executable).parent / "petlbench"
NODE_IP = "127.0.0.2"
MARKER = "PETLBENCH_TEST_RAY_CLUSTER"  # env var set on every process of the test cluster, to find strays by pid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((NODE_IP, 0))
        return int(sock.getsockname()[1])


def _node_args() -> list[str]:
    """Flags of one node: loopback address, 1 CPU, a small object store, and its own free ports."""
    return [
        f"--node-ip-address={NODE_IP}",
        "--num-cpus=1",
        "--num-gpus=0",
        f"--object-store-memory={80 * 2**20}",
        "--block",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
    ]


@dataclass
class Cluster:
    """A running test cluster."""

    address: str
    head: subprocess.Popen
    worker: subprocess.Popen
    temp_dir: Path
    env: dict[str, str]


def _wait_for_log(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"ray node did not start ({path}):\n{path.read_text(errors='replace')[-3000:]}")


def _session_pids(sid: int) -> list[int]:
    """Processes of one session: a node started with start_new_session=True and everything it spawned
    (Ray puts its worker processes in process groups of their own, but they stay in the node's session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                    pids.append(int(entry.name))
    return pids


def _kill_node(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a node: SIGTERM its session, then SIGKILL whatever is left of it."""
    if grace > 0:
        for pid in _session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    for pid in _session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _marked_pids(token: str) -> list[int]:
    """Processes started by this test's cluster (they inherit its marker variable)."""
    pids = []
    needle = f"{MARKER}={token}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A head node and a worker node (1 CPU each) on loopback; everything is killed at the end, even on failure."""
    temp_dir = Path(tempfile.mkdtemp(prefix="prt", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    env = dict(os.environ)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        OMP_NUM_THREADS="1",
        PETLBENCH_CACHE=str(temp_dir / "cache"),
        **{MARKER: str(temp_dir)},
    )
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    system_config = json.dumps(
        {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 1000}
    )
    procs: list[subprocess.Popen] = []
    try:
        head_log = temp_dir / "head.log"
        head = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--dashboard-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
                f"--temp-dir={temp_dir}",
                f"--system-config={system_config}",
                *_node_args(),
            ],
            stdout=open(head_log, "w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # noqa: SIM115
        )
        procs.append(head)
        _wait_for_log(head_log, "Ray runtime started", head, timeout=120)
        address = f"{NODE_IP}:{port}"
        worker_log = temp_dir / "worker.log"
        worker = subprocess.Popen(
            [str(RAY), "start", f"--address={address}", *_node_args()],
            stdout=open(worker_log, "w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # noqa: SIM115
        )
        procs.append(worker)
        _wait_for_log(worker_log, "Ray runtime started", worker, timeout=120)
        yield Cluster(address, head, worker, temp_dir, env)
    finally:
        for proc in reversed(procs):
            _kill_node(proc)
        for pid in _marked_pids(str(temp_dir)):  # anything that left its process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _task_processes(sid: int) -> list[int]:
    """Ray worker processes of one node (by session) that are executing a sweep task."""
    found = []
    for pid in _session_pids(sid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_ray_entry"):
                found.append(pid)
    return found


def _records(results: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in results.glob("*/result.json"):
        with contextlib.suppress(json.JSONDecodeError, OSError):
            found[path.parent.name] = json.loads(path.read_text())
    return found


@pytest.mark.slow
def test_ray_sweep_survives_losing_a_worker_node(ray_cluster: Cluster, tmp_path: Path) -> None:
    from petlbench.data.synthetic import generate

    data = generate(tmp_path / "data", n_per_class=14, size=32, num_classes=2, seed=0)
    spec = tmp_path / "ray.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "ray-tiny",
                "methods": ["linear_probe", "bitfit"],
                "datasets": [str(data)],
                "backbones": ["test_vit"],
                "resolutions": [32],
                "seeds": [0, 1],
                "grid": {"lr": [1e-4, 1e-2]},
                "epochs": 6,
                "batch_size": 4,
                "profile": False,
                "max_retries": 3,
            }
        )
    )
    results = tmp_path / "results"
    out = open(tmp_path / "sweep.log", "w")  # noqa: SIM115 - closed below
    sweep = subprocess.Popen(
        [
            str(PETLBENCH),
            "sweep",
            str(spec),
            "--results",
            str(results),
            "--executor",
            "ray",
            "--ray-address",
            ray_cluster.address,
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**ray_cluster.env, "COLUMNS": "160"},
        start_new_session=True,
    )
    try:
        # Wait until the worker node executes a sweep task, let it get going, then kill the whole node.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and sweep.poll() is None and not _task_processes(ray_cluster.worker.pid):
            time.sleep(0.1)
        killed = set(_task_processes(ray_cluster.worker.pid))
        assert killed, (tmp_path / "sweep.log").read_text()[-3000:]
        # Best moment: the task is training (its "running" record written); give up waiting for that after a while.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            r["status"] != FINISHED and r["worker"]["pid"] in killed for r in _records(results).values()
        ):
            time.sleep(0.05)
            killed |= set(_task_processes(ray_cluster.worker.pid))
        _kill_node(ray_cluster.worker, grace=0)  # the node dies at once: raylet, agents and the running task
        lost = {k for k, r in _records(results).items() if r["status"] != FINISHED and r["worker"]["pid"] in killed}
        rc = sweep.wait(timeout=240)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait(timeout=30)
        out.close()
    log = (tmp_path / "sweep.log").read_text()
    assert rc == 0, log[-5000:]
    rows = ResultStore(results).rows()
    ids = [row["run_id"] for row in rows]
    assert len(ids) == len(set(ids)) == 6, ids  # 2 cells x (2 grid points + 1 more seed), each exactly once
    assert all(row["status"] == FINISHED for row in rows), rows
    records = _records(results)
    assert set(records) == set(ids)
    print(f"killed the worker node with {len(lost)} run(s) in training: {sorted(lost)}")
    for run_id in lost:  # runs cut off with their node were redone elsewhere
        assert records[run_id]["status"] == FINISHED and records[run_id]["worker"]["pid"] not in killed
    assert "lost worker" not in log  # retried by Ray, not recorded as failed
