"""Peak training memory without a GPU: the real training step run on fake tensors (profiling.md §2).

What it measures
----------------
The peak, over one steady-state training step (forward, loss, backward, clipping, AdamW step,
`zero_grad(set_to_none=True)`, after the optimizer state exists), of the bytes held by live tensor
storages on the device. That is the number `torch.cuda.max_memory_allocated()` reports for the same
step, minus what a dispatch-level view cannot see (CUDA context, cuBLAS/cuDNN workspaces, buffers
allocated inside fused kernels, allocator caching; profiling.md §2.5). It is an **estimate**, labelled
as such in every record.

How
---
The model is built on the meta device and its parameters are swapped for `FakeTensor`s (no data, no
allocation). Inside `FakeTensorMode`, a `LiveStorageTracker` (a `TorchDispatchMode`) sees every ATen
op's outputs; each new `UntypedStorage` adds its size, rounded up to 512 bytes for a CUDA target (the
caching allocator's block size), to a running total, and a `weakref.finalize` on the storage subtracts
it when autograd, the optimizer or the step drops the last reference. Storages are keyed by the storage
object (a `WeakIdKeyDictionary`), never by `id()`, which is reused after a free.

Two engines give byte-identical results (tested for every registered method): `engine="fake"` (the
reference) runs everything on fake tensors; `engine="meta"` (default, ~3x faster) runs forward, loss,
backward and clipping on the meta tensors themselves, with fused attention routed to the kernel a CPU
tensor would pick, and takes the optimizer's state and temporaries from a fake-tensor optimizer step on
the same parameter shapes (memoised across calls). With `warmup="prime"` (the default), the measured
step's `optimizer.step()` is replaced by a stub that records the live bytes; the step's peak inside the
optimizer is those bytes plus the temporaries the primed step allocated over its own steady live set
(identical shapes, identical temporaries). The meta engine also memoises, in the process, the outputs of
side-effect-free ATen ops by the op and its arguments' metadata (`_memo_meta_call`; a ViT repeats every block's
shapes): the tracker sees the same fresh storages, sizes and order as without it (tested), in far less time.

Breakdown at the peak (bytes, summing to the peak): `parameters` (device-resident, trainable and
frozen), `buffers`, `gradients` (labelled by a post-accumulate-grad hook), `optimizer_state` (AdamW
`exp_avg`/`exp_avg_sq`, relabelled after each step), `optimizer_temporaries` (allocations made inside
`optimizer.step()`), `method_state` (what a method's `after_optimizer_step` keeps, e.g. AdaLoRA's importance
scores), `inputs` (views + labels), `preloaded_features` (FPT/FPT+ key/value batches) and
`activations` (everything else: saved activations and transient temporaries).

Memory kinds (`mem_kinds` in the record; profiling.md §2): `est_peak_mem_mb` is **allocated** memory, the above.
`est_reserved_mem_mb` is **reserved** memory: for `target="cuda"`, the tracker logs every allocation and free it
counts (parameters, buffers, inputs, activations, gradients, optimizer state and temporaries, in replay order) and
the log is replayed through `allocator.CachingAllocatorSim`, a simulation of PyTorch's CUDA caching allocator
(512-byte rounding, 2 MiB small-pool and 20 MiB / 2 MiB-rounded large-pool segments, best fit, splitting,
coalescing, segments never released); its peak reserved bytes are what `torch.cuda.max_memory_reserved()` would
show after the measured step. Reserved memory depends on the whole history, so it is replayed as a real run has it:
`warmup="full"` as logged (setup, first step, measured step); `warmup="prime"` as setup, then the measured step
twice, the first time with the primed `optimizer.step()`'s own events (state created, temporaries) where the step
calls it, the second time with only its temporaries (allocations it makes and frees); the priming itself, which a
real run never does, is left out. Both give the same reserved bytes (tested).
`est_device_mem_mb` is **device** memory (what nvidia-smi shows): reserved plus the CUDA context, a per-GPU constant
that only a measurement gives (`allocator.CUDA_CONTEXT_MB`); None with `est_device_mem_reason` until measured.

Warm-up: `warmup="full"` runs the whole step twice and reports the second (the first creates the
optimizer state; its peak is kept as `first_step_peak_bytes`). `warmup="prime"` creates the optimizer
state by one `optimizer.step()` on zero gradients instead of a full first step, then runs the measured
step: the optimizer state is the only thing a first step leaves behind for the default methods, so the
steady-state peak is the same and the estimate takes half the time; `after_optimizer_step(0)` is also
run once on zero gradients so that state a method builds lazily (AdaLoRA's importance scores) exists, as
after a real first step. Both modes give byte-identical results (tested for every registered method).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from petlbench.backbones.attention import set_attention
from petlbench.core.method import BackboneSpec, Method
from petlbench.engine.step import MakeOptimizer, TrainStep, make_optimizer, train_step
from petlbench.profiling.allocator import CachingAllocatorSim, Event, device_memory_mb, transient_events
from petlbench.profiling.flops import flop_counter
from petlbench.profiling.models import (
    BatchSpec,
    batch_spec,
    build_meta,
    fakeify,
    make_context,
    resident_tensor_ids,
)

MIB = 2**20
MEM_KINDS = {
    "est_peak_mem_mb": "allocated",
    "est_reserved_mem_mb": "reserved (simulated caching allocator)",
    "est_device_mem_mb": "device = reserved + CUDA context",
}
MEM_UNIT = "MiB (2^20 bytes)"
CUDA_BLOCK = 512
ACTIVATIONS = "activations"
CATEGORIES = (
    "parameters",
    "buffers",
    "gradients",
    "optimizer_state",
    "optimizer_temporaries",
    "method_state",
    "inputs",
    "preloaded_features",
    ACTIVATIONS,
)


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class LiveStorageTracker(TorchDispatchMode):
    """Running total of live tensor-storage bytes with a labelled breakdown and its peak.

    Use it *inside* a FakeTensorMode (enter the fake mode first) or on real tensors. `track(t, cat)`
    registers tensors created outside the mode (parameters, the batch); every op output is tracked
    automatically under `default_category`.
    """

    def __init__(self, round_to: int = CUDA_BLOCK) -> None:
        super().__init__()
        self.round_to = max(1, int(round_to))
        self._serial: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._info: dict[int, list[Any]] = {}
        self._next = 0
        self.current = 0
        self.peak = 0
        self.totals: dict[str, int] = defaultdict(int)
        self.peak_totals: dict[str, int] = {}
        self.default_category = ACTIVATIONS
        self.in_optimizer = False
        self.peak_phase = "none"
        self.closed = False
        self.untracked_bytes = 0
        self.host_scalars = False
        # for the reserved-memory replay: when a list, every counted allocation and free is appended as
        # ("malloc", serial, unrounded nbytes) / ("free", serial, 0); `_prime_optimizer` notes its step's slice
        self.event_log: list[Event] | None = None
        self.step_window: tuple[int, int] | None = None
        # meta engine: side-effect-free ops' outputs come from `_memo_meta_call` (identical storages, faster)
        self.memo_meta_ops = False

    def _rounded(self, nbytes: int) -> int:
        r = self.round_to
        return -(-nbytes // r) * r if r > 1 else nbytes

    def _phase(self) -> str:
        if self.in_optimizer:
            return "optimizer"
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def track(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Count `tensor`'s storage if it is new (views, in-place results and aliases add nothing)."""
        storage = _storage(tensor)
        if storage is None or storage in self._serial:
            return
        if self.in_optimizer and self.host_scalars and tensor.dim() == 0 and category is None:
            return  # AdamW's non-capturable `step` counters live on the host (see _attach_optimizer_hooks)
        raw = int(storage.nbytes())
        nbytes = self._rounded(raw)
        serial = self._next
        self._next += 1
        cat = category or self.default_category
        self._serial[storage] = serial
        self._info[serial] = [nbytes, cat]
        weakref.finalize(storage, self._free, serial)
        if self.event_log is not None:
            self.event_log.append(("malloc", serial, raw))
        self.current += nbytes
        self.totals[cat] += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_totals = dict(self.totals)
            self.peak_phase = self._phase()

    def relabel(self, tensor: torch.Tensor | None, category: str) -> None:
        """Move a tracked storage to another category (grads, optimizer state)."""
        if tensor is None:
            return
        storage = _storage(tensor)
        serial = self._serial.get(storage) if storage is not None else None
        if serial is None:
            self.track(tensor, category)
            return
        info = self._info[serial]
        self.totals[info[1]] -= info[0]
        self.totals[category] += info[0]
        info[1] = category

    def untrack(self, tensor: torch.Tensor) -> None:
        """Stop counting a storage (it lives off the device, e.g. AdamW's host-side `step` counters)."""
        storage = _storage(tensor)
        serial = self._serial.get(storage) if storage is not None else None
        if serial is not None and serial in self._info:
            self.untracked_bytes += self._info[serial][0]
            self._free(serial)

    def _free(self, serial: int) -> None:
        info = self._info.pop(serial, None)
        if info is None or self.closed:
            return
        self.current -= info[0]
        self.totals[info[1]] -= info[0]
        if self.event_log is not None:
            self.event_log.append(("free", serial, 0))

    def reset_peak(self) -> None:
        """Start a new peak window at the current live total."""
        self.peak = self.current
        self.peak_totals = dict(self.totals)
        self.peak_phase = "start"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = _memo_meta_call(func, args, kwargs) if self.memo_meta_ops else func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


# Output templates of side-effect-free ATen ops on meta tensors, keyed by the op and its arguments' metadata; None
# marks a key whose outputs cannot be rebuilt from metadata alone. The meta engine runs most ops through Python meta
# kernels (torch._refs), which dominate an estimate's time although a ViT repeats the same shapes in every block.
_META_OP_MEMO: dict[tuple[Any, ...], tuple[Any, list[Any]] | None] = {}
_META_OP_MEMO_MAX = 200_000
_PURE_OPS: dict[Any, bool] = {}
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)
_PLAIN = (torch.Tensor, nn.Parameter)


class _NoKey(Exception):
    """An argument the op memo cannot key on (a non-meta tensor, a tensor subclass, an unknown type)."""


@dataclass(frozen=True)
class _TensorTemplate:
    """A fresh meta tensor's metadata (its storage is exactly what `torch.empty_strided` gives)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _arg_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if type(value) not in _PLAIN or not value.is_meta or value.layout != torch.strided:
            raise _NoKey
        return (value.shape, value.stride(), value.storage_offset(), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_arg_key(v) for v in value))
    if isinstance(value, _SCALARS):
        return (type(value), value)  # 1, 1.0 and True compare equal but are different arguments
    raise _NoKey


def _pure(func: Any) -> bool:
    known = _PURE_OPS.get(func)
    if known is None:
        schema = getattr(func, "_schema", None)
        known = (
            schema is not None
            and not schema.is_mutable
            and all(r.alias_info is None for r in schema.returns)
            and all(a.alias_info is None for a in schema.arguments)
        )
        _PURE_OPS[func] = known
    return known


def _storage_id(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def _template(out: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, list[Any]] | None:
    """`out` as a template that rebuilds outputs with identical metadata and storage sizes, or None if it cannot:
    an output aliasing an input or another output, an offset or oversized storage, a non-meta or flagged tensor."""
    leaves, spec = tree_flatten(out)
    seen = {_storage_id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    template: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if type(leaf) is not torch.Tensor or not leaf.is_meta or leaf.layout != torch.strided:
                return None
            if leaf.storage_offset() or leaf.requires_grad or leaf.is_conj() or leaf.is_neg():
                return None
            sid = _storage_id(leaf)
            if sid in seen:
                return None
            seen.add(sid)
            item = _TensorTemplate(tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype)
            replica = torch.empty_strided(item.shape, item.stride, dtype=item.dtype, device="meta")
            if replica.untyped_storage().nbytes() != leaf.untyped_storage().nbytes():
                return None
            template.append(item)
        elif leaf is None or type(leaf) in (int, float, bool):
            template.append(leaf)
        else:
            return None
    return spec, template


def _memo_meta_call(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """`func(*args, **kwargs)` for an op on meta tensors, its outputs rebuilt from a memoised template when the same
    op has run on arguments of the same metadata: a side-effect-free op's meta outputs are fresh tensors whose
    metadata depends only on its arguments' metadata, so the tracker sees the same storages, sizes and order."""
    if not _pure(func):
        return func(*args, **kwargs)
    try:
        key = (func, _arg_key(args), tuple((k, _arg_key(v)) for k, v in kwargs.items()))
    except _NoKey:
        return func(*args, **kwargs)
    if key not in _META_OP_MEMO:
        out = func(*args, **kwargs)
        if len(_META_OP_MEMO) >= _META_OP_MEMO_MAX:
            _META_OP_MEMO.clear()
        _META_OP_MEMO[key] = _template(out, args, kwargs)
        return out
    template = _META_OP_MEMO[key]
    if template is None:
        return func(*args, **kwargs)
    spec, leaves = template
    outs = [
        torch.empty_strided(t.shape, t.stride, dtype=t.dtype, device="meta") if isinstance(t, _TensorTemplate) else t
        for t in leaves
    ]
    return tree_unflatten(outs, spec)


def clear_memos() -> None:
    """Forget the meta-op templates and the optimizer primings (memory only: results do not depend on them)."""
    _META_OP_MEMO.clear()
    _PRIME_MEMO.clear()


@dataclass
class MemoryEstimate:
    """Result of one estimate; `to_dict()` gives the JSON record (MiB fields carry `_mb`)."""

    peak_bytes: int
    breakdown_bytes: dict[str, int]
    step_start_bytes: int
    first_step_peak_bytes: int | None
    peak_phase: str
    attention: str
    target: str
    round_to: int
    optimizer: str
    warmup: str
    batch_source: str
    batch_shapes: dict[str, list[int]]
    placement: str
    build: str = "meta"
    engine: str = "meta"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    train_flops: dict[str, int] | None = None  # FlopCounterMode counts of the measured step (2 per MAC)
    reserved_peak_bytes: int | None = None  # simulated caching allocator's peak reserved bytes (target="cuda")
    gpu: str | None = None  # GPU the device-level estimate is for (a key of allocator.CUDA_CONTEXT_MB); None: unknown

    @property
    def step_peak_increase_bytes(self) -> int:
        """Peak minus the bytes live when the measured step started (what a CPU profiler sees)."""
        return self.peak_bytes - self.step_start_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly record."""
        device_mb, device_reason = device_memory_mb(self.reserved_peak_bytes, self.gpu)
        return {
            "est_peak_mem_mb": self.peak_bytes / MIB,
            "est_reserved_mem_mb": (self.reserved_peak_bytes / MIB if self.reserved_peak_bytes is not None else None),
            "est_device_mem_mb": device_mb,
            "est_device_mem_reason": device_reason,
            "mem_kinds": dict(MEM_KINDS),
            "est_breakdown_mb": {k: self.breakdown_bytes.get(k, 0) / MIB for k in CATEGORIES},
            "est_first_step_peak_mem_mb": (
                self.first_step_peak_bytes / MIB if self.first_step_peak_bytes is not None else None
            ),
            "est_peak_phase": self.peak_phase,
            "est_peak_bytes": self.peak_bytes,
            "mem_unit": MEM_UNIT,
            "mem_kind": "estimate (data-less replay of the training step on meta/fake tensors; "
            "no CUDA context or workspaces)",
            "attention": self.attention,
            "est_target": self.target,
            "est_round_to_bytes": self.round_to,
            "est_optimizer": self.optimizer,
            "est_warmup": self.warmup,
            "batch_source": self.batch_source,
            "batch_shapes": self.batch_shapes,
            "est_placement": self.placement,
            "est_build": self.build,
            "est_engine": self.engine,
            "est_notes": list(self.notes),
            "est_seconds": self.seconds,
        }


def _distinct(params: Any) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    getter = getattr(model, "trainable_parameters", None)
    params = getter() if callable(getter) else [p for p in model.parameters() if p.requires_grad]
    return _distinct(params)


class _ForwardSplit:
    """Reads a FlopCounterMode's running total when the root forward starts and ends."""

    def __init__(self, model: nn.Module, counter: Any) -> None:
        self.counter = counter
        self.start = self.end = None
        self.handles = [
            model.register_forward_pre_hook(self._pre),
            model.register_forward_hook(self._post),
        ]

    def _pre(self, *_: Any) -> None:
        if self.start is None:
            self.start = self.counter.get_total_flops()

    def _post(self, *_: Any) -> None:
        self.end = self.counter.get_total_flops()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _MetaSDPA(TorchFunctionMode):
    """On meta tensors, run `F.scaled_dot_product_attention` through the kernel the CPU would pick.

    The meta device has no fused-attention selector, so its composite falls back to the math path
    (which materialises the attention map). This mode asks `torch._fused_sdp_choice` what a CPU tensor
    of the same rank, dtype and flags would use and, for flash, calls
    `aten._scaled_dot_product_flash_attention_for_cpu` directly: the same op (and saved tensors) a
    fake-tensor CPU run records.
    """

    def __init__(self) -> None:
        super().__init__()
        self._choice: dict[tuple[Any, ...], int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].is_meta:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
            causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
            scale = args[6] if len(args) > 6 else kwargs.get("scale")
            gqa = args[7] if len(args) > 7 else kwargs.get("enable_gqa", False)
            if self._cpu_choice(q, k, v, mask, dropout, causal, gqa) == SDPBackend.FLASH_ATTENTION.value:
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, dropout, causal, attn_mask=mask, scale=scale
                )[0]
        return func(*args, **kwargs)

    def _cpu_choice(self, q, k, v, mask, dropout, causal, gqa) -> int:  # noqa: ANN001
        key = (
            tuple(t.dim() for t in (q, k, v)),
            q.dtype,
            tuple(t.requires_grad for t in (q, k, v)),
            None if mask is None else (mask.dim(), mask.dtype),
            float(dropout),
            bool(causal),
            bool(gqa),
            q.shape[-1],
            v.shape[-1],
        )
        if key not in self._choice:

            def small(t: torch.Tensor) -> torch.Tensor:
                shape = [min(int(n), 4) for n in t.shape[:-1]] + [int(t.shape[-1])]
                return torch.zeros(shape, dtype=t.dtype, requires_grad=t.requires_grad)

            # the probe's small CPU tensors are no part of the step: hidden from the tracker (and the allocator sim)
            with _disable_current_modes():
                with torch.no_grad():
                    sq, sk, sv = small(q), small(k), small(v)
                    for t in (sq, sk, sv):
                        t.requires_grad_(bool(t.requires_grad))
                    smask = (
                        None if mask is None else torch.zeros([min(int(n), 4) for n in mask.shape], dtype=mask.dtype)
                    )
                self._choice[key] = int(
                    torch._fused_sdp_choice(sq, sk, sv, smask, float(dropout), bool(causal), enable_gqa=bool(gqa))
                )
        return self._choice[key]


# Optimizer priming results, keyed by the trainable shapes and the optimizer configuration (see `_prime_on_stand_ins`).
StateSpec = list[list[tuple[str, tuple[int, ...], tuple[int, ...], torch.dtype, bool]]]


@dataclass
class PrimeLog:
    """The allocation events of a primed (first) `optimizer.step()`: state created and temporaries, in order."""

    step_events: list[Event]

    def temporaries(self) -> list[Event]:
        """What the step allocates and frees itself, in order: a steady-state step's temporaries."""
        return transient_events(self.step_events, 0, len(self.step_events))


_PRIME_MEMO: dict[tuple[Any, ...], tuple[int, StateSpec, PrimeLog]] = {}


def _prime_on_stand_ins(
    params: list[nn.Parameter],
    make_opt: MakeOptimizer,
    foreach: bool,
    target: str,
    round_to: int,
    stand_ins: Callable[[], contextlib.AbstractContextManager[Any]] = lambda: torch.device("meta"),
) -> tuple[int, StateSpec, PrimeLog]:
    """Run the optimizer's first step on meta-device stand-ins of `params` (zero gradients).

    Returns (the step's transient bytes over its steady-state live set, per parameter the state tensors it
    created as (key, shape, stride, dtype, on_device), and the priming's allocation events for the allocator
    simulation). Optimizer state and temporaries depend only on the parameters' shapes and dtypes, so results
    are memoised on them. `stand_ins` is the context the stand-ins live in (meta device; tests compare it with
    FakeTensorMode's).
    """
    key = (
        tuple((tuple(p.shape), tuple(p.stride()), p.dtype) for p in params),
        getattr(make_opt, "__qualname__", repr(make_opt)),
        foreach,
        target,
        round_to,
    )
    if key in _PRIME_MEMO:
        return _PRIME_MEMO[key]
    # Meta tensors, not FakeTensorMode: the same ops, shapes and allocation events (the tests compare the two) in a
    # third of the time, which the planner pays once per parameter-shape set (every resolution, for a trainable
    # position table).
    with stand_ins():
        stand_in_params = [
            nn.Parameter(torch.empty_strided(tuple(p.shape), tuple(p.stride()), dtype=p.dtype), requires_grad=True)
            for p in params
        ]
        optimizer = make_opt(stand_in_params, foreach=foreach)
        tracker = LiveStorageTracker(round_to)
        _attach_optimizer_hooks(optimizer, tracker, target)
        with tracker:
            for p in stand_in_params:
                tracker.track(p, "parameters")
            tracker.event_log = []
            increase = _prime_optimizer(optimizer, stand_in_params, tracker)
            log = _take_prime_log(tracker)
            tracker.event_log = None
        tracker.closed = True
        states = []
        device_step = _device_step(optimizer)
        for p in stand_in_params:
            entries = []
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    on_device = not (name == "step" and target == "cuda" and value.dim() == 0 and not device_step)
                    entries.append((name, tuple(value.shape), tuple(value.stride()), value.dtype, on_device))
            states.append(entries)
    _PRIME_MEMO[key] = (increase, states, log)
    return increase, states, log


def _take_prime_log(tracker: LiveStorageTracker) -> PrimeLog:
    """The events of the `optimizer.step()` of the last `_prime_optimizer` call on `tracker` (needs its event log)."""
    start, stop = tracker.step_window or (0, 0)
    tracker.step_window = None
    return PrimeLog(list((tracker.event_log or [])[start:stop]))


def _attach_optimizer_hooks(optimizer: torch.optim.Optimizer, tracker: LiveStorageTracker, target: str) -> list[Any]:
    """Label allocations inside `optimizer.step()` as temporaries and, after it, its state as state."""

    def enter(*_: Any) -> None:
        tracker.in_optimizer = True
        tracker.default_category = "optimizer_temporaries"
        # Predicting a CUDA run: scalars created inside a non-capturable, non-fused step (AdamW's `step`
        # counters) are host tensors and never reach the device.
        tracker.host_scalars = target == "cuda" and not _device_step(optimizer)

    def leave(*_: Any) -> None:
        tracker.in_optimizer = False
        tracker.default_category = ACTIVATIONS
        for state in optimizer.state.values():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step" and target == "cuda" and value.dim() == 0 and not _device_step(optimizer):
                    tracker.untrack(value)  # AdamW keeps non-capturable step counters on the host
                else:
                    tracker.relabel(value, "optimizer_state")

    return [optimizer.register_step_pre_hook(enter), optimizer.register_step_post_hook(leave)]


def estimate_model_memory(
    model: nn.Module,
    spec: BatchSpec,
    *,
    attention: str = "auto",
    target: str = "cuda",
    round_to: int | None = None,
    optimizer_foreach: bool | None = None,
    warmup: str = "prime",
    engine: str = "meta",
    train_step_fn: TrainStep | None = None,
    make_optimizer_fn: MakeOptimizer | None = None,
    count_flops: bool = False,
    resident: set[int] | None = None,
    placement: str = "",
    build: str = "meta",
    notes: list[str] | None = None,
) -> MemoryEstimate:
    """Estimate the steady-state peak of one training step of a **meta-device** `model`.

    Pass a throwaway instance: the model is switched to the requested attention and, with
    `engine="fake"`, its tensors are replaced by fakes.

    * `target="cuda"` predicts a CUDA run (512-byte blocks, AdamW `foreach=True`, host-side `step`
      counters not counted); `target="cpu"` models the CPU run (no rounding, for-loop AdamW).
    * `engine="fake"` (the reference) runs the whole step on `FakeTensor`s; `engine="meta"` runs forward,
      loss, backward and clipping on the meta tensors themselves (C++ meta kernels, several times
      faster), with fused attention routed to the kernel a CPU tensor would use (`_MetaSDPA`), and takes
      the optimizer's state and temporaries from a fake-tensor priming step on the same parameter shapes
      (memoised). Both give byte-identical peaks (tested); `engine="meta"` requires `warmup="prime"`.
    * `resident` = ids of the meta tensors `place()` keeps on the device (default: `resident_tensor_ids`).
    * `count_flops`: the measured step also runs under `FlopCounterMode`; `train_flops` holds its
      forward/backward totals (torch convention, 2 FLOPs per multiply-add).
    """
    if target not in ("cuda", "cpu"):
        raise ValueError(f"target must be cuda or cpu, not {target!r}")
    if warmup not in ("full", "prime"):
        raise ValueError(f"warmup must be full or prime, not {warmup!r}")
    if engine not in ("meta", "fake"):
        raise ValueError(f"engine must be meta or fake, not {engine!r}")
    if engine == "meta" and warmup != "prime":
        raise ValueError("engine='meta' needs warmup='prime' (the optimizer cannot step on meta tensors)")
    started = time.perf_counter()
    notes = list(notes or []) + list(spec.notes)
    if resident is None:
        resident, placement = resident_tensor_ids(model)
    round_to = (CUDA_BLOCK if target == "cuda" else 1) if round_to is None else round_to
    foreach = (target == "cuda") if optimizer_foreach is None else optimizer_foreach
    step_fn = train_step_fn or train_step
    make_opt = make_optimizer_fn or make_optimizer
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    resident_names = {name for name, t in named if id(t) in resident}

    if engine == "fake":
        mode: Any = FakeTensorMode()
        fakeify(model, mode)
        device = "cpu"
    else:
        mode = _MetaSDPA()
        device = "meta"
    used_attention = set_attention(model, attention)
    tracker = LiveStorageTracker(round_to)
    tracker.memo_meta_ops = engine == "meta"
    if target == "cuda":
        tracker.event_log = []
    marks: dict[str, int] = {}
    prime_log: PrimeLog | None = None
    first_peak: int | None = None
    flops: dict[str, int] | None = None
    at_step: dict[str, Any] = {}
    with mode:
        model.train()
        params = _trainable(model)
        optimizer = make_opt(params, foreach=foreach)
        if engine == "meta":  # outside the tracker: the priming's own tensors are not the step's
            primed = _prime_on_stand_ins(params, make_opt, foreach, target, round_to)
        handles = [p.register_post_accumulate_grad_hook(lambda p: tracker.relabel(p.grad, "gradients")) for p in params]
        if engine == "fake":
            handles += _attach_optimizer_hooks(optimizer, tracker, target)
        method_hook = _label_method_hook(model, tracker)
        with tracker:
            for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
                if name in resident_names:
                    tracker.track(t, "parameters" if isinstance(t, nn.Parameter) else "buffers")
            batch = spec.materialize(device)
            for key, (_, _, category) in spec.entries.items():
                tracker.relabel(batch[key], category)
            state_replicas: list[torch.Tensor] = []
            optimizer_increase: int | None = None
            marks["prime_start"] = _log_len(tracker)
            if warmup == "full":
                tracker.reset_peak()
                step_fn(model, batch, optimizer, global_step=0)
                first_peak = tracker.peak
            elif engine == "fake":
                optimizer_increase = _prime_optimizer(optimizer, params, tracker)
                prime_log = _take_prime_log(tracker)
            else:
                optimizer_increase, states, prime_log = primed
                for entries in states:
                    for _, shape, stride, dtype, on_device in entries:
                        if on_device:
                            replica = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
                            tracker.relabel(replica, "optimizer_state")
                            state_replicas.append(replica)
            if optimizer_increase is not None and method_hook is not None:
                _prime_method_state(method_hook, params, tracker)
            if optimizer_increase is not None:

                def step_stub(*_: Any, **__: Any) -> None:
                    at_step["live"], at_step["totals"] = tracker.current, dict(tracker.totals)
                    marks["stub"] = _log_len(tracker)

                # the measured step reuses the primed step's temporaries: an instance attribute shadows the method
                setattr(optimizer, "step", step_stub)  # noqa: B010 - mypy rejects assigning to a method
            tracker.reset_peak()
            start = tracker.current
            marks["step_start"] = _log_len(tracker)
            if count_flops:
                counter = flop_counter()
                split = _ForwardSplit(model, counter)
                with counter:
                    step_fn(model, batch, optimizer, global_step=1)
                split.remove()
                total = int(counter.get_total_flops())
                fwd = int((split.end or 0) - (split.start or 0))
                flops = {"forward": fwd, "backward": total - fwd, "total": total, "batch_size": _batch_size(spec)}
            else:
                step_fn(model, batch, optimizer, global_step=1)
            marks["step_end"] = _log_len(tracker)
            if optimizer_increase is not None:
                del optimizer.step
                if "live" not in at_step:
                    raise RuntimeError("warmup='prime' needs a train_step that calls optimizer.step()")
                if at_step["live"] + optimizer_increase > tracker.peak:
                    tracker.peak = at_step["live"] + optimizer_increase
                    tracker.peak_totals = dict(at_step["totals"])
                    tracker.peak_totals["optimizer_temporaries"] = (
                        tracker.peak_totals.get("optimizer_temporaries", 0) + optimizer_increase
                    )
                    tracker.peak_phase = "optimizer"
            peak, peak_totals, phase = tracker.peak, dict(tracker.peak_totals), tracker.peak_phase
        for h in handles:
            h.remove()
        if method_hook is not None:
            del model.after_optimizer_step
    tracker.closed = True
    if engine == "fake":
        not_fake = [n for n, p in model.named_parameters() if not _is_fake(p)]
        if not_fake:
            raise RuntimeError(f"estimator guard: parameters {not_fake[:3]} are not fake tensors")
    else:
        real = [n for n, p in model.named_parameters() if not p.is_meta]
        if real:
            raise RuntimeError(f"estimator guard: parameters {real[:3]} are not meta tensors")
    breakdown = {k: int(peak_totals.get(k, 0)) for k in CATEGORIES}
    breakdown.update({k: int(v) for k, v in peak_totals.items() if k not in breakdown})
    return MemoryEstimate(
        peak_bytes=int(peak),
        breakdown_bytes=breakdown,
        step_start_bytes=int(start),
        first_step_peak_bytes=None if first_peak is None else int(first_peak),
        peak_phase=phase,
        attention=used_attention,
        target=target,
        round_to=round_to,
        optimizer=f"{type(optimizer).__name__}(foreach={foreach})",
        warmup=warmup,
        batch_source=spec.source,
        batch_shapes=spec.shapes(),
        placement=placement,
        build=build,
        engine=engine,
        notes=notes,
        seconds=time.perf_counter() - started,
        train_flops=flops,
        reserved_peak_bytes=(
            None if tracker.event_log is None else _reserved_peak(tracker.event_log, marks, prime_log, warmup)
        ),
    )


def _log_len(tracker: LiveStorageTracker) -> int:
    return len(tracker.event_log) if tracker.event_log is not None else 0


def _reserved_peak(log: list[Event], marks: dict[str, int], prime: PrimeLog | None, warmup: str) -> int:
    """Peak reserved bytes of the simulated caching allocator over the run the estimate stands for.

    `warmup="full"`: the log as recorded (setup, first step, measured step). `warmup="prime"`: the setup (what was
    logged before the priming), then the measured step twice, as a real run's first and second step: the first with
    the primed `optimizer.step()`'s events (state created, temporaries) where the step called the stub, the second
    with its temporaries only. The priming itself is left out. A free, in the second step, of something allocated
    before the step (a method's state replaced each step) frees the oldest survivor of the first step of that size.
    """
    sim = CachingAllocatorSim()
    if warmup == "full" or prime is None:
        sim.replay(log)
        return sim.peak_reserved
    live: dict[tuple[Any, ...], int] = {}

    def free(key: tuple[Any, ...]) -> bool:
        handle = live.pop(key, None)
        if handle is not None:
            sim.free(handle)
        return handle is not None

    for kind, serial, nbytes in log[: marks["prime_start"]]:
        if kind == "malloc":
            live[("setup", serial)] = sim.malloc(nbytes)
        else:
            free(("setup", serial))
    step = log[marks["step_start"] : marks["step_end"]]
    stub = marks["stub"] - marks["step_start"]
    sizes = {serial: nbytes for kind, serial, nbytes in log if kind == "malloc"}
    made = {serial for kind, serial, _ in step if kind == "malloc"}
    survivors: dict[int, deque[tuple[Any, ...]]] = defaultdict(deque)
    for rep, optimizer_events in enumerate((prime.step_events, prime.temporaries())):
        for i in range(len(step) + 1):
            if i == stub:
                for kind, serial, nbytes in optimizer_events:
                    if kind == "malloc":
                        live[("optimizer", rep, serial)] = sim.malloc(nbytes)
                    else:
                        free(("optimizer", rep, serial))
            if i == len(step):
                break
            kind, serial, nbytes = step[i]
            if kind == "malloc":
                live[("step", rep, serial)] = sim.malloc(nbytes)
            elif serial in made:
                free(("step", rep, serial))
            elif not free(("setup", serial)) and rep == 1 and survivors[sizes.get(serial, -1)]:
                free(survivors[sizes[serial]].popleft())
        if rep == 0:
            for kind, serial, nbytes in step:
                if kind == "malloc" and ("step", 0, serial) in live:
                    survivors[nbytes].append(("step", 0, serial))
    return sim.peak_reserved


def _device_step(optimizer: torch.optim.Optimizer) -> bool:
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    return bool(group.get("capturable") or group.get("fused"))


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _batch_size(spec: BatchSpec) -> int:
    return int(spec.entries["label"][0][0]) if "label" in spec.entries else 1


def _label_method_hook(model: nn.Module, tracker: LiveStorageTracker) -> Callable[[int], Any] | None:
    """Label what `model.after_optimizer_step` allocates as "method_state" (AdaLoRA's importance scores); returns
    the labelled hook, now the model's `after_optimizer_step`, or None if the model has no such hook."""
    hook = getattr(model, "after_optimizer_step", None)
    if not callable(hook):
        return None

    def labelled(global_step: int) -> Any:
        previous = tracker.default_category
        tracker.default_category = "method_state"
        try:
            return hook(global_step)
        finally:
            tracker.default_category = previous

    # instance attribute, removed after the estimate (setattr: nn.Module's __setattr__ is typed for tensors/modules)
    setattr(model, "after_optimizer_step", labelled)  # noqa: B010
    return labelled


@torch.no_grad()
def _prime_method_state(
    after_optimizer_step: Callable[[int], Any], params: list[nn.Parameter], tracker: LiveStorageTracker
) -> None:
    """What the first step's `after_optimizer_step(0)` leaves behind, created on zero gradients (prime mode)."""
    for p in params:
        p.grad = torch.zeros_like(p)
        tracker.relabel(p.grad, "gradients")
    after_optimizer_step(0)
    for p in params:
        p.grad = None


@torch.no_grad()
def _prime_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], tracker: LiveStorageTracker) -> int:
    """Create the optimizer state with one step on zero gradients, drop the gradients, and return the
    step's transient bytes over its steady-state live set (state included), i.e. what a later step on
    gradients of the same shapes allocates on top of what is live when it starts."""
    for p in params:
        p.grad = torch.zeros_like(p)
        tracker.relabel(p.grad, "gradients")
    tracker.reset_peak()
    tracker.untracked_bytes = 0
    start = len(tracker.event_log) if tracker.event_log is not None else 0
    optimizer.step()
    if tracker.event_log is not None:
        tracker.step_window = (start, len(tracker.event_log))
    increase = tracker.peak - tracker.current - tracker.untracked_bytes
    optimizer.zero_grad(set_to_none=True)
    return max(0, int(increase))


def estimate_training_memory(
    method: Method,
    backbone: BackboneSpec,
    res: int,
    batch_size: int,
    num_classes: int = 5,
    *,
    attention: str = "auto",
    target: str = "cuda",
    warmup: str = "prime",
    engine: str = "meta",
    count_flops: bool = False,
    train_step_fn: TrainStep | None = None,
    make_optimizer_fn: MakeOptimizer | None = None,
    round_to: int | None = None,
    prepared: bool = True,
) -> MemoryEstimate:
    """Build `method` for `backbone` at `res` on the meta device and estimate its training-step peak (after
    `prepare_data`, or without it with `prepared=False`)."""
    ctx = make_context(backbone, res, num_classes, attention)
    model, build = build_meta(method, ctx)
    spec = batch_spec(model, method, res, batch_size, num_classes, prepared=prepared)
    resident, placement = resident_tensor_ids(model)
    return estimate_model_memory(
        model,
        spec,
        attention=attention,
        target=target,
        warmup=warmup,
        engine=engine,
        count_flops=count_flops,
        train_step_fn=train_step_fn,
        make_optimizer_fn=make_optimizer_fn,
        resident=resident,
        placement=placement,
        build=build,
        round_to=round_to,
    )


# The memory kinds an estimate names, and the one a GPU budget is compared with (the most device-like it has).
KIND_FIELDS = {"device": "est_device_mem_mb", "reserved": "est_reserved_mem_mb", "allocated": "est_peak_mem_mb"}
KIND_LABELS = {
    "device": "device memory (reserved + measured CUDA context, what nvidia-smi shows)",
    "reserved": "reserved memory (simulated CUDA caching allocator; no CUDA context)",
    "allocated": "allocated memory (live tensors; no allocator caching, no CUDA context)",
}


def select_memory_kind(record: dict[str, Any]) -> str:
    """The memory kind to compare with a budget: "device" if the record has it, else "reserved", else "allocated"."""
    for kind in ("device", "reserved"):
        if record.get(KIND_FIELDS[kind]) is not None:
            return kind
    return "allocated"
