"""GPU power and energy via NVML.

What it measures
----------------
Over a window opened by `start()` and closed by `stop()` (both synchronise CUDA), for the one GPU the run
uses (mapped CUDA index -> NVML handle by UUID, never by index, since NVML ignores
CUDA_VISIBLE_DEVICES):

* `energy_j`: difference of NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ,
  Volta and newer) between the two ends — `energy_source="nvml_energy_counter"`. Without the counter,
  the trapezoid integral of the sampled power over the window — `energy_source="nvml_power_poll"`.
* `power_avg_w` = energy_j / duration_s.
* `power_peak_w`: maximum of the power samples taken every `interval_s` (default 0.1 s) by a daemon
  thread; `power_peak_field` names the reading (NVML's instant field where the driver offers it,
  otherwise `nvmlDeviceGetPowerUsage`, a 1-s average on Ampere and newer except GA100).
* `power_mean_sampled_w` (cross-check of the average), `n_samples`, `max_gap_s`, `interval_s`,
  `gpu_shared` (other processes on the GPU: the board-level numbers are then not this run's alone),
  `process_mem_peak_mb` (NVML per-process memory, MiB, the nvidia-smi figure).

Board power (GPU + memory + circuitry) in W, energy in J. Without an NVIDIA device, when NVML cannot
initialise, under MIG (power is board-level only) or when the handle cannot be found, every numeric
field is None and `reason` says why: never zeros or invented values.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

MIB = 2**20
NUMERIC_FIELDS = (
    "power_peak_w",
    "power_avg_w",
    "power_mean_sampled_w",
    "energy_j",
    "duration_s",
    "n_samples",
    "max_gap_s",
    "process_mem_peak_mb",
)


class NvmlBackendProtocol(Protocol):
    """What the sampler needs from NVML; the real one wraps pynvml, tests inject a scripted fake."""

    power_field: str

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def handle(self, index: int, uuid: str | None) -> Any: ...
    def name(self, handle: Any) -> str: ...
    def power_mw(self, handle: Any) -> float: ...
    def energy_mj(self, handle: Any) -> float | None: ...
    def mig_enabled(self, handle: Any) -> bool: ...
    def processes(self, handle: Any) -> dict[int, int | None]: ...


class NvmlBackend:
    """pynvml (nvidia-ml-py) calls. `handle()` prefers the UUID; `energy_mj` is None when unsupported."""

    def __init__(self) -> None:
        self.power_field = "nvmlDeviceGetPowerUsage"
        self._instant: bool | None = None
        self._nvml: Any = None

    def init(self) -> None:
        import pynvml  # the module of nvidia-ml-py, NVIDIA's own binding

        self._nvml = pynvml
        pynvml.nvmlInit()

    def shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down is best effort
                pass

    def handle(self, index: int, uuid: str | None) -> Any:
        if uuid:
            return self._nvml.nvmlDeviceGetHandleByUUID(uuid)
        return self._nvml.nvmlDeviceGetHandleByIndex(index)

    def name(self, handle: Any) -> str:
        name = self._nvml.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def power_mw(self, handle: Any) -> float:
        nvml = self._nvml
        if self._instant is not False and hasattr(nvml, "NVML_FI_DEV_POWER_INSTANT"):
            try:
                value = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
                if value.nvmlReturn == nvml.NVML_SUCCESS:
                    self._instant = True
                    self.power_field = "NVML_FI_DEV_POWER_INSTANT"
                    return float(value.value.uiVal)
            except Exception:  # noqa: BLE001 - fall back to the classic reading
                pass
            self._instant = False
        self.power_field = "nvmlDeviceGetPowerUsage"
        return float(nvml.nvmlDeviceGetPowerUsage(handle))

    def energy_mj(self, handle: Any) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception:  # noqa: BLE001 - NOT_SUPPORTED before Volta
            return None

    def mig_enabled(self, handle: Any) -> bool:
        try:
            current, _ = self._nvml.nvmlDeviceGetMigMode(handle)
            return bool(current == getattr(self._nvml, "NVML_DEVICE_MIG_ENABLE", 1))
        except Exception:  # noqa: BLE001 - GPUs without MIG raise NOT_SUPPORTED
            return False

    def processes(self, handle: Any) -> dict[int, int | None]:
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # noqa: BLE001
            return {}
        return {int(p.pid): (int(p.usedGpuMemory) if p.usedGpuMemory is not None else None) for p in procs}


def unavailable_power(reason: str, interval_s: float | None = None, device_index: int | None = None) -> dict[str, Any]:
    """A power record with every measured field None and the reason."""
    record: dict[str, Any] = {field: None for field in NUMERIC_FIELDS}
    record.update(
        {
            "energy_source": None,
            "power_peak_field": None,
            "interval_s": interval_s,
            "device_index": device_index,
            "device_name": None,
            "gpu_uuid": None,
            "gpu_shared": None,
            "avg_le_peak": None,
            "reason": reason,
            "available": False,
        }
    )
    return record


def cuda_uuid(index: int) -> str | None:
    """NVML-style UUID ("GPU-...") of CUDA device `index`, or None without CUDA."""
    try:
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    except Exception:  # noqa: BLE001
        return None
    return None


class PowerSampler:
    """Samples one GPU's power in a background thread and reads its energy counter at both ends.

    Use as a context manager or with `start()` / `stop() -> dict`. `nvml` injects a backend (tests);
    `uuid` overrides the CUDA->NVML mapping; `clock` and `sync` are injectable; `background=False`
    leaves sampling to explicit `sample()` calls (tests with a virtual clock).
    """

    def __init__(
        self,
        device_index: int = 0,
        interval_s: float = 0.1,
        nvml: NvmlBackendProtocol | None = None,
        uuid: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sync: Callable[[], None] | None = None,
        background: bool = True,
        pid: int | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.device_index = int(device_index)
        self.interval_s = float(interval_s)
        self.backend = nvml
        self.uuid = uuid
        self.clock = clock
        self.sync = sync if sync is not None else self._default_sync
        self.background = background
        self.pid = os.getpid() if pid is None else pid
        self.reason: str | None = None
        self.samples: list[tuple[float, float, int | None]] = []
        self.result: dict[str, Any] | None = None
        self._handle: Any = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._started = False

    def _default_sync(self) -> None:
        if torch.cuda.is_available() and self.device_index < torch.cuda.device_count():
            torch.cuda.synchronize(self.device_index)

    def _nvml(self) -> NvmlBackendProtocol:
        """The NVML backend `start()` opened."""
        if self.backend is None:
            raise RuntimeError("PowerSampler: NVML backend used before start()")
        return self.backend

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> PowerSampler:
        """Open the window: init NVML, find the GPU, read the energy counter, start sampling."""
        self._started = True
        if self.backend is None:
            self.backend = NvmlBackend()
        try:
            self.backend.init()
        except Exception as error:  # noqa: BLE001 - library missing, driver not loaded, ...
            self.reason = f"NVML unavailable: {type(error).__name__}: {error}"
            return self
        uuid = self.uuid or cuda_uuid(self.device_index)
        self.mapping = "uuid" if uuid else "index (no CUDA UUID available)"
        try:
            self._handle = self.backend.handle(self.device_index, uuid)
            self.device_name = self.backend.name(self._handle)
        except Exception as error:  # noqa: BLE001
            self.reason = f"NVML has no device {uuid or self.device_index}: {type(error).__name__}: {error}"
            return self
        self.gpu_uuid = uuid
        if self.backend.mig_enabled(self._handle):
            self.reason = "MIG: board-level only (power and energy belong to the physical GPU, not the instance)"
            return self
        self._others_at_start = self._other_pids()
        self.sync()
        self.e0 = self.backend.energy_mj(self._handle)
        self.t0 = self.clock()
        self.sample()
        if self.background:
            self._thread = threading.Thread(target=self._run, name="petlbench-power", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a failed read loses one sample, never the run
                continue

    def sample(self) -> None:
        """Take one (time, power mW, process memory bytes) sample."""
        if self._handle is None or self.reason is not None:
            return
        t = self.clock()
        backend = self._nvml()
        power = backend.power_mw(self._handle)
        memory = backend.processes(self._handle).get(self.pid)
        with self._lock:
            self.samples.append((t, float(power), memory))

    def stop(self) -> dict[str, Any]:
        """Close the window and return the power record (see the module docstring)."""
        if self.result is not None:
            return self.result
        if not self._started:
            raise RuntimeError("stop() without start()")
        if self.reason is not None:
            self.result = unavailable_power(self.reason, self.interval_s, self.device_index)
            self._shutdown()
            return self.result
        self.sync()
        t1 = self.clock()
        e1 = self._nvml().energy_mj(self._handle)
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1.0)
        try:
            self.sample()
        except Exception:  # noqa: BLE001
            pass
        others = self._others_at_start | self._other_pids()
        self.result = self._summarise(t1, e1, others)
        self._shutdown()
        return self.result

    def _shutdown(self) -> None:
        if self.backend is not None:
            try:
                self.backend.shutdown()
            except Exception:  # noqa: BLE001
                pass

    def _other_pids(self) -> set[int]:
        return {pid for pid in self._nvml().processes(self._handle) if pid != self.pid}

    def _summarise(self, t1: float, e1: float | None, others: set[int]) -> dict[str, Any]:
        with self._lock:
            samples = sorted(self.samples)
        duration = t1 - self.t0
        watts = [p / 1000.0 for _, p, _ in samples]
        times = [t for t, _, _ in samples]
        if self.e0 is not None and e1 is not None:
            energy = (e1 - self.e0) / 1000.0
            source = "nvml_energy_counter"
        elif len(samples) >= 2:
            energy = sum((watts[i] + watts[i + 1]) / 2.0 * (times[i + 1] - times[i]) for i in range(len(samples) - 1))
            source = "nvml_power_poll (trapezoid integral of the samples)"
        else:
            energy, source = None, None
        mems = [m for _, _, m in samples if m is not None]
        avg = energy / duration if energy is not None and duration > 0 else None
        peak = max(watts) if watts else None
        record: dict[str, Any] = {
            "power_peak_w": peak,
            "power_avg_w": avg,
            "power_mean_sampled_w": sum(watts) / len(watts) if watts else None,
            "energy_j": energy,
            "duration_s": duration,
            "n_samples": len(samples),
            "max_gap_s": max((b - a for a, b in zip(times, times[1:], strict=False)), default=None),
            "process_mem_peak_mb": max(mems) / MIB if mems else None,
            "energy_source": source,
            "power_peak_field": getattr(self.backend, "power_field", None),
            "interval_s": self.interval_s,
            "device_index": self.device_index,
            "device_name": getattr(self, "device_name", None),
            "gpu_uuid": getattr(self, "gpu_uuid", None),
            "gpu_mapping": getattr(self, "mapping", None),
            "gpu_shared": bool(others),
            "avg_le_peak": (avg <= peak * 1.0001) if avg is not None and peak is not None else None,
            "reason": None,
            "available": True,
        }
        return record
