"""Model plumbing shared by the profilers: meta-device builds, fake parameters, the attention switch,
which tensors `place()` puts on the accelerator, and what a training batch looks like.

Nothing here allocates real parameter memory: models are built on the `meta` device and their
parameters are swapped for `FakeTensor`s (shape, dtype and stride, no data) when a step must run.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from petlbench.core.method import ATTENTION_CHOICES, BackboneSpec, BuildContext, Method

# Breakdown categories of the memory estimator (the unlabelled remainder is activations + temporaries).
INPUTS = "inputs"
PRELOADED = "preloaded_features"


def _quiet(_: str) -> None:
    return None


def profiling_backbone(spec: BackboneSpec) -> BackboneSpec:
    """The same architecture without weights: FLOPs and memory do not depend on parameter values."""
    return dataclasses.replace(spec, pretrained=False, weights=None)


def make_context(
    backbone: BackboneSpec,
    res: int,
    num_classes: int,
    attention: str = "auto",
    device: torch.device | str = "meta",
    total_steps: int = 1000,
) -> BuildContext:
    """A BuildContext for profiling builds (weights never loaded, logging silenced)."""
    return BuildContext(
        backbone=profiling_backbone(backbone),
        num_classes=num_classes,
        res=res,
        total_steps=total_steps,
        device=torch.device(device),
        attention=attention,
        log=_quiet,
    )


def build_meta(method: Method, ctx: BuildContext) -> tuple[nn.Module, str]:
    """Build `method`'s model with every parameter on the meta device; returns (model, how it was built).

    Falls back to a CPU build converted to meta (allocates the weights once, transiently) for a method
    whose builder cannot run on meta; the second element says which path was taken.
    """
    meta_ctx = dataclasses.replace(ctx, device=torch.device("meta"), backbone=profiling_backbone(ctx.backbone))
    try:
        with torch.device("meta"), _SkipMetaInit():
            model = method.build(meta_ctx)
        if all(t.is_meta for t in _tensors(model)):
            return model, "meta"
        model = model.to("meta")
        return model, "meta (some tensors created off-meta, moved)"
    except Exception as error:  # noqa: BLE001 - fall back to a real CPU build, said in the result
        cpu_ctx = dataclasses.replace(meta_ctx, device=torch.device("cpu"))
        model = method.build(cpu_ctx)
        return model.to("meta"), f"cpu then meta (meta build failed: {type(error).__name__}: {error})"


# In-place initialisers are pointless on data-less meta tensors, and slow: timm's trunc_normal_ runs
# Python reference decompositions on meta (about 1 s for a ViT-L build). They are skipped during meta builds.
_INIT_OPS = frozenset(
    f"{name}_"
    for name in (
        "uniform normal erfinv mul add sub div clamp clamp_min clamp_max fill zero copy exp log sqrt erf "
        "bernoulli random exponential geometric cauchy log_normal addcmul addcdiv lerp abs fmod remainder "
        "orthogonal"
    ).split()
)


class _SkipMetaInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = getattr(func, "__name__", "")
        if name in _INIT_OPS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


# ----------------------------------------------------------------------------------------- attention
def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with timm's boolean `fused_attn` switch (timm `Attention` and look-alikes)."""
    return [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def set_attention(model: nn.Module, attention: str = "auto") -> str:
    """Apply `attention` to every attention module and return what the model now runs.

    "fused" sets `fused_attn=True` (F.scaled_dot_product_attention), "explicit" sets False (softmax(QKᵀ)V
    with the map materialised), "auto" leaves the model as built (timm's default is fused unless
    TIMM_FUSED_ATTN=0). Returns "fused", "explicit", "mixed" or "none" (no such module).
    Blocks that a method always evaluates explicitly (the FPT/FPT+ LPM blocks whose attention map is
    needed) do so regardless of the flag; their matmuls are counted either way.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not {attention!r}")
    modules = attention_modules(model)
    if attention != "auto":
        for module in modules:
            module.fused_attn = attention == "fused"
    return describe_attention(model)


def describe_attention(model: nn.Module) -> str:
    """ "fused", "explicit", "mixed" or "none", from the modules' `fused_attn` flags."""
    flags = {m.fused_attn for m in attention_modules(model)}
    if not flags:
        return "none"
    if len(flags) == 2:
        return "mixed"
    return "fused" if flags.pop() else "explicit"


# ----------------------------------------------------------------------------------------- placement
class _PlacementRecorder(TorchFunctionMode):
    """Records where `Tensor.to/.cuda/.cpu` would send each tensor, without moving anything."""

    def __init__(self) -> None:
        super().__init__()
        self.target: dict[int, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu) and args:
            tensor = args[0]
            if func is torch.Tensor.cuda:
                self.target[id(tensor)] = "cuda"
            elif func is torch.Tensor.cpu:
                self.target[id(tensor)] = "cpu"
            else:
                device = kwargs.get("device")
                for arg in args[1:]:
                    if isinstance(arg, (str, torch.device)):
                        device = arg
                    elif isinstance(arg, torch.Tensor):
                        device = arg.device
                if device is not None:
                    self.target[id(tensor)] = torch.device(device).type
            return tensor
        return func(*args, **kwargs)


def resident_tensor_ids(model: nn.Module, device: str = "cuda") -> tuple[set[int], str]:
    """Ids of the parameters/buffers `model.place(device)` keeps on `device` (others stay on the host).

    `place` is run on the meta-built model under a recorder that intercepts `.to/.cuda/.cpu` and moves
    nothing. FPT/FPT+ with preloading leave the LPM on the CPU; every other method moves everything.
    Tensors `place` never touches count as resident (conservative). Returns (ids, note).
    """
    tensors = _tensors(model)
    place = getattr(model, "place", None)
    if place is None:
        return {id(t) for t in tensors}, "no place(): all tensors resident"
    recorder = _PlacementRecorder()
    try:
        with recorder:
            place(torch.device(device))
    except Exception as error:  # noqa: BLE001
        return {id(t) for t in tensors}, f"place() could not be replayed ({type(error).__name__}); all resident"
    resident = {id(t) for t in tensors if recorder.target.get(id(t), device) == device}
    off = len(tensors) - len(resident)
    return resident, (f"place(): {off} tensors stay on the host" if off else "place(): all tensors resident")


# ----------------------------------------------------------------------------------------- batches
@dataclass
class BatchSpec:
    """Shapes, dtypes and memory categories of one training batch, plus where the description came from."""

    entries: dict[str, tuple[tuple[int, ...], torch.dtype, str]]
    source: str
    notes: list[str] = field(default_factory=list)

    def materialize(self, device: torch.device | str = "cpu", random: bool = False) -> dict[str, torch.Tensor]:
        """Tensors of the described shapes: zeros, or standard-normal floats with `random` (indices and
        labels stay 0). Fake tensors when called under a FakeTensorMode."""
        out = {}
        for key, (shape, dtype, _) in self.entries.items():
            if random and dtype.is_floating_point:
                out[key] = torch.randn(shape, device=device).to(dtype)
            else:
                out[key] = torch.zeros(shape, dtype=dtype, device=device)
        return out

    def with_batch_size(self, batch_size: int) -> BatchSpec:
        """The same batch with the leading (batch) dimension replaced."""
        entries = {k: ((batch_size, *shape[1:]), dtype, cat) for k, (shape, dtype, cat) in self.entries.items()}
        return BatchSpec(entries, self.source, list(self.notes))

    def shapes(self) -> dict[str, list[int]]:
        """Key -> shape, for records."""
        return {k: list(shape) for k, (shape, _, _) in self.entries.items()}


def _preload_active(method: Method, model: nn.Module) -> bool:
    options = getattr(method, "options", None)
    lpm = getattr(model, "lpm", None)
    return (
        lpm is not None
        and callable(getattr(lpm, "feature_shapes", None))
        and bool(getattr(options, "preload", False))
        and bool(getattr(options, "asymmetric", True))
        and bool(getattr(options, "use_lpm", True))
    )


def batch_spec(model: nn.Module, method: Method, res: int, batch_size: int, num_classes: int) -> BatchSpec:
    """What one training batch of `model` looks like.

    0. FPT/FPT+ whose options preload (LPM used, asymmetric input) are switched to their preloaded state
       first (`model.preloaded = True`, which `prepare_data` would set), so `place()` keeps the LPM on the
       host and the batch carries the preloaded features.
    1. `model.example_batch(batch_size, device)` when the model provides it (called on the meta device):
       FPT/FPT+ describe their preloaded key/value batches this way.
    2. FPT/FPT+ models without it, when their options preload: the side view plus `lpm_*` tensors shaped by
       `model.lpm.feature_shapes(res)` in the cache dtype (what `PreloadedDataset` yields), and the model
       is switched to its preloaded state (`model.preloaded = True`, so `place()` keeps the LPM on the host).
    3. Otherwise one tensor `[B, 3, size, size]` per entry of `method.views(res)`.
    The label `[B]` (int64) is always present. Non-view tensors are "preloaded features" in the breakdown.
    """
    views = method.views(res)
    notes: list[str] = []

    def category(key: str) -> str:
        return INPUTS if key == "label" or key in views else PRELOADED

    if _preload_active(method, model) and hasattr(model, "preloaded") and not model.preloaded:
        model.preloaded = True  # what prepare_data() would have done: the step consumes preloaded features
        notes.append("preloading emulated: model.preloaded=True (prepare_data not run)")
    maker = getattr(model, "example_batch", None)
    if callable(maker):
        example = maker(batch_size, torch.device("meta"))
        entries = {k: (tuple(v.shape), v.dtype, category(k)) for k, v in example.items() if isinstance(v, torch.Tensor)}
        source = "model.example_batch"
    elif _preload_active(method, model):
        from petlbench.fpt.cache import BATCH_PREFIX

        dtype = getattr(torch, str(getattr(method.options, "cache_dtype", "float32")))
        side_key = getattr(model, "side_view", None) or next(k for k in views if k != "lpm")
        side = views[side_key]
        entries = {side_key: ((batch_size, 3, side.size, side.size), torch.float32, INPUTS)}
        for name, (shape, kind) in model.lpm.feature_shapes(res).items():
            entries[BATCH_PREFIX + name] = (
                (batch_size, *shape),
                torch.int64 if kind == "index" else dtype,
                PRELOADED,
            )
        if hasattr(model, "preloaded"):
            model.preloaded = True
        source = "lpm.feature_shapes (preloaded)"
        notes.append(
            "model has no example_batch(); preloaded batch built from model.lpm.feature_shapes(res) "
            f"in the cache dtype {dtype} (what PreloadedDataset yields)"
        )
    else:
        entries = {k: ((batch_size, 3, v.size, v.size), torch.float32, INPUTS) for k, v in views.items()}
        source = "method.views"
        if getattr(getattr(method, "options", None), "preload", False) and getattr(model, "lpm", None) is not None:
            notes.append("preloading requested but no preloaded batch could be described: the LPM runs online")
    entries.setdefault("label", ((batch_size,), torch.int64, INPUTS))
    return BatchSpec(entries, source, notes)


# ----------------------------------------------------------------------------------------- fake / meta
def fakeify(model: nn.Module, fake_mode: Any) -> nn.Module:
    """Swap every meta parameter, buffer and tensor attribute of `model` for a fake CPU tensor, in place.

    Parameters keep `requires_grad` (frozen stays frozen); tied tensors stay tied. The fakes are created
    with `torch.empty_strided` under `fake_mode`, which allocates nothing.
    """
    memo: dict[int, torch.Tensor] = {}
    keep_alive: list[torch.Tensor] = []

    def fake_of(t: torch.Tensor, param: bool) -> torch.Tensor:
        key = id(t)
        if key not in memo:
            keep_alive.append(t)
            with fake_mode:
                new = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")
            memo[key] = nn.Parameter(new, requires_grad=t.requires_grad) if param else new
        return memo[key]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = fake_of(p, True)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake_of(b, False)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_meta:
                setattr(module, name, fake_of(value, False))
    return model


def meta_clone(model: nn.Module) -> nn.Module:
    """A structural copy of a (real) model whose parameters and buffers live on the meta device.

    Parameters are substituted through deepcopy's memo, so no parameter data is copied; requires_grad
    and training flags are kept.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def materialize_cpu(model: nn.Module) -> nn.Module:
    """Give a meta model real (zero-filled) CPU storage, in place, for counters that must execute it."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in _tensors(model):
            if t.is_floating_point() or t.is_complex():
                t.zero_()
    return model


def structure_signature(model: nn.Module, spec: BatchSpec, options: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
    """What forward FLOPs depend on: model/module classes, parameter shapes, attention flags, batch, options."""
    modules = tuple((name, type(m).__qualname__, getattr(m, "fused_attn", None)) for name, m in model.named_modules())
    tensors = tuple((name, tuple(t.shape), str(t.dtype)) for name, t in model.state_dict(keep_vars=True).items())
    batch = tuple((k, shape, str(dtype)) for k, (shape, dtype, _) in sorted(spec.entries.items()))
    return (type(model).__qualname__, modules, tensors, batch, repr(sorted((options or {}).items())))
