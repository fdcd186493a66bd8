"""FLOPs of the forward pass and of one training step, per image, attention included.

Unit
----
Every number is in **GFLOPs per image with one fused multiply-add = one FLOP** (fvcore's convention, the
unit of the papers' "FLOPs (G)" column; a "GMAC"). `FLOPS_UNIT` says so and every record carries it.

What is counted: matmul-class work (linear/addmm/mm/bmm/matmul/einsum, convolution, and attention's two
batched products) plus fvcore's norm handles (layer_norm counts ~0.1 % of a ViT). Elementwise work
(softmax, GELU, residual adds, scaling, dropout, top-k, gathers) is not counted, by convention, in any
method; skipped ops are listed in the record (`flops_skipped_ops`).

Forward (`fwd_gflops`): fvcore's `FlopCountAnalysis` on the method's model at batch 1 (eval mode,
zero-filled weights: counts depend on shapes only), with a handle for every matmul-class op fvcore
skips: `aten::scaled_dot_product_attention` (the fused attention of timm ViTs: Q·Kᵀ plus P·V =
B·H·N·M·(d + d_v) multiply-adds), `aten::baddbmm`/`aten::addbmm`, `aten::mv`/`aten::addmv` and
`aten::dot`. A skipped op that is matmul-class raises instead of counting zero.

Training step (`train_step_gflops`): forward + backward of one step of the trainer's loop, per image.
Rule: fvcore forward + (backward multiply-adds measured by `torch.utils.flop_counter.FlopCounterMode` on
the same step ÷ 2 ÷ batch size). The backward is measured, not assumed to be 2× forward: it is ~2×
forward for full fine-tuning, 0 for linear probing (nothing upstream of the head needs gradients) and
in between for PETL methods that need input gradients through frozen blocks. The optimizer update is
elementwise and not counted. Attention counts the same on every kernel (`flop_counter`): forward Q·Kᵀ and P·V,
backward the four gradient products, whether torch runs the CPU or CUDA flash kernel, the memory-efficient or
cuDNN kernel, the math kernel or the explicit softmax path (fused kernels' recomputation of Q·Kᵀ is not counted).

Cross-check (`torch_forward_gflops`): `FlopCounterMode`'s forward ÷ 2 (it counts 2 FLOPs per
multiply-add); it equals fvcore + handles minus layer_norm (tests hold them within 1 %).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

FLOPS_UNIT = "GFLOPs per image (1 fused multiply-add = 1 FLOP, fvcore convention)"
# The papers' "FLOPs (G)" (87.84 G for ViT-B/16 at 512 px) is fvcore's default count, which has no handle for fused
# attention: it equals petlbench's count without attention's two products. petlbench records both.
NO_ATTENTION_RULE = (
    "attention not counted (the papers' convention, fvcore's default on fused attention): the forward count minus "
    "Q·Kᵀ and P·V (scaled_dot_product_attention and the explicit path's matmuls)"
)
# fvcore operator names that only attention produces in petlbench's models (timm ViTs, FPT's fusion, peft adapters).
ATTENTION_OPERATORS = frozenset({"scaled_dot_product_attention", "matmul", "bmm", "baddbmm"})


def attention_macs(by_operator: Mapping[str, int | float]) -> int | float:
    """Multiply-adds of attention's Q·Kᵀ and P·V in an fvcore per-operator count."""
    return sum(v for k, v in by_operator.items() if k in ATTENTION_OPERATORS)


FLOPS_RULE = (
    "train_step = fvcore forward + FlopCounterMode backward / 2 (measured on the real step), per image; "
    "optimizer update not counted"
)

# Ops that do matmul-class work: if fvcore skips one of these, the count would be wrong -> error.
MATMUL_CLASS_OPS = frozenset(
    {
        "aten::addmm",
        "aten::mm",
        "aten::bmm",
        "aten::matmul",
        "aten::linear",
        "aten::einsum",
        "aten::_convolution",
        "aten::conv1d",
        "aten::conv2d",
        "aten::conv3d",
        "aten::convolution",
        "aten::conv_transpose1d",
        "aten::conv_transpose2d",
        "aten::baddbmm",
        "aten::addbmm",
        "aten::mv",
        "aten::addmv",
        "aten::dot",
        "aten::vdot",
        "aten::bilinear",
        "aten::tensordot",
        "aten::chain_matmul",
        "aten::linalg_multi_dot",
        "aten::scaled_dot_product_attention",
        "aten::_native_multi_head_attention",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_cudnn_attention",
    }
)


def _shape(value: Any) -> list[int]:
    return list(value.type().sizes())


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for `aten::scaled_dot_product_attention`: Q·Kᵀ plus P·V multiply-adds.

    q `[..., N, d]`, k `[..., M, d]`, v `[..., M, d_v]` -> prod(q's leading dims) · N · M · (d + d_v).
    Softmax, scaling and masks are elementwise and not counted (as on the explicit path).
    """
    q, k, v = (_shape(inputs[i]) for i in range(3))
    batch = math.prod(q[:-2])
    return int(batch * q[-2] * k[-2] * (q[-1] + v[-1]))


def baddbmm_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """`aten::baddbmm(input, b1 [b,n,m], b2 [b,m,p])` and `aten::addbmm`: b·n·m·p multiply-adds."""
    b1, b2 = _shape(inputs[1]), _shape(inputs[2])
    return int(b1[0] * b1[1] * b1[2] * b2[2])


def mv_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """`aten::mv(mat [n,m], vec [m])`: n·m multiply-adds."""
    mat = _shape(inputs[0])
    return int(mat[0] * mat[1])


def addmv_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """`aten::addmv(input, mat [n,m], vec [m])`: n·m multiply-adds."""
    mat = _shape(inputs[1])
    return int(mat[0] * mat[1])


def dot_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """`aten::dot(a [n], b [n])`: n multiply-adds."""
    return int(_shape(inputs[0])[0])


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::baddbmm": baddbmm_flop_jit,
    "aten::addbmm": baddbmm_flop_jit,
    "aten::mv": mv_flop_jit,
    "aten::addmv": addmv_flop_jit,
    "aten::dot": dot_flop_jit,
    "aten::vdot": dot_flop_jit,
}


class UncountedMatmulError(RuntimeError):
    """fvcore skipped an op that does matmul-class work: the count would silently be too low."""


_aten = torch.ops.aten
# Ops whose cost dominates a ViT forward and whose output shapes do not depend on values.
_SHAPE_ONLY_OPS = frozenset(
    {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._softmax.default,
        _aten.gelu.default,
    }
)


class ShapeOnlyCompute(TorchDispatchMode):
    """Skip the arithmetic of the heavy ops (matmuls, fused attention, softmax, GELU).

    fvcore needs a real execution to trace, but its counts depend only on shapes. Below the tracer
    (the trace records the high-level ops), this mode computes each heavy op's outputs on the meta
    device and returns uninitialised CPU tensors of the same shapes, strides and dtypes; everything else
    runs for real on those values. Values are meaningless, shapes and the traced graph are exact
    (tested against a normal trace).

    The JIT tracer records convolutions differently when any Python dispatch mode is active (the
    `_convolution` node goes missing), so the mode steps aside while a conv module runs
    (`attach_conv_bypass`): patch embeddings are cheap anyway.
    """

    def attach_conv_bypass(self, model: nn.Module) -> list[Any]:
        """Forward hooks that pop this mode around every convolution module of `model`."""
        from torch.utils._python_dispatch import _pop_mode, _push_mode

        popped: list[Any] = []

        def pre(*_: Any) -> None:
            popped.append(_pop_mode())

        def post(*_: Any) -> None:
            _push_mode(popped.pop())

        handles = []
        for module in model.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        return handles

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func not in _SHAPE_ONLY_OPS or torch._C._get_tracing_state() is not None:
            return func(*args, **kwargs)  # (some ops are dispatched with the tracer still active)

        def to_meta(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="meta")
            return x

        out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        return tree_map(
            lambda t: (
                torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype)
                if isinstance(t, torch.Tensor)
                else t
            ),
            out,
        )


class _BatchAdapter(nn.Module):
    """Positional tensors -> the batch dict a PetlModel's forward takes (fvcore traces positional inputs)."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(dict(zip(self.keys, tensors, strict=True)))


def flop_count_analysis(module: nn.Module, inputs: tuple[Any, ...], handles: bool = True) -> Any:
    """fvcore `FlopCountAnalysis` with petlbench's extra handles (quiet: warnings off)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's import uses the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    if handles:
        analysis.set_op_handle(**EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def fvcore_forward(
    model: nn.Module, batch: Mapping[str, torch.Tensor], strict: bool = True, shape_only: bool = True
) -> dict[str, Any]:
    """fvcore count of `model(batch)` (CPU tensors; divide by the batch size for per-image).

    Returns {"total": multiply-adds, "by_operator": {...}, "skipped_ops": {name: calls}}. With `strict`,
    a skipped matmul-class op raises `UncountedMatmulError`. `shape_only` traces under `ShapeOnlyCompute`
    (same graph, none of the heavy arithmetic).
    """
    keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
    adapter = _BatchAdapter(model, keys)
    handles: list[Any] = []
    was_training = model.training
    model.eval()
    try:
        mode = ShapeOnlyCompute() if shape_only else None
        handles = mode.attach_conv_bypass(model) if mode is not None else []
        with torch.no_grad(), mode if mode is not None else contextlib.nullcontext():
            analysis = flop_count_analysis(adapter, tuple(batch[k] for k in keys))
            total = int(analysis.total())
            by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
            skipped = dict(Counter(analysis.unsupported_ops()))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    bad = sorted(op for op in skipped if op in MATMUL_CLASS_OPS)
    if strict and bad:
        raise UncountedMatmulError(f"fvcore has no handle for matmul-class ops {bad}; add one in EXTRA_HANDLES")
    return {"total": total, "by_operator": by_operator, "skipped_ops": skipped}


def _sdpa_forward_flop(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Fused SDPA forward (first arguments q, k, v): Q·Kᵀ plus P·V, 2 FLOPs per multiply-add."""
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query, key, value))


def _sdpa_backward_flop(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """Fused SDPA backward (first arguments dO, q, k, v): dP, dV, dQ and dK, i.e. twice the forward."""
    return 2 * _sdpa_forward_flop(query, key, value)


# FlopCounterMode formulas for every fused attention kernel, so that attention counts the same whichever kernel
# torch picks. torch 2.14 has no formula for the CPU flash kernel (attention counted 0 FLOPs forward and backward
# on CPU), and its fused backward formulas add the kernels' recomputation of Q·Kᵀ, which the math kernel and the
# explicit softmax path do not do: petlbench counts the algorithm's four gradient products on every kernel.
_FORWARD_KERNELS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
_BACKWARD_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_fused_attention_overrideable_backward",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward",
)


def attention_formulas() -> dict[Any, Any]:
    """petlbench's attention formulas keyed by the op packets this torch has (FlopCounterMode's `custom_mapping`)."""
    from torch.utils.flop_counter import flop_registry

    mapping: dict[Any, Any] = {}
    for names, formula in ((_FORWARD_KERNELS, _sdpa_forward_flop), (_BACKWARD_KERNELS, _sdpa_backward_flop)):
        for name in names:
            packet = getattr(torch.ops.aten, name, None)
            if packet is not None and (formula is _sdpa_backward_flop or packet not in flop_registry):
                mapping[packet] = formula
    return mapping


def flop_counter() -> Any:
    """A silent `FlopCounterMode` that counts attention the same on every kernel torch may pick."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=attention_formulas())


def torch_flops(fn: Any) -> int:
    """Total FlopCounterMode count (2 per multiply-add) of running `fn()`; works on meta/fake tensors."""
    counter = flop_counter()
    with counter:
        fn()
    return int(counter.get_total_flops())


def torch_forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """FlopCounterMode forward count of `model(batch)` in eval mode (2 per multiply-add).

    Grad mode stays on (FlopCounterMode's module tracker trips over some no-grad views); nothing runs
    backward, so only the forward is counted. Use meta or fake tensors to avoid any computation.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return torch_flops(lambda: model(dict(batch)))
    finally:
        model.train(was_training)


def to_gflops_per_image(macs: float, batch_size: int) -> float:
    """Multiply-adds of a batch -> GFLOPs per image in the fvcore convention (1 MAC = 1 FLOP)."""
    return macs / batch_size / 1e9
