"""What fits on a GPU (`petlbench plan`): per method, the largest input resolution at a batch size and the largest
batch size at a resolution whose estimated training memory stays within a budget.

Memory compared with the budget (`memory_kind`, in every output): **device** memory (`est_device_mem_mb`, reserved
plus the measured CUDA context of the named GPU) when the estimator has it, else **reserved** memory
(`est_reserved_mem_mb`, the simulated caching allocator), else **allocated** memory (`est_peak_mem_mb`).

How it stays exact and fast
---------------------------
For a fixed method, peak memory of a ViT training step is a low-degree polynomial in the number of tokens
N = (res/patch)² + prefix tokens (quadratic: linear layers are linear in N, an explicit attention map quadratic) and
linear in the batch size. The search along one axis (resolution at a fixed batch size, or batch size at a fixed
resolution) keeps every exact estimate it makes (`exact_estimate`, memoised by method, options, backbone, shapes and
target) and:

1. fits the polynomial through the estimates closest to the budget (quadratic in N, or linear in the batch size;
   fewer points give a linear or proportional first guess);
2. solves it for the largest feasible value inside the current bracket (largest value known to fit, smallest known
   not to) and estimates that value exactly;
3. stops when the bracket closes: the answer fits and the next step past it (one patch more, one image more) does
   not, both exact estimates. A fit that keeps missing falls back to bisection.

The answer is the one an exhaustive scan of exact estimates over the search range gives, where memory is
nondecreasing. Allocated memory is. Reserved (and so device) memory nearly is: the simulated allocator's overhead over
allocated memory drifts slowly, with isolated spikes (a freed segment that could not be reused). So, past the first
value that does not fit, the search estimates the next one too while that value's allocated memory times the overhead
of the nearest estimates below it would fit (the failure was a spike), and goes on above when it fits. At tiny sizes
(test models, budgets of tens of MiB) the allocator also changes regime as tensors cross its 1 MiB and 10 MiB
thresholds and can need less memory for a larger batch; no search short of a scan sees such a dip beyond its answer,
which is then the first boundary found (an answer that fits, the step past it not). Each probe records what the fit in
use predicted for it before it was estimated (`max_rel_error_unseen`).

Exact estimates are memoised in the process (`exact_estimate`); `frozen_heap` keeps the garbage collector off the
libraries' objects while planning; `plan_methods(jobs=...)` plans methods in forked worker processes.

Throughput at each answer: predicted training images/s where a measured reference for the GPU exists under
`results/reference/` (a `petlbench validate` JSON with a throughput table: the measured images/s of the method,
scaled by the ratio of train-step FLOPs per image), else the train-step GFLOPs per image (torch FlopCounterMode,
forward + backward, 1 multiply-add = 1 FLOP), labelled as such.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from petlbench.core.method import BackboneSpec, Method, parse_method_keys
from petlbench.engine.runner import PlannedSize, SizePlanner
from petlbench.profiling.allocator import device_memory_mb
from petlbench.profiling.flops import FLOPS_UNIT, to_gflops_per_image
from petlbench.profiling.memory_estimate import (
    KIND_FIELDS,
    KIND_LABELS,
    MIB,
    MemoryEstimate,
    estimate_training_memory,
    select_memory_kind,
)
from petlbench.profiling.profile import make_method, parse_mem
from petlbench.profiling.workers import fork_map

DEFAULT_BATCH_SIZE = 16
DEFAULT_RES = 512
DEFAULT_MAX_RES = 8192
DEFAULT_MAX_BATCH = 8192
REFERENCE_DIR = Path("results/reference")
FIT_PROBES = 8  # fit-guided probes per search before falling back to bisection
SCALING = ("activations", "inputs", "preloaded_features")  # breakdown categories that grow with the batch

_EXACT: dict[tuple[Any, ...], MemoryEstimate] = {}
_COMPUTED = [0]  # exact estimates computed (not served from `_EXACT`) in this process


# ----------------------------------------------------------------------------------------- exact estimates
def _method_id(method: Method) -> tuple[str, str, str]:
    cls = type(method)
    return cls.__module__, cls.__qualname__, repr(sorted(method.resolved_options().items()))


def exact_estimate(
    method: Method,
    backbone: BackboneSpec,
    res: int,
    batch_size: int,
    *,
    num_classes: int = 5,
    attention: str = "auto",
    target: str = "cuda",
    flops: bool = False,
) -> MemoryEstimate:
    """`estimate_training_memory` memoised in this process by method, options, backbone, shapes and target (with
    `flops`, one that also counted the step's FLOPs; counting does not change the memory)."""
    key = (_method_id(method), backbone, int(res), int(batch_size), num_classes, attention, target)
    hit = _EXACT.get(key)
    if hit is not None and (hit.train_flops is not None or not flops):
        return hit
    est = estimate_training_memory(
        method, backbone, int(res), int(batch_size), num_classes, attention=attention, target=target, count_flops=flops
    )
    _EXACT[key] = est
    _COMPUTED[0] += 1
    return est


def clear_cache() -> None:
    """Forget the memoised exact estimates."""
    _EXACT.clear()


_FROZEN = [0]


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive on entry (torch, timm, peft: millions) out of the garbage collector's passes until
    exit; the estimates' own garbage is collected as usual. Estimates build thousands of modules: full collections
    over the whole heap took about a tenth of a plan's time."""
    if _FROZEN[0] == 0:
        gc.freeze()
    _FROZEN[0] += 1
    try:
        yield
    finally:
        _FROZEN[0] -= 1
        if _FROZEN[0] == 0:
            gc.unfreeze()


# ----------------------------------------------------------------------------------------- memory kinds
def kind_reason(record: Mapping[str, Any], kind: str) -> str:
    """Why `kind` was chosen for this record (what the better kinds lacked)."""
    if kind == "device":
        return "device memory estimated (measured CUDA context of the named GPU)"
    why = record.get("est_device_mem_reason") or "no device-level estimate"
    if kind == "reserved":
        return f"no device memory: {why}"
    return f"no device or reserved memory: {why}"


def memory_mb(est: MemoryEstimate, kind: str, gpu: str | None = None) -> float:
    """The estimate's memory of `kind` in MiB (the value `MemoryEstimate.to_dict()` reports for it)."""
    if kind == "allocated":
        return est.peak_bytes / MIB
    if est.reserved_peak_bytes is None:
        raise ValueError(f"{kind} memory needs a reserved estimate (target cuda)")
    if kind == "reserved":
        return est.reserved_peak_bytes / MIB
    device, reason = device_memory_mb(est.reserved_peak_bytes, gpu)
    if device is None:
        raise ValueError(f"no device memory: {reason}")
    return device


def record_of(est: MemoryEstimate, gpu: str | None) -> dict[str, Any]:
    """`est.to_dict()` for the named GPU (device memory where its CUDA context is measured)."""
    return dataclasses.replace(est, gpu=gpu).to_dict()


# ----------------------------------------------------------------------------------------- the search
@dataclass
class Probe:
    """One exact estimate of a search: index on the axis, memory (MiB) and what the fit predicted before (MiB)."""

    index: int
    mem_mb: float
    predicted_mb: float | None = None


@dataclass
class SearchResult:
    """The largest index in [1, n] whose memory fits (None: not even 1), with every probe made."""

    index: int | None
    n: int
    probes: list[Probe]
    degree: int

    @property
    def capped(self) -> bool:
        """The search limit itself fits: the true limit may be higher."""
        return self.index == self.n

    def mem_at(self, index: int | None) -> float | None:
        """Memory (MiB) of an estimated index, else None."""
        return next((p.mem_mb for p in self.probes if p.index == index), None)

    def max_rel_error_unseen(self) -> float | None:
        """Largest |predicted / exact - 1| over the probes a full-degree fit predicted before they were estimated."""
        errors = [abs(p.predicted_mb / p.mem_mb - 1) for p in self.probes if p.predicted_mb is not None and p.mem_mb]
        return max(errors) if errors else None


class PolyFit:
    """A polynomial in a feature of the index (tokens or batch size), fitted through known points (MiB)."""

    def __init__(self, feature: Callable[[np.ndarray], np.ndarray], points: Sequence[tuple[int, float]], degree: int):
        self.feature = feature
        xs = np.array([i for i, _ in points], dtype=float)
        self.scale = float(max(np.max(np.abs(feature(xs))), 1.0))
        self.degree = min(degree, len(points) - 1)
        ts = feature(xs) / self.scale
        ys = np.array([v for _, v in points], dtype=float)
        if self.degree == 0:  # one point: memory taken as proportional to the feature
            self.coef = np.array([ys[0] / ts[0], 0.0]) if ts[0] else np.array([0.0, ys[0]])
        else:
            self.coef = np.polyfit(ts, ys, self.degree)

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        """Predicted memory (MiB) at index/indices."""
        return np.polyval(self.coef, self.feature(np.asarray(index, dtype=float)) / self.scale)


def fit_points(known: Mapping[int, float], budget: float, count: int) -> list[tuple[int, float]]:
    """The `count` known points closest to the budget (by memory ratio), for a local fit."""
    ranked = sorted(known.items(), key=lambda kv: (abs(math.log(max(kv[1], 1e-12) / budget)), kv[0]))
    return sorted(ranked[:count])


def largest_fitting(
    evaluate: Callable[[int], float],
    budget: float,
    n: int,
    feature: Callable[[np.ndarray], np.ndarray],
    degree: int,
    seeds: Sequence[int] = (),
    prior: Callable[[np.ndarray], np.ndarray] | None = None,
    floor: Callable[[int], float] | None = None,
) -> SearchResult:
    """Largest index i in [1, n] with evaluate(i) <= budget (exact and expensive), for an `evaluate` that is
    nondecreasing up to isolated spikes.

    Probes are chosen by a polynomial (in `feature(i)`, at most `degree`) through the known points nearest the
    budget, solved inside the bracket; the result is confirmed by the exact values at i and i + 1. `prior` (index ->
    MiB) replaces the fit while a single point is known. `floor(i)`, for an estimated i, is a nondecreasing lower
    bound of what any index >= i can need: while the first index past the answer fails but its floor fits (a
    spike), the next index is estimated too and the search goes on above it if it fits.
    """
    if n < 1:
        raise ValueError("the search range is empty")
    known: dict[int, float] = {}
    probes: list[Probe] = []

    def probe(i: int, predicted: float | None) -> None:
        value = float(evaluate(i))
        known[i] = value
        probes.append(Probe(i, value, predicted))

    for seed in seeds:
        i = min(max(int(seed), 1), n)
        if i not in known:
            probe(i, None)
    guided = 0
    while True:
        low = max((i for i, v in known.items() if v <= budget), default=0)
        high = min((i for i, v in known.items() if v > budget and i > low), default=n + 1)
        if high == low + 1:
            after = high
            while after <= n and after in known and floor is not None and floor(after) <= budget:
                after += 1
            if after > n or after in known:
                return SearchResult(low or None, n, probes, degree)
            probe(after, None)
            continue
        guess, predicted = low + 1, None
        fit = _local_fit(known, budget, feature, degree) if known and guided < FIT_PROBES else None
        model: Callable[[np.ndarray], np.ndarray] | None = prior if len(known) == 1 and prior is not None else fit
        if model is not None:
            guided += 1
            candidates = np.arange(max(low, 1), high)
            fits = candidates[model(candidates) <= budget]
            guess = min(max(int(fits[-1]) if fits.size else low, low + 1), high - 1)
            if model is fit and fit.degree == degree:
                predicted = float(fit(guess))
        elif known:
            guess = (low + high) // 2 if high <= n else min(n, max(2 * low, low + 1))
        probe(guess, predicted)


def _local_fit(
    known: Mapping[int, float], budget: float, feature: Callable[[np.ndarray], np.ndarray], degree: int
) -> PolyFit | None:
    """The fit through the known points nearest the budget, lowered in degree until it is increasing and convex
    (memory is: a concave or falling fit comes from allocator granularity between close points); None if none is."""
    for d in range(min(degree, len(known) - 1), -1, -1):
        fit = PolyFit(feature, fit_points(known, budget, d + 1), d)
        # leading coefficient: the curvature (d = 2), the slope (d = 1) or the ratio to the feature (d = 0)
        if fit.coef[0] < 0 or (d < 2 and fit.coef[0] == 0):
            continue
        return fit
    return None


# ----------------------------------------------------------------------------------------- per-method plans
@functools.cache
def backbone_geometry(name: str) -> tuple[int, int]:
    """(patch size, prefix tokens) of a timm ViT, read from a meta-device instance."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    patch_embed: Any = model.patch_embed  # PatchEmbed or a look-alike: the class varies with the model
    patch = int(patch_embed.patch_size[0])
    return patch, int(getattr(model, "num_prefix_tokens", 1))


@dataclass
class AxisPlan:
    """The answer along one axis: `value` (resolution px or batch size; None when nothing fits) at `fixed`."""

    axis: str
    fixed: int
    step: int
    limit: int
    value: int | None
    capped: bool
    mem_mb: float | None
    next_mem_mb: float | None
    search: SearchResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary of the search."""
        search = self.search
        return {
            "axis": self.axis,
            "fixed": self.fixed,
            "step": self.step,
            "limit": self.limit,
            "value": self.value,
            "capped": self.capped,
            "mem_mb": self.mem_mb,
            "next_mem_mb": self.next_mem_mb,
            "degree": None if search is None else search.degree,
            "exact_probes": [] if search is None else [[p.index * self.step, p.mem_mb] for p in search.probes],
            "fit_predictions": (
                []
                if search is None
                else [[p.index * self.step, p.predicted_mb] for p in search.probes if p.predicted_mb is not None]
            ),
            "max_rel_error_unseen": None if search is None else search.max_rel_error_unseen(),
        }


@dataclass
class MethodPlan:
    """Largest resolution (at `batch_size`) and batch size (at `res`) of one method within `budget_bytes`."""

    method: str
    name: str
    backbone: str
    budget_bytes: int
    gpu: str | None
    batch_size: int
    res: int
    patch: int
    prefix_tokens: int
    memory_kind: str
    memory_kind_reason: str
    res_plan: AxisPlan | None = None
    batch_plan: AxisPlan | None = None
    throughput: dict[str, Any] = field(default_factory=dict)
    exact_estimates: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def max_res(self) -> int | None:
        """Largest resolution (px, a multiple of the patch size) that fits at `batch_size`; None if none."""
        return None if self.res_plan is None else self.res_plan.value

    @property
    def max_batch(self) -> int | None:
        """Largest batch size that fits at `res`; None if none."""
        return None if self.batch_plan is None else self.batch_plan.value

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of `petlbench plan --json` (one per method)."""
        res_plan, batch_plan = self.res_plan, self.batch_plan
        return {
            "method": self.method,
            "name": self.name,
            "backbone": self.backbone,
            "gpu_mem_bytes": self.budget_bytes,
            "gpu_mem_mb": self.budget_bytes / MIB,
            "gpu": self.gpu,
            "memory_kind": self.memory_kind,
            "memory_field": KIND_FIELDS.get(self.memory_kind),
            "memory_kind_label": KIND_LABELS.get(self.memory_kind),
            "memory_kind_reason": self.memory_kind_reason,
            "mem_unit": "MiB (2^20 bytes)",
            "batch_size": self.batch_size,
            "max_res": self.max_res,
            "max_res_capped": None if res_plan is None else res_plan.capped,
            "max_res_mem_mb": None if res_plan is None else res_plan.mem_mb,
            "res": self.res,
            "max_batch": self.max_batch,
            "max_batch_capped": None if batch_plan is None else batch_plan.capped,
            "max_batch_mem_mb": None if batch_plan is None else batch_plan.mem_mb,
            "patch_size": self.patch,
            "prefix_tokens": self.prefix_tokens,
            "throughput": self.throughput,
            "search": {
                "res": None if res_plan is None else res_plan.to_dict(),
                "batch_size": None if batch_plan is None else batch_plan.to_dict(),
            },
            "exact_estimates": self.exact_estimates,
            "plan_seconds": self.seconds,
            "error": self.error,
        }


def _axis_plan(axis: str, fixed: int, step: int, n: int, found: SearchResult) -> AxisPlan:
    value = None if found.index is None else found.index * step
    after = found.mem_at((found.index or 0) + 1)
    return AxisPlan(axis, fixed, step, n * step, value, found.capped, found.mem_at(found.index), after, found)


def token_feature(prefix: int) -> Callable[[np.ndarray], np.ndarray]:
    """Index k (resolution / patch size) -> tokens N = k² + prefix tokens, the variable memory is quadratic in."""

    def tokens(k: np.ndarray) -> np.ndarray:
        return k * k + prefix

    return tokens


def _batch_feature(b: np.ndarray) -> np.ndarray:
    return b


def plan_for(
    method: str | Method,
    backbone: str | BackboneSpec,
    gpu_bytes: int | str,
    *,
    batch_size: int | None = None,
    res: int | None = None,
    num_classes: int = 5,
    attention: str = "auto",
    gpu: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    max_res: int = DEFAULT_MAX_RES,
    max_batch: int = DEFAULT_MAX_BATCH,
    reference_dir: str | Path | None = REFERENCE_DIR,
    kind: str | None = None,
    throughput: bool = True,
) -> MethodPlan:
    """The largest resolution at `batch_size` and/or the largest batch size at `res` of one method within
    `gpu_bytes` ("24GB" or bytes). Only `batch_size`: the resolution search alone (`run --res auto`); only `res`:
    the batch-size search alone (`run --batch-size auto`); neither: both, at the defaults (16, 512 px). `kind`
    forces a memory kind ("device", "reserved", "allocated"; default: the best the estimator has). `throughput=False`
    skips the throughput / FLOPs of the answers (fewer estimates)."""
    with frozen_heap():
        return _plan_for(
            method,
            backbone,
            gpu_bytes,
            batch_size=batch_size,
            res=res,
            num_classes=num_classes,
            attention=attention,
            gpu=gpu,
            options=options,
            max_res=max_res,
            max_batch=max_batch,
            reference_dir=reference_dir,
            kind=kind,
            throughput=throughput,
        )


def _plan_for(
    method: str | Method,
    backbone: str | BackboneSpec,
    gpu_bytes: int | str,
    *,
    batch_size: int | None,
    res: int | None,
    num_classes: int,
    attention: str,
    gpu: str | None,
    options: Mapping[str, Mapping[str, Any]] | None,
    max_res: int,
    max_batch: int,
    reference_dir: str | Path | None,
    kind: str | None,
    throughput: bool,
) -> MethodPlan:
    started = time.perf_counter()
    spec = backbone if isinstance(backbone, BackboneSpec) else BackboneSpec(backbone)
    if isinstance(method, str):
        key, method_obj = method, make_method(method, options)
    else:
        key, method_obj = method.key or type(method).__name__, method
    budget = parse_mem(gpu_bytes)
    if budget is None or budget <= 0:
        raise ValueError(f"GPU memory budget {gpu_bytes!r}: give a positive size, e.g. 24GB")
    do_res, do_batch = batch_size is not None or res is None, res is not None or batch_size is None
    patch, prefix = backbone_geometry(spec.name)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    if res is None:  # the default seed, inside the search range
        res = patch * max(1, min(round(DEFAULT_RES / patch), max_res // patch))
    res = int(res)
    if batch_size < 1 or res < 1:
        raise ValueError("batch size and resolution must be positive")
    if res % patch:
        raise ValueError(f"resolution {res} is not a multiple of the patch size {patch} of {spec.name}")
    if max_res < patch or max_batch < 1:
        raise ValueError(f"search limits: max_res must be >= the patch size {patch}, max_batch >= 1")
    computed = _COMPUTED[0]

    def estimate(r: int, b: int, flops: bool = False) -> MemoryEstimate:
        return exact_estimate(method_obj, spec, r, b, num_classes=num_classes, attention=attention, flops=flops)

    seed = estimate(res, batch_size, flops=throughput)
    record = record_of(seed, gpu)
    best = select_memory_kind(record)
    if kind is None:
        kind = best
    elif kind not in KIND_FIELDS:
        raise ValueError(f"memory kind {kind!r}: use {', '.join(KIND_FIELDS)}")
    elif record.get(KIND_FIELDS[kind]) is None:
        why = record.get("est_device_mem_reason") if kind == "device" else "target is not cuda"
        raise ValueError(f"no {kind} memory: {why}")
    plan = MethodPlan(
        method=key,
        name=getattr(method_obj, "display_name", "") or key,
        backbone=spec.name,
        budget_bytes=budget,
        gpu=gpu,
        batch_size=batch_size,
        res=res,
        patch=patch,
        prefix_tokens=prefix,
        memory_kind=kind,
        memory_kind_reason=kind_reason(record, kind) if kind == best else f"{kind} memory asked for",
    )
    budget_mb = budget / MIB

    def search(
        point: Callable[[int], tuple[int, int]],
        n: int,
        feature: Callable[[np.ndarray], np.ndarray],
        degree: int,
        seed_index: int,
        prior: Callable[[np.ndarray], np.ndarray] | None,
    ) -> SearchResult:
        seen: list[int] = []

        def evaluate(index: int) -> float:
            seen.append(index)
            return memory_mb(estimate(*point(index)), kind, gpu)

        def floor(index: int) -> float:
            # allocated memory is nondecreasing, and the allocator's overhead over it (reserved / allocated) drifts
            # slowly with spikes on top: the overhead of the two nearest estimates below bounds what `index` would
            # need without a spike
            est = estimate(*point(index))
            if kind == "allocated" or est.reserved_peak_bytes is None:
                return est.peak_bytes / MIB
            below = sorted({i for i in seen if i < index})[-2:] or [index]
            ests = [estimate(*point(i)) for i in below]
            ratio = min((e.reserved_peak_bytes or 0) / max(e.peak_bytes, 1) for e in ests)
            context = memory_mb(est, kind, gpu) - est.reserved_peak_bytes / MIB
            return context + ratio * est.peak_bytes / MIB

        return largest_fitting(evaluate, budget_mb, n, feature, degree, seeds=[seed_index], prior=prior, floor=floor)

    # first guesses from the seed's breakdown: what scales with the batch (activations, inputs) grows linearly in
    # the tokens (fused attention) and in the batch size, the rest (weights, gradients, optimizer) stays
    seed_mb = memory_mb(seed, kind, gpu)
    scaled = sum(seed.breakdown_bytes.get(k, 0) for k in SCALING) / max(seed.peak_bytes, 1) * seed_mb
    fixed = seed_mb - scaled
    tokens = token_feature(prefix)
    seed_tokens = float(tokens(np.asarray(res // patch)))

    def res_prior(k: np.ndarray) -> np.ndarray:
        return fixed + scaled * tokens(np.asarray(k, dtype=float)) / seed_tokens

    def batch_prior(b: np.ndarray) -> np.ndarray:
        return fixed + scaled * np.asarray(b, dtype=float) / batch_size

    if do_res:
        n = max_res // patch
        found = search(lambda k: (k * patch, batch_size), n, tokens, 2, res // patch, res_prior if scaled > 0 else None)
        plan.res_plan = _axis_plan("res", batch_size, patch, n, found)
    if do_batch:
        found = search(
            lambda b: (res, b), max_batch, _batch_feature, 1, batch_size, batch_prior if scaled > 0 else None
        )
        plan.batch_plan = _axis_plan("batch_size", res, 1, max_batch, found)
    if throughput:
        plan.throughput = _throughput(plan, method_obj, spec, num_classes, attention, estimate, reference_dir)
    plan.exact_estimates = _COMPUTED[0] - computed
    plan.seconds = time.perf_counter() - started
    return plan


# ----------------------------------------------------------------------------------------- throughput
def _gflops_per_image(est: MemoryEstimate) -> float | None:
    flops = est.train_flops
    if not flops:
        return None
    return to_gflops_per_image(flops["total"] / 2, flops["batch_size"])


def load_reference(
    reference_dir: str | Path | None, gpu: str | None
) -> tuple[Path, dict[str, Any], dict[str, float]] | None:
    """(file, its configuration, method -> measured training images/s) of the first reference JSON under
    `reference_dir` measured on `gpu` that has a throughput table; None if there is none."""
    if reference_dir is None or gpu is None or not Path(reference_dir).is_dir():
        return None
    for path in sorted(Path(reference_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        device = data.get("device") or {}
        names = {str(device.get(k, "")).lower() for k in ("name", "slug")} if isinstance(device, dict) else set()
        if gpu.lower() not in names:
            continue
        table = _throughput_table(data)
        if table is None:
            continue
        rates: dict[str, float] = {}
        for method, row in table.items():
            rate = row.get("train_images_per_s") if isinstance(row, dict) else row
            if isinstance(rate, (int, float)) and rate > 0:
                rates[str(method)] = float(rate)
        if rates:
            return path, dict(data.get("config") or {}), rates
    return None


def _throughput_table(data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Method -> measured training images/s (or a row holding `train_images_per_s`) of a reference JSON: a
    `petlbench validate` report (`checks.throughput.train`) or a top-level `throughput` table."""
    for holder in ((data.get("checks") or {}).get("throughput"), data.get("throughput")):
        if isinstance(holder, Mapping):
            table = holder.get("train", holder)
            if isinstance(table, Mapping):
                return table
    return None


def _throughput(
    plan: MethodPlan,
    method: Method,
    spec: BackboneSpec,
    num_classes: int,
    attention: str,
    estimate: Callable[..., MemoryEstimate],
    reference_dir: str | Path | None,
) -> dict[str, Any]:
    """Per answer, predicted training images/s from a measured reference, else train-step GFLOPs per image."""
    points = {}
    if plan.max_res is not None:
        points["at_max_res"] = (plan.max_res, plan.batch_size)
    if plan.max_batch is not None:
        # FLOPs per image do not depend on the batch size: the seed point (same resolution) has them
        points["at_max_batch"] = (plan.res, plan.batch_size)
    reference = load_reference(reference_dir, plan.gpu)
    ref_gflops: float | None = None
    ref_rate: float | None = None
    if reference is not None and plan.method in reference[2]:
        path, config, rates = reference
        ref_rate = rates[plan.method]
        ref_backbone = BackboneSpec(str(config.get("backbone", spec.name)))
        ref_res, ref_batch = int(config.get("res", plan.res)), int(config.get("batch_size", plan.batch_size))
        ref_est = exact_estimate(
            method, ref_backbone, ref_res, ref_batch, num_classes=num_classes, attention=attention, flops=True
        )
        ref_gflops = _gflops_per_image(ref_est)
        ref_text = f"{path} ({ref_backbone.name}, {ref_res} px, batch {ref_batch}: {ref_rate:.1f} img/s)"
    out: dict[str, Any] = {}
    for name, (r, b) in points.items():
        gflops = _gflops_per_image(estimate(r, b, True))
        at_batch = plan.max_batch if name == "at_max_batch" else plan.batch_size
        row: dict[str, Any] = {"res": r, "batch_size": at_batch, "train_gflops_per_image": gflops}
        if ref_rate is not None and ref_gflops and gflops:
            row.update(
                kind="predicted_train_images_per_s",
                value=ref_rate * ref_gflops / gflops,
                label=f"predicted training img/s: measured reference {ref_text} scaled by train-step FLOPs per image",
            )
        else:
            row.update(
                kind="train_gflops_per_image",
                value=gflops,
                label=f"train-step GFLOPs per image (forward + backward, torch FlopCounterMode; {FLOPS_UNIT}); "
                "no measured throughput reference for this GPU",
            )
        out[name] = row
    return out


# ----------------------------------------------------------------------------------------- all methods
def plan_methods(
    methods: str | Sequence[str],
    backbone: str | BackboneSpec,
    gpu_bytes: int | str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    res: int | None = None,
    num_classes: int = 5,
    attention: str = "auto",
    gpu: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    max_res: int = DEFAULT_MAX_RES,
    max_batch: int = DEFAULT_MAX_BATCH,
    reference_dir: str | Path | None = REFERENCE_DIR,
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[MethodPlan]:
    """`plan_for` (both axes) for every method of `methods` ("all" or keys), in rank order; `res` defaults to
    512 px (the nearest multiple of the patch size). With `jobs` > 1 the methods are planned in that many forked
    worker processes (same results: every answer is exact)."""
    keys = parse_method_keys(methods)
    name = backbone.name if isinstance(backbone, BackboneSpec) else backbone
    patch = backbone_geometry(name)[0]  # computed here, inherited by forked workers
    res = patch * max(1, round(DEFAULT_RES / patch)) if res is None else res
    if res % patch:
        raise ValueError(f"resolution {res} is not a multiple of the patch size {patch} of {name}")
    settings: dict[str, Any] = {
        "backbone": backbone,
        "gpu_bytes": gpu_bytes,
        "batch_size": batch_size,
        "res": res,
        "num_classes": num_classes,
        "attention": attention,
        "gpu": gpu,
        "options": options,
        "max_res": max_res,
        "max_batch": max_batch,
        "reference_dir": reference_dir,
    }
    work = [(key, settings) for key in keys]
    workers = min(max(1, jobs), len(keys))
    with frozen_heap():  # frozen before forking, too: workers then share the frozen pages instead of copying them
        return _plan_all(work, workers, log)


def _plan_all(
    work: list[tuple[str, dict[str, Any]]], workers: int, log: Callable[[str], None] | None
) -> list[MethodPlan]:
    plans = []
    for plan in fork_map(_plan_worker, work, workers):
        _log_plan(plan, log)
        plans.append(plan)
    return plans


def _plan_worker(item: tuple[str, dict[str, Any]]) -> MethodPlan:
    key, settings = item
    try:
        return plan_for(key, **settings)
    except Exception as error:  # noqa: BLE001 - one method that cannot be estimated must not stop the plan
        spec = settings["backbone"]
        spec = spec if isinstance(spec, BackboneSpec) else BackboneSpec(spec)
        patch, prefix = backbone_geometry(spec.name)
        return MethodPlan(
            method=key,
            name=key,
            backbone=spec.name,
            budget_bytes=parse_mem(settings["gpu_bytes"]) or 0,
            gpu=settings["gpu"],
            batch_size=settings["batch_size"],
            res=settings["res"],
            patch=patch,
            prefix_tokens=prefix,
            memory_kind="n/a",
            memory_kind_reason="no estimate",
            error=f"{type(error).__name__}: {error}",
        )


def _log_plan(plan: MethodPlan, log: Callable[[str], None] | None) -> None:
    if log is not None:
        log(
            f"{plan.method}: max res {plan.max_res} @ batch {plan.batch_size}, max batch {plan.max_batch} @ "
            f"{plan.res} px ({plan.exact_estimates} exact estimates, {plan.seconds:.1f}s)"
        )


# ----------------------------------------------------------------------------------------- outputs
def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _limit_text(value: int | None, capped: bool | None, unit: str = "") -> str:
    if value is None:
        return "none fits"
    return f"≥ {value}{unit} (search limit)" if capped else f"{value}{unit}"


def plan_markdown(plans: Sequence[MethodPlan], title: str = "") -> str:
    """The plan as a Markdown table with its notes (memory kind, what the throughput column holds)."""
    if not plans:
        return "# Plan\n\nNo methods.\n"
    first = plans[0]
    kinds = sorted({p.memory_kind for p in plans if p.memory_kind in KIND_LABELS})
    lines = [
        f"# {title or 'What fits'}: {first.backbone} within {size_text(first.budget_bytes)}",
        "",
        f"- Memory compared with the budget: {'; '.join(KIND_LABELS[k] for k in kinds)} "
        f"({'; '.join(sorted({p.memory_kind_reason for p in plans if not p.error}))}).",
        f"- Max res: largest multiple of the patch size ({first.patch} px) that fits at batch {first.batch_size}; "
        f"max batch: largest batch size that fits at {first.res} px. Every answer and the step past it are exact "
        "estimates (data-less replay of the training step); `none fits` when not even the smallest does.",
    ]
    throughput_kinds = {row.get("kind") for p in plans for row in p.throughput.values()}
    if "predicted_train_images_per_s" in throughput_kinds:
        lines.append("- img/s: predicted from a measured reference, scaled by train-step FLOPs per image.")
    if "train_gflops_per_image" in throughput_kinds:
        lines.append(
            "- GFLOPs/img: train-step (forward + backward) GFLOPs per image, torch FlopCounterMode, "
            f"{FLOPS_UNIT}; no measured throughput reference for this GPU."
        )
    lines += [
        "",
        f"| Method | Max res @ batch {first.batch_size} | Memory (MiB) | Throughput there "
        f"| Max batch @ {first.res} px | Memory (MiB) | Throughput there | Memory kind |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in plans:
        if p.error:
            lines.append(f"| {p.name} | error | | | | | | {p.memory_kind} |")
            continue
        cells = [
            p.name,
            _limit_text(p.max_res, p.res_plan.capped if p.res_plan else None, " px"),
            _fmt(p.res_plan.mem_mb if p.res_plan else None),
            _throughput_text(p.throughput.get("at_max_res")),
            _limit_text(p.max_batch, p.batch_plan.capped if p.batch_plan else None),
            _fmt(p.batch_plan.mem_mb if p.batch_plan else None),
            _throughput_text(p.throughput.get("at_max_batch")),
            p.memory_kind,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [p for p in plans if p.error]
    if errors:
        lines += ["", *[f"- {p.name}: {p.error}" for p in errors]]
    return "\n".join(lines) + "\n"


def _throughput_text(row: Mapping[str, Any] | None) -> str:
    if not row or row.get("value") is None:
        return "n/a"
    value = float(row["value"])
    text = f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3g}"
    if row.get("kind") == "predicted_train_images_per_s":
        return f"{text} img/s"
    return f"{text} GFLOPs/img"


def predicted_grid(plan: MethodPlan, columns: Sequence[int]) -> np.ndarray:
    """Predicted memory (MiB) of the plan's method at each resolution of `columns` (batch `plan.batch_size`): exact
    at estimated resolutions, else the least-squares quadratic in tokens through all of the search's estimates
    (linear if the quadratic is concave: too few, too clustered estimates)."""
    out = np.full(len(columns), np.nan)
    search = plan.res_plan.search if plan.res_plan else None
    if search is None or not search.probes:
        return out
    known = {p.index: p.mem_mb for p in search.probes}
    feature = token_feature(plan.prefix_tokens)
    fit = PolyFit(feature, sorted(known.items()), 2)
    if fit.degree == 2 and fit.coef[0] < 0:
        fit = PolyFit(feature, sorted(known.items()), 1)
    for j, res in enumerate(columns):
        k = res // plan.patch
        out[j] = known[k] if k in known else max(float(fit(k)), 0.0)
    return out


def size_text(nbytes: int, sep: str = " ") -> str:
    """A budget as people write it: GiB from 1 GiB up, else MiB."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:g}{sep}GiB"
    return f"{nbytes / MIB:g}{sep}MiB"


def plan_stem(plans: Sequence[MethodPlan]) -> str:
    """File stem of a plan's outputs: backbone, budget, batch size and resolution."""
    first = plans[0]
    return f"plan_{first.backbone}_{size_text(first.budget_bytes, '')}_b{first.batch_size}_r{first.res}"


__all__ = [
    "KIND_FIELDS",
    "AxisPlan",
    "MethodPlan",
    "PolyFit",
    "SearchResult",
    "backbone_geometry",
    "clear_cache",
    "exact_estimate",
    "largest_fitting",
    "load_reference",
    "memory_mb",
    "plan_for",
    "plan_markdown",
    "plan_methods",
    "select_memory_kind",
]


# ----------------------------------------------------------------------------------------- run --res/--batch-size auto
def size_planner(gpu_mem: str | int | None) -> SizePlanner:
    """The `SizePlanner` of `run --res auto` / `--batch-size auto`: the plan's answer within `gpu_mem` (default: the
    total memory of the CUDA device the run trains on)."""

    def plan(
        method: Method,
        backbone: BackboneSpec,
        *,
        res: int | None,
        batch_size: int | None,
        num_classes: int,
        attention: str,
        device: Any,
    ) -> PlannedSize:
        budget, gpu = _run_budget(gpu_mem, device)
        found = plan_for(
            method,
            backbone,
            budget,
            batch_size=batch_size,
            res=res,
            num_classes=num_classes,
            attention=attention,
            gpu=gpu,
            throughput=False,
        )
        axis = found.res_plan if res is None else found.batch_plan
        assert axis is not None  # plan_for searched the one axis left open
        where = f"{size_text(budget)}{f' ({gpu})' if gpu else ''}"
        kind = f"estimated {found.memory_kind} memory"
        if axis.value is None:
            raise ValueError(
                f"nothing fits {where}: the smallest {'resolution' if res is None else 'batch size'} needs "
                f"{_fmt(axis.next_mem_mb)} MiB of {kind} ({found.memory_kind_reason}); lower "
                f"{'--batch-size' if res is None else '--res'} or give a larger --gpu-mem"
            )
        unit = " px" if res is None else ""
        past = (
            "the search limit" if axis.capped else f"{axis.value + axis.step}{unit} needs {_fmt(axis.next_mem_mb, 1)}"
        )
        how = (
            f"{'--res' if res is None else '--batch-size'} auto = {axis.value}{unit}, the largest that fits {where} "
            f"at {'batch size' if res is None else 'resolution'} {axis.fixed}{'' if res is None else ' px'}: "
            f"{_fmt(axis.mem_mb, 1)} MiB of {kind}; {past}{'' if axis.capped else ' MiB'}"
        )
        if res is None:
            return PlannedSize(res=axis.value, batch_size=axis.fixed, how=how)
        return PlannedSize(res=axis.fixed, batch_size=axis.value, how=how)

    return plan


def _run_budget(gpu_mem: str | int | None, device: Any) -> tuple[int, str | None]:
    """The budget in bytes and the GPU it stands for: `gpu_mem` if given, else the CUDA device's total memory."""
    if gpu_mem is not None:
        budget = parse_mem(gpu_mem)
        if budget is None or budget <= 0:
            raise ValueError(f"--gpu-mem {gpu_mem!r}: give a positive size, e.g. 24GB")
        return budget, None
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        raise ValueError(f"no GPU budget: the run trains on {device}; give --gpu-mem SIZE (e.g. 24GB)")
    return torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
