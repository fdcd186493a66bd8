"""Profilers: peak training memory (measured on CUDA, estimated anywhere), FLOPs with attention counted,
throughput and time, NVML power and energy. Each module's docstring
defines exactly what its numbers measure.

Trainer integration (see `run_efficiency`, `StepTimer`, `PowerSampler`, `reset_cuda_peak`, `read_cuda_peak`).
"""

from petlbench.engine.step import make_optimizer, train_step
from petlbench.profiling.flops import (
    EXTRA_HANDLES,
    FLOPS_RULE,
    FLOPS_UNIT,
    UncountedMatmulError,
    flop_count_analysis,
    flop_counter,
    fvcore_forward,
    sdpa_flop_jit,
    torch_flops,
    torch_forward,
)
from petlbench.profiling.memory_cuda import (
    cpu_profiler_peak,
    measure_cuda_step_peak,
    nvml_process_memory,
    read_cuda_peak,
    reset_cuda_peak,
)
from petlbench.profiling.memory_estimate import (
    CATEGORIES,
    MEM_UNIT,
    LiveStorageTracker,
    MemoryEstimate,
    estimate_model_memory,
    estimate_training_memory,
)
from petlbench.profiling.models import batch_spec, build_meta, meta_clone
from petlbench.profiling.power import NvmlBackend, PowerSampler, unavailable_power
from petlbench.profiling.profile import (
    forward_flops,
    measure_method,
    memory_sweep,
    parse_mem,
    profile_methods,
    run_bench,
    run_efficiency,
)
from petlbench.profiling.timing import StepTimer, Stopwatch, measure_steps

__all__ = [
    "CATEGORIES",
    "EXTRA_HANDLES",
    "FLOPS_RULE",
    "FLOPS_UNIT",
    "MEM_UNIT",
    "LiveStorageTracker",
    "MemoryEstimate",
    "NvmlBackend",
    "PowerSampler",
    "StepTimer",
    "Stopwatch",
    "UncountedMatmulError",
    "batch_spec",
    "build_meta",
    "cpu_profiler_peak",
    "estimate_model_memory",
    "estimate_training_memory",
    "flop_count_analysis",
    "flop_counter",
    "forward_flops",
    "fvcore_forward",
    "make_optimizer",
    "measure_cuda_step_peak",
    "measure_method",
    "measure_steps",
    "memory_sweep",
    "meta_clone",
    "nvml_process_memory",
    "parse_mem",
    "profile_methods",
    "read_cuda_peak",
    "reset_cuda_peak",
    "run_bench",
    "run_efficiency",
    "sdpa_flop_jit",
    "torch_flops",
    "torch_forward",
    "train_step",
    "unavailable_power",
]
