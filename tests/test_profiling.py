"""Profilers against known values: closed-form FLOPs, fvcore vs FlopCounterMode, the memory estimator vs
the CPU allocator's own events, a fake NVML backend, a fake clock."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from test_contract import CASES
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BackboneSpec, Method, PetlModel, method_keys
from petlbench.profiling import (
    FLOPS_UNIT,
    PowerSampler,
    StepTimer,
    UncountedMatmulError,
    cpu_profiler_peak,
    estimate_model_memory,
    estimate_training_memory,
    flop_count_analysis,
    flop_counter,
    fvcore_forward,
    make_optimizer,
    memory_sweep,
    profile_methods,
    read_cuda_peak,
    run_efficiency,
    torch_flops,
    train_step,
)
from petlbench.profiling.models import BatchSpec, batch_spec, build_meta, make_context, materialize_cpu
from petlbench.profiling.profile import make_method, parse_mem

torch.set_num_threads(1)
TINY = BackboneSpec("test_vit")


# ----------------------------------------------------------------------------------------- helpers
class ViTClassifier(PetlModel):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.vit(batch["image"])


class TinyFull(Method):
    key = "tiny_full"
    display_name = "tiny full"

    def build(self, ctx):  # noqa: ANN001, ANN201
        return ViTClassifier(create_backbone(ctx.backbone, ctx.res, ctx.num_classes))


class TinyLinear(TinyFull):
    key = "tiny_linear"

    def build(self, ctx):  # noqa: ANN001, ANN201
        model = super().build(ctx)
        model.vit.requires_grad_(False)
        model.vit.head.requires_grad_(True)
        return model


class MLP(PetlModel):
    def __init__(self, freeze_first: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(256, 1024), nn.Linear(1024, 10)
        if freeze_first:
            self.fc1.requires_grad_(False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc2(self.fc1(batch["x"]).relu())


def mlp_spec(batch: int = 32) -> BatchSpec:
    return BatchSpec({"x": ((batch, 256), torch.float32, "inputs"), "label": ((batch,), torch.int64, "inputs")}, "test")


def meta_model(factory):  # noqa: ANN001, ANN201
    with torch.device("meta"):
        return factory()


# ----------------------------------------------------------------------------------------- FLOPs
def test_linear_flops_closed_form() -> None:
    batch, fan_in, fan_out = 4, 32, 16
    lin = nn.Linear(fan_in, fan_out)
    x = torch.randn(batch, fan_in)
    assert flop_count_analysis(lin, (x,)).total() == batch * fan_in * fan_out  # fvcore: 1 MAC = 1 FLOP
    assert torch_flops(lambda: lin(x)) == 2 * batch * fan_in * fan_out  # FlopCounterMode: 2 per MAC


class SDPA(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_flops_closed_form_and_failure_mode() -> None:
    b, h, n, d = 2, 4, 64, 32
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    assert flop_count_analysis(SDPA(), (q, k, v)).total() == 2 * b * h * n * n * d
    assert torch_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * b * h * n * n * d
    bare = flop_count_analysis(SDPA(), (q, k, v), handles=False)
    assert bare.total() == 0 and "aten::scaled_dot_product_attention" in bare.unsupported_ops()
    # cross-attention with M != N keys and a different value width
    kk, vv = torch.randn(b, h, 10, d), torch.randn(b, h, 10, 16)
    assert flop_count_analysis(SDPA(), (q, kk, vv)).total() == b * h * n * 10 * (d + 16)


# Every attention kernel that can be forced on CPU: (model attention flag, SDPA backend, op that must run).
CPU_KERNELS = {
    "cpu_flash": ("fused", SDPBackend.FLASH_ATTENTION, "_scaled_dot_product_flash_attention_for_cpu"),
    "math": ("fused", SDPBackend.MATH, "bmm"),
    "explicit": ("explicit", None, "bmm"),
}


def _kernel(name: str) -> contextlib.AbstractContextManager[None]:
    backend = CPU_KERNELS[name][1]
    return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
def test_attention_flops_forward_and_backward_closed_form_on_every_kernel(kernel: str) -> None:
    """Q·Kᵀ + P·V forward (2 FLOPs per multiply-add) and the four gradient products backward, on each kernel."""
    b, h, n, m, d, dv = 2, 3, 16, 12, 8, 8  # the CPU flash kernel needs equal key and value widths
    q = torch.randn(b, h, n, d, requires_grad=True)
    k, v = torch.randn(b, h, m, d, requires_grad=True), torch.randn(b, h, m, dv, requires_grad=True)
    forward = 2 * b * h * n * m * (d + dv)
    counter = flop_counter()
    with _kernel(kernel), counter:
        out = F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == forward
    assert CPU_KERNELS[kernel][2] in {str(op).split(".")[-1] for op in counter.get_flop_counts()["Global"]}
    with _kernel(kernel), counter:
        out.sum().backward()
    assert counter.get_total_flops() == 2 * forward  # (the counter restarts on entry: backward alone)


@pytest.mark.parametrize("kernel", list(CPU_KERNELS))
def test_full_finetuning_train_step_is_three_forwards_on_every_kernel(kernel: str) -> None:
    """Forward + backward of a full fine-tune ≈ 3× the forward (only the image's own gradient is skipped)."""
    with _kernel(kernel):
        row = profile_methods(
            ["full_ft"], BackboneSpec("vit_tiny_patch16_224"), 64, 2, attention=CPU_KERNELS[kernel][0]
        )[0]
    assert (
        row["flops_by_operator"].get("scaled_dot_product_attention", 0) + row["flops_by_operator"].get("matmul", 0) > 0
    )
    assert row["train_step_gflops"] / row["fwd_gflops"] == pytest.approx(3.0, rel=0.02)
    reference = profile_methods(["full_ft"], BackboneSpec("vit_tiny_patch16_224"), 64, 2, attention="explicit")[0]
    assert row["train_step_gflops"] == pytest.approx(reference["train_step_gflops"], rel=1e-9)


class Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(4, 4, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bil(batch["x"], batch["x"])


def test_unhandled_matmul_op_is_an_error() -> None:
    with pytest.raises(UncountedMatmulError, match="bilinear"):
        fvcore_forward(Bilinear(), {"x": torch.randn(2, 4)})


def _tiny_vit(res: int, attention: str) -> tuple[nn.Module, BatchSpec]:
    """timm's vit_tiny (width 192): layer_norm, which only fvcore counts, stays well under 1 %."""
    model, _ = build_meta(TinyFull(), make_context(BackboneSpec("vit_tiny_patch16_224"), res, 5))
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = attention == "fused"
    return model, batch_spec(model, TinyFull(), res, 1, 5)


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_fvcore_with_handles_agrees_with_flop_counter_on_tiny_vit(attention: str) -> None:
    model, spec = _tiny_vit(64, attention)
    materialize_cpu(model)
    batch = spec.materialize("cpu")
    fv = fvcore_forward(model, batch)
    assert fv["by_operator"].get("scaled_dot_product_attention" if attention == "fused" else "matmul", 0) > 0
    torch_macs = torch_flops(lambda: model(batch)) / 2
    assert fv["total"] == pytest.approx(torch_macs, rel=0.01)
    # the only convention difference: fvcore counts layer_norm, FlopCounterMode does not
    assert fv["total"] - fv["by_operator"]["layer_norm"] == torch_macs
    # heavy arithmetic skipped while tracing: same graph, same count
    assert fvcore_forward(model, batch, shape_only=False) == fv


def test_fused_and_explicit_attention_count_the_same() -> None:
    counts = []
    for attention in ("fused", "explicit"):
        model, spec = _tiny_vit(64, attention)
        counts.append(fvcore_forward(materialize_cpu(model), spec.materialize("cpu"))["total"])
    assert counts[0] == counts[1]


def test_vit_base_224_forward_gflops_analytic() -> None:
    """fvcore + handle on vit_base_patch16_224 = 17.58 G: 12 blocks of 12·D² per token,
    attention 2·N²·D per block, patch conv, norms."""
    rows = profile_methods(["full_ft"], BackboneSpec("vit_base_patch16_224"), 224, 2)
    assert rows[0]["fwd_gflops"] == pytest.approx(17.58, abs=0.01)
    assert rows[0]["flops_unit"] == FLOPS_UNIT and "1 fused multiply-add = 1 FLOP" in FLOPS_UNIT
    assert rows[0]["flops_by_operator"]["scaled_dot_product_attention"] == pytest.approx(2 * 197**2 * 768 * 12 / 1e9)


# ----------------------------------------------------------------------------------------- memory estimator
def _real_step_peak(model: nn.Module, spec: BatchSpec, steps_before: int = 2) -> int:
    torch.manual_seed(0)
    batch = spec.materialize("cpu", random=True)
    optimizer = make_optimizer(model.trainable_parameters(), foreach=False)
    for i in range(steps_before):
        train_step(model, batch, optimizer, global_step=i)
    return cpu_profiler_peak(lambda: train_step(model, batch, optimizer, global_step=steps_before))["peak_bytes"]


@pytest.mark.parametrize("freeze_first", [False, True])
def test_estimator_matches_cpu_allocator_on_mlp(freeze_first: bool) -> None:
    est = estimate_model_memory(meta_model(lambda: MLP(freeze_first)), mlp_spec(), target="cpu")
    measured = _real_step_peak(MLP(freeze_first), mlp_spec())
    assert abs(est.step_peak_increase_bytes - measured) <= 64
    if freeze_first:
        assert est.step_peak_increase_bytes == 262144  # no gradient storage for fc1


def test_estimator_persistent_memory_is_analytic() -> None:
    est = estimate_model_memory(meta_model(MLP), mlp_spec(), target="cpu")
    params = (256 * 1024 + 1024 + 1024 * 10 + 10) * 4
    assert params == 1_093_672
    assert est.breakdown_bytes["parameters"] == params
    assert est.breakdown_bytes["optimizer_state"] == 2 * params + 4 * 4  # exp_avg, exp_avg_sq + 4 `step` scalars
    frozen = estimate_model_memory(meta_model(lambda: MLP(True)), mlp_spec(), target="cpu")
    assert frozen.breakdown_bytes["optimizer_state"] == 2 * (1024 * 10 + 10) * 4 + 2 * 4


def _measure_vit(method: Method, backbone: BackboneSpec, res: int, batch: int, attention: str) -> tuple[int, int]:
    est = estimate_training_memory(method, backbone, res, batch, attention=attention, target="cpu")
    model = method.build(make_context(backbone, res, 5, device="cpu"))
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = attention == "fused"
    return est.step_peak_increase_bytes, _real_step_peak(model, batch_spec(model, method, res, batch, 5))


@pytest.mark.parametrize("attention", ["fused", "explicit"])
@pytest.mark.parametrize("method", [TinyFull, TinyLinear])
def test_estimator_matches_cpu_allocator_on_tiny_vit(method: type[Method], attention: str) -> None:
    """vit_tiny (5.7 M parameters) at 224 px, batch 8: the estimate equals the CPU allocator's peak over the
    same steady-state step (239,568,028 B fused / 284,049,052 B explicit, full FT)."""
    estimated, measured = _measure_vit(method(), BackboneSpec("vit_tiny_patch16_224"), 224, 8, attention)
    assert estimated == pytest.approx(measured, rel=0.05)
    assert abs(estimated - measured) <= 16 * 1024


class FrozenPatchEmbed(TinyFull):
    def build(self, ctx):  # noqa: ANN001, ANN201
        model = super().build(ctx)
        model.vit.patch_embed.requires_grad_(False)
        return model


@pytest.mark.parametrize("attention", ["fused", "explicit"])
def test_estimator_is_exact_for_dispatched_tensors(attention: str) -> None:
    """What the estimator cannot see: scratch buffers allocated inside kernels. On CPU the largest one is
    oneDNN's convolution backward (the patch embedding), ~1 MB whatever the model size, which is 20 % of
    test_vit's 2 MB step at 64 px. Without a convolution backward the two agree to the last block."""
    estimated, measured = _measure_vit(FrozenPatchEmbed(), TINY, 64, 4, attention)
    assert abs(estimated - measured) <= 64
    estimated, measured = _measure_vit(TinyFull(), TINY, 64, 4, attention)
    assert 0 < measured - estimated < 2**20  # the conv-backward scratch, invisible to a dispatch-level tracker


@pytest.mark.parametrize("attention", ["fused", "explicit"])
@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_meta_engine_equals_fake_engine_and_full_warmup(attention: str, target: str) -> None:
    def run(engine: str, warmup: str) -> int:
        return estimate_training_memory(
            TinyFull(), TINY, 64, 4, attention=attention, target=target, engine=engine, warmup=warmup
        ).peak_bytes

    reference = run("fake", "full")
    assert run("fake", "prime") == reference
    assert run("meta", "prime") == reference


# (meta engine == fake engine for every registered method: test_contract.py)


def test_estimator_first_step_and_breakdown() -> None:
    est = estimate_training_memory(TinyFull(), TINY, 256, 8, engine="fake", warmup="full")
    assert sum(est.breakdown_bytes.values()) == est.peak_bytes and est.peak_phase == "backward"
    # the first step runs backward without AdamW state: its peak is lower by exactly that state
    assert est.peak_bytes - est.first_step_peak_bytes == est.breakdown_bytes["optimizer_state"] > 0
    d = est.to_dict()
    assert d["est_peak_mem_mb"] == est.peak_bytes / 2**20 and d["mem_unit"].startswith("MiB")
    assert est.peak_bytes % 512 == 0  # CUDA target: 512-byte blocks


def test_explicit_attention_needs_more_memory_and_is_recorded() -> None:
    fused = estimate_training_memory(TinyFull(), TINY, 256, 8, attention="fused")
    explicit = estimate_training_memory(TinyFull(), TINY, 256, 8, attention="explicit")
    # the saved softmax maps: 6 blocks x [8, 2, 257, 257] fp32 (+ one transient in softmax backward)
    maps = 6 * 8 * 2 * 257 * 257 * 4
    assert maps <= explicit.peak_bytes - fused.peak_bytes <= maps * 7 / 6 + 2**20
    assert (fused.attention, explicit.attention) == ("fused", "explicit")
    auto = estimate_training_memory(TinyFull(), TINY, 256, 8)
    assert auto.attention == "fused" and auto.peak_bytes == fused.peak_bytes  # timm's default


def test_estimates_are_deterministic() -> None:
    a = estimate_training_memory(TinyFull(), TINY, 64, 4)
    b = estimate_training_memory(TinyFull(), TINY, 64, 4)
    assert (a.peak_bytes, a.breakdown_bytes) == (b.peak_bytes, b.breakdown_bytes)


@pytest.mark.slow
def test_estimator_allocates_no_real_memory() -> None:
    code = (
        "import resource, json, torch\n"
        "from petlbench.core.method import BackboneSpec\n"
        "from petlbench.profiling import estimate_training_memory\n"
        "from petlbench.profiling.profile import make_method\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "est = estimate_training_memory(make_method('full_ft'), BackboneSpec('vit_base_patch16_224'), 1024, 4,"
        " attention='explicit')\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'grow_kib': after - before, 'peak': est.peak_bytes}))\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["peak"] > 20 * 2**30  # the estimate is tens of GiB ...
    assert result["grow_kib"] < 2**20  # ... while the process grew by less than 1 GiB


# ----------------------------------------------------------------------------------------- methods
@pytest.fixture(scope="module")
def tiny_rows() -> list[dict]:
    return profile_methods(method_keys(), TINY, 64, 4, num_classes=3)


def test_profile_methods_all_methods(tiny_rows: list[dict]) -> None:
    required = {
        "method",
        "trainable",
        "total",
        "ratio_pct",
        "fwd_gflops",
        "train_step_gflops",
        "flops_unit",
        "est_peak_mem_mb",
        "est_breakdown_mb",
        "attention",
    }
    by_key = {r["method"]: r for r in tiny_rows}
    assert list(by_key) == method_keys()
    for row in tiny_rows:
        assert required <= set(row), row["method"]
        assert row["train_step_gflops"] >= row["fwd_gflops"] > 0
        assert row["est_peak_mem_mb"] > 0 and row["attention"] in ("fused", "explicit", "mixed")
        # FlopCounterMode cross-check of the forward (differs from fvcore by layer_norm only)
        layer_norm = row["flops_by_operator"].get("layer_norm", 0.0)
        assert row["torch_fwd_gflops"] == pytest.approx(row["fwd_gflops"] - layer_norm, rel=1e-9)
    # nothing upstream of the head needs gradients when linear probing: backward ~ head only
    assert by_key["linear_probe"]["bwd_gflops"] < 0.01 * by_key["linear_probe"]["fwd_gflops"]
    assert by_key["full_ft"]["train_step_gflops"] > 2.5 * by_key["full_ft"]["fwd_gflops"]
    # methods that preload (FPT, FPT+: their case rows say so) carry the features and report the one-off work
    for key, row in by_key.items():
        preloads = row.get("preload_gflops_per_image") is not None
        assert key not in CASES or preloads == CASES[key].preloads, key
        if not preloads:
            continue
        assert row["est_breakdown_mb"]["preloaded_features"] > 0
        assert row["preload_gflops_per_image"] > 0
        assert row["fwd_gflops_no_preload"] == pytest.approx(row["fwd_gflops"] + row["preload_gflops_per_image"])


def test_profile_measure_on_cpu_reports_not_available() -> None:
    row = profile_methods(["linear_probe"], TINY, 32, 2, measure=True, device="cpu")[0]
    assert row["train_images_per_s"] > 0
    assert row["measured_peak_allocated_mb"] is None and row["mem_reason"]
    assert row["power"]["energy_j"] is None and row["power"]["reason"]


def test_memory_sweep_budget_and_fpt_plus_below_backprop_methods() -> None:
    rows = memory_sweep(["full_ft", "lora", "fpt_plus"], TINY, [64, 128], 4, gpu_mem_bytes="64KB")
    assert len(rows) == 6 and all(r["exceeds_budget"] is True for r in rows)
    assert all(r["exceeds_budget"] is None for r in memory_sweep(["bitfit"], TINY, [64], 2))
    for res in (64, 128):
        cell = {r["method"]: r["est_peak_mem_mb"] for r in rows if r["res"] == res}
        assert cell["fpt_plus"] < cell["lora"] < cell["full_ft"]
    bad = memory_sweep(["full_ft"], TINY, [70], 2)[0]
    assert bad["est_peak_mem_mb"] is None and "divisible" in bad["error"]


def test_parse_mem() -> None:
    assert parse_mem("48GB") == parse_mem("48GiB") == 48 * 2**30
    assert parse_mem("24576MB") == 24 * 2**30 and parse_mem(None) is None


@pytest.mark.parametrize("key", ["lora", "fpt_plus"])
def test_run_efficiency_leaves_the_model_alone(key: str) -> None:
    method = make_method(key)
    ctx = make_context(TINY, 64, 3, device="cpu")
    model = method.build(ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    started = time.perf_counter()
    eff = run_efficiency(model, method, ctx, batch_size=4, device=torch.device("cpu"))
    assert time.perf_counter() - started < 30
    assert "efficiency_error" not in eff, eff.get("efficiency_error")
    assert eff["est_peak_mem_mb"] > 0 and eff["fwd_gflops"] > 0 and eff["flops_unit"] == FLOPS_UNIT
    for name, p in model.named_parameters():
        assert not p.is_meta and torch.equal(p.detach(), before[name])


# ----------------------------------------------------------------------------------------- CUDA helpers
def test_cuda_peak_off_cuda_is_none_with_reason() -> None:
    record = read_cuda_peak(torch.device("cpu"))
    assert record["measured_peak_allocated_mb"] is None and record["nvml_process_mem_mb"] is None
    assert "CUDA" in record["mem_reason"]


# ----------------------------------------------------------------------------------------- timing
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_step_timer_median_warmup_and_images() -> None:
    clock, syncs = FakeClock(), []
    timer = StepTimer(warmup_steps=2, clock=clock, sync=lambda: syncs.append(1))
    for seconds in (5.0, 3.0, 1.0, 2.0, 4.0):  # the first two are warm-up
        timer.start_step()
        clock.now += seconds
        timer.end_step(16)
    summary = timer.summary()
    assert summary["steps_timed"] == 3 and summary["warmup_steps_excluded"] == 2
    assert summary["median_step_s"] == 2.0 and summary["train_images_per_s"] == 8.0
    assert summary["mean_images_per_s"] * summary["timed_seconds"] == pytest.approx(summary["timed_images"])
    assert len(syncs) == 10  # both ends of every step
    empty = StepTimer(warmup_steps=3).summary()
    assert empty["train_images_per_s"] is None and empty["reason"]


# ----------------------------------------------------------------------------------------- power
class FakeNvml:
    """Scripted NVML: power(t) in mW on a virtual clock, energy counter = its integral in mJ."""

    def __init__(
        self,
        clock: FakeClock,
        power_w,
        energy: bool = True,
        fail_init: bool = False,  # noqa: ANN001
        mig: bool = False,
        devices: dict[str, int] | None = None,
        others: tuple[int, ...] = (),
    ) -> None:
        self.clock, self.power_w, self.energy = clock, power_w, energy
        self.fail_init, self.mig = fail_init, mig
        self.devices = devices or {"GPU-aaaa": 0}
        self.others = others
        self.power_field = "fake-instant"
        self.shut = False

    def init(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVMLError_LibraryNotFound")

    def shutdown(self) -> None:
        self.shut = True

    def handle(self, index: int, uuid: str | None) -> int:
        return self.devices[uuid] if uuid else index

    def name(self, handle: int) -> str:
        return f"Fake GPU {handle}"

    def power_mw(self, handle: int) -> float:
        return 1000.0 * self.power_w(self.clock())

    def energy_mj(self, handle: int) -> float | None:
        if not self.energy:
            return None
        t, step, total = 0.0, 0.001, 0.0  # numerical integral of the scripted power, in mJ
        while t < self.clock() - 1e-12:
            total += self.power_w(t) * step * 1000.0
            t += step
        return total

    def mig_enabled(self, handle: int) -> bool:
        return self.mig

    def processes(self, handle: int) -> dict[int, int | None]:
        return {12345: 512 * 2**20, **{pid: 1 for pid in self.others}}


def drive(sampler: PowerSampler, clock: FakeClock, seconds: float, dt: float = 0.1) -> dict:
    sampler.start()
    for _ in range(round(seconds / dt)):
        clock.now += dt
        sampler.sample()
    return sampler.stop()


def test_power_constant_trace() -> None:
    clock = FakeClock()
    fake = FakeNvml(clock, lambda t: 200.0)
    result = drive(
        PowerSampler(0, nvml=fake, clock=clock, sync=lambda: None, background=False, pid=12345, uuid="GPU-aaaa"),
        clock,
        10.0,
    )
    assert result["energy_j"] == pytest.approx(2000.0, rel=0.005)
    assert result["power_avg_w"] == pytest.approx(200.0, rel=0.005)
    assert result["power_peak_w"] == 200.0 and result["power_mean_sampled_w"] == 200.0
    assert result["energy_source"] == "nvml_energy_counter" and result["reason"] is None
    assert result["process_mem_peak_mb"] == 512.0 and result["gpu_shared"] is False
    assert result["interval_s"] == 0.1 and fake.shut


def test_power_step_trace_and_counterless_backend() -> None:
    def trace(t: float) -> float:
        return 100.0 if t < 5.0 else 300.0

    for energy in (True, False):
        clock = FakeClock()
        result = drive(
            PowerSampler(
                0, nvml=FakeNvml(clock, trace, energy=energy), clock=clock, sync=lambda: None, background=False
            ),
            clock,
            10.0,
        )
        assert result["power_peak_w"] == 300.0
        assert result["energy_j"] == pytest.approx(2000.0, rel=0.02)  # 5 s x 100 W + 5 s x 300 W
        assert result["power_avg_w"] <= result["power_peak_w"] and result["avg_le_peak"]
        assert result["energy_source"].startswith("nvml_energy_counter" if energy else "nvml_power_poll")


def test_power_not_available() -> None:
    clock = FakeClock()
    for fake, words in (
        (FakeNvml(clock, lambda t: 1.0, fail_init=True), "NVMLError_LibraryNotFound"),
        (FakeNvml(clock, lambda t: 1.0, mig=True), "MIG"),
    ):
        result = PowerSampler(0, nvml=fake, clock=clock, sync=lambda: None).start().stop()
        assert words in result["reason"]
        assert all(result[k] is None for k in ("power_peak_w", "power_avg_w", "energy_j", "n_samples"))


def test_power_maps_the_gpu_by_uuid_and_flags_shared_gpus() -> None:
    clock = FakeClock()
    fake = FakeNvml(clock, lambda t: 50.0, devices={"GPU-aaaa": 1, "GPU-bbbb": 0}, others=(999,))
    result = drive(
        PowerSampler(0, nvml=fake, uuid="GPU-aaaa", clock=clock, sync=lambda: None, background=False, pid=12345),
        clock,
        1.0,
    )
    assert result["device_name"] == "Fake GPU 1" and result["gpu_mapping"] == "uuid"
    assert result["gpu_shared"] is True


def test_power_thread_stops_promptly_even_on_exceptions() -> None:
    fake = FakeNvml(time.monotonic, lambda t: 120.0, energy=False)
    sampler = PowerSampler(0, interval_s=0.02, nvml=fake, sync=lambda: None)
    with pytest.raises(ValueError, match="boom"), sampler:
        time.sleep(0.15)
        raise ValueError("boom")
    assert sampler.result is not None and sampler.result["n_samples"] >= 3
    assert not any(t.name == "petlbench-power" and t.is_alive() for t in threading.enumerate())
    assert sampler.result["power_peak_w"] == 120.0
    assert sampler.result["max_gap_s"] < 1.0 and math.isfinite(sampler.result["energy_j"])


# ----------------------------------------------------------------------------------------- CLI
def _app():  # noqa: ANN202
    import typer

    from petlbench.cli.profile import register

    app = typer.Typer()
    register(app)
    return app


def test_cli_profile_and_memory_json() -> None:
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(
        _app(),
        [
            "profile",
            "--methods",
            "full_ft,fpt_plus",
            "--backbone",
            "test_vit",
            "--res",
            "64",
            "--batch-size",
            "2",
            "--json",
            "--attention",
            "explicit",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["method"] for r in rows] == ["full_ft", "fpt_plus"] and rows[0]["attention"] == "explicit"
    result = runner.invoke(
        _app(),
        [
            "memory",
            "--methods",
            "bitfit,fpt_plus",
            "--backbone",
            "test_vit",
            "--res",
            "32,64",
            "--batch-size",
            "2",
            "--gpu-mem",
            "48GB",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # stdout holds the result alone ...
    assert [(r["method"], r["res"]) for r in rows] == [
        ("bitfit", 32),
        ("bitfit", 64),
        ("fpt_plus", 32),
        ("fpt_plus", 64),
    ]
    assert rows[0]["exceeds_budget"] is False
    # ... and stderr one line per estimate, as each is done
    progress = [line.split(":")[0] for line in result.stderr.splitlines()]
    assert progress == ["bitfit @ 32px", "bitfit @ 64px", "fpt_plus @ 32px", "fpt_plus @ 64px"]
    result = runner.invoke(_app(), ["memory", "--methods", "bitfit", "--backbone", "test_vit", "--res", "64"])
    assert result.exit_code == 0 and "bitfit" in result.output


@pytest.mark.slow
def test_cli_bench_writes_reports(tmp_path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    md, js = tmp_path / "out" / "bench.md", tmp_path / "out" / "bench.json"
    result = CliRunner().invoke(
        _app(),
        [
            "bench",
            "--methods",
            "full_ft,linear_probe,fpt_plus",
            "--backbone",
            "test_vit",
            "--res",
            "64",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"bench written: {md}, {js}" in result.output
    report = json.loads(js.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["full_ft"]["ratio_est_peak_mem"] == 1.0
    assert rows["fpt_plus"]["ratio_est_peak_mem"] < 1.0 and rows["linear_probe"]["train_images_per_s"] > 0
    # the estimator's CPU prediction of the step's allocations vs the CPU allocator's measurement: equal up to
    # oneDNN's convolution scratch (~1 MiB, see test_estimator_is_exact_for_dispatched_tensors)
    for row in rows.values():
        assert 0 <= row["measured_cpu_step_increase_mb"] - row["est_cpu_step_increase_mb"] < 1.5
    assert f"| {CASES['full_ft'].name} |" in md.read_text()
    table = next(line for line in result.output.splitlines() if line.startswith("| Method |"))
    assert table.endswith("| img/s | × |")  # echoed as written: one line, not wrapped at the terminal's width


def test_cli_bench_refuses_an_unusable_output_folder_before_any_work(tmp_path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    taken = tmp_path / "a-file"
    taken.write_text("")
    result = CliRunner().invoke(_app(), ["bench", "--methods", "lora", "--out", str(taken)])
    assert result.exit_code == 2
    assert f"output folder {taken} is not a directory: choose another with --out" in result.output


@pytest.mark.parametrize("key", ["full_ft", "lora", "fpt_plus"])
@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_optimizer_priming_on_meta_tensors_equals_priming_on_fake_tensors(key: str, target: str) -> None:
    """The estimator primes AdamW on meta-device stand-ins (fast); FakeTensorMode stand-ins give the same transient
    bytes, state tensors and allocation events."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from petlbench.engine.step import make_optimizer
    from petlbench.profiling import memory_estimate
    from petlbench.profiling.models import build_meta, make_context
    from petlbench.profiling.profile import make_method

    model, _ = build_meta(make_method(key), make_context(BackboneSpec("test_vit"), 64, 3, "auto"))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for stand_ins in (lambda: torch.device("meta"), FakeTensorMode):
        memory_estimate._PRIME_MEMO.clear()
        for foreach in (True, False):
            increase, states, log = memory_estimate._prime_on_stand_ins(
                params, make_optimizer, foreach, target, 512 if target == "cuda" else 1, stand_ins
            )
            results.append((increase, states, log.step_events))
    memory_estimate._PRIME_MEMO.clear()
    assert results[:2] == results[2:] and results[0][2]
