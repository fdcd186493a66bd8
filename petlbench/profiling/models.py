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
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from petlbench.core.method import BackboneSpec, BuildContext, Method, PetlModel
from petlbench.engine.build import build_model

ModuleT = TypeVar("ModuleT", bound=nn.Module)

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


def build_meta(method: Method, ctx: BuildContext) -> tuple[PetlModel, str]:
    """Build `method`'s model with every parameter on the meta device; returns (model, how it was built).

    Falls back to a CPU build converted to meta (allocates the weights once, transiently) for a method
    whose builder cannot run on meta; the second element says which path was taken.
    """
    meta_ctx = dataclasses.replace(ctx, device=torch.device("meta"), backbone=profiling_backbone(ctx.backbone))
    try:
        with torch.device("meta"), _SkipMetaInit():
            model = build_model(method, meta_ctx)
        if all(t.is_meta for t in _tensors(model)):
            return model, "meta"
        model = model.to("meta")
        return model, "meta (some tensors created off-meta, moved)"
    except Exception as error:  # noqa: BLE001 - fall back to a real CPU build, said in the result
        cpu_ctx = dataclasses.replace(meta_ctx, device=torch.device("cpu"))
        model = build_model(method, cpu_ctx)
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


def batch_spec(
    model: PetlModel, method: Method, res: int, batch_size: int, num_classes: int, prepared: bool = True
) -> BatchSpec:
    """What one training batch of `model` looks like, once its data is prepared (or, with `prepared=False`, as
    it would be without `prepare_data`: FPT/FPT+ then run the LPM online every step).

    With `prepared` the model is first switched to the state `prepare_data` would leave (`assume_prepared()`:
    FPT/FPT+ then keep the LPM on the host and consume preloaded features). The model then describes its batch
    (`example_batch`, on the meta device). Tensors named like a view are inputs; any other tensor is a prepared
    (preloaded) feature. The label `[B]` (int64) is always present.
    """
    views = method.views(res)
    notes: list[str] = []
    if prepared:
        model.assume_prepared()
    if model.one_off_work() is not None:
        notes.append("prepared state assumed (prepare_data not run): the batch carries preloaded features")
    example = model.example_batch(views, batch_size, torch.device("meta"))
    entries = {
        k: (tuple(v.shape), v.dtype, INPUTS if k == "label" or k in views else PRELOADED)
        for k, v in example.items()
        if isinstance(v, torch.Tensor)
    }
    entries.setdefault("label", ((batch_size,), torch.int64, INPUTS))
    return BatchSpec(entries, "model.example_batch", notes)


# ----------------------------------------------------------------------------------------- fake / meta
def fakeify(model: nn.Module, fake_mode: Any) -> nn.Module:
    """Swap every meta parameter, buffer and tensor attribute of `model` for a fake CPU tensor, in place.

    Parameters keep `requires_grad` (frozen stays frozen); tied tensors stay tied. The fakes are created
    with `torch.empty_strided` under `fake_mode`, which allocates nothing.
    """
    memo: dict[int, torch.Tensor] = {}
    param_memo: dict[int, nn.Parameter] = {}
    keep_alive: list[torch.Tensor] = []

    def fake_of(t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in memo:
            keep_alive.append(t)
            with fake_mode:
                memo[key] = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")
        return memo[key]

    def fake_param(p: nn.Parameter) -> nn.Parameter:
        key = id(p)
        if key not in param_memo:  # one fake per parameter, so tied weights stay tied
            param_memo[key] = nn.Parameter(fake_of(p), requires_grad=p.requires_grad)
        return param_memo[key]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = fake_param(p)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake_of(b)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_meta:
                setattr(module, name, fake_of(value))
    return model


def meta_clone(model: ModuleT) -> ModuleT:
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
