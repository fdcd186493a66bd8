"""Method-specific behaviour of the backbone-based methods on timm's tiny `test_vit` (width 64, 6 blocks).

What every method must do (shapes, freezing, steps, state dicts, attention, counts) is in test_contract.py, driven
by `method_keys()` and its case table; this file keeps what only one method does.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_contract import CASES, DEPTH, HEAD, NUM_CLASSES, TINY, param_names, per_block
from test_contract import build as build_tiny
from torch import nn

from petlbench.backbones.peft_adapters import adalora_schedule, adalora_tuner
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BackboneSpec, BuildContext, PetlModel, View, get_method, method_keys
from petlbench.core.options import OptionError
from petlbench.engine.step import make_optimizer, train_step

torch.set_num_threads(1)

RES = 32


def build(
    key: str, options: dict[str, str] | None = None, total_steps: int = 100, seed: int = 0, res: int = RES
) -> PetlModel:
    """A method's model on the tiny ViT (random init, fixed seed)."""
    torch.manual_seed(seed)
    method = get_method(key).from_overrides(options or {})
    ctx = BuildContext(TINY, NUM_CLASSES, res, total_steps=total_steps, log=lambda _: None)
    return method.build(ctx)


def images(batch: int = 4, res: int = RES, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch dict with random images."""
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch, 3, res, res, generator=generator)}


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that require grad."""
    return {name for name, param in model.named_parameters() if param.requires_grad}


def optimizer_step(model: PetlModel, optimizer: torch.optim.Optimizer, batch: dict, step: int) -> torch.Tensor:
    """One trainer-style step: CE + extra loss, backward, step, after-step hook, zero_grad; returns the loss."""
    model.train()
    labels = torch.arange(batch["image"].shape[0]) % NUM_CLASSES
    loss = nn.functional.cross_entropy(model(batch), labels)
    extra = model.extra_loss()
    if extra is not None:
        loss = loss + extra
    loss.backward()
    optimizer.step()
    model.after_optimizer_step(step)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def test_method_dropouts_follow_train_mode() -> None:
    """Dropout inside LoRA/AdaLoRA branches and adapters trains with the model (p 0.1); the frozen rest stays eval."""
    for key in ("lora", "adalora", "adapter"):
        model = build(key).train()
        dropouts = [
            module
            for name, module in model.named_modules()
            if isinstance(module, nn.Dropout) and ("lora_dropout" in name or ".adapter" in name)
        ]
        assert dropouts and all(d.training and d.p == 0.1 for d in dropouts), key


def test_linear_probe_trunk_builds_no_graph() -> None:
    model = build("linear_probe").train()
    logits = model(images())
    assert logits.grad_fn is not None
    torch.manual_seed(0)
    backbone = create_backbone(TINY, RES, NUM_CLASSES).eval()
    with torch.no_grad():
        assert torch.allclose(logits, backbone(images()["image"]), atol=1e-6, rtol=0)


def test_vpt_prompts_follow_options() -> None:
    model = build("vpt", {"num_prompts": "4", "dropout": "0.2"})
    assert model.prompt.embeddings.shape == (DEPTH, 4, 64)
    bound = (6 / (3 * 16 * 16 + 64)) ** 0.5
    assert model.prompt.embeddings.abs().max() <= bound
    assert model.prompt_dropout.p == 0.2
    assert model(images(batch=2)).shape == (2, NUM_CLASSES)


def test_vpt_prompts_change_the_output() -> None:
    model = build("vpt").eval()
    batch = images()
    with torch.no_grad():
        first = model(batch)
        model.prompt.embeddings.normal_()
        assert not torch.allclose(first, model(batch))


def test_adapter_houlsby_has_two_adapters_per_block() -> None:
    model = build("adapter", {"style": "houlsby"})
    expected = HEAD | per_block(
        *param_names(*(f"adapter_{where}.{m}" for where in ("attn", "mlp") for m in ("down", "up")))
    )
    assert trainable_names(model) == expected
    adapter = model.net.blocks[0].adapter_attn
    assert adapter.down.out_features == 48 and isinstance(adapter.act, nn.GELU) and adapter.scale == 1.0


def test_option_overrides() -> None:
    assert get_method("adapter").from_overrides({"bottleneck": "64"}).options.bottleneck == 64
    assert get_method("adapter")().options.bottleneck == 96
    assert get_method("adapter")().options.scale == 0.1
    assert get_method("lora").from_overrides({"r": "8"}).options.r == 8
    extra = get_method("attention_tuning").from_overrides({"extra": "pos_embed,norm1"}).options.extra
    assert extra == ("pos_embed", "norm1")
    model = build("attention_tuning", {"extra": "pos_embed,norm1"})
    default = CASES["attention_tuning"].trainable
    assert isinstance(default, frozenset)
    assert trainable_names(model) == default | {"net.pos_embed"} | per_block(*param_names("norm1"))
    lora8 = build("lora", {"r": "8"})
    assert lora8.net.base_model.model.blocks[0].attn.q.lora_A["default"].weight.shape == (8, 64)
    for key, bad in [
        ("lora", {"r": "0"}),
        ("lora", {"rank": "8"}),
        ("vpt", {"num_prompts": "0"}),
        ("adapter", {"style": "serial"}),
        ("attention_tuning", {"extra": "mlp"}),
        ("adalora", {"target_r": "16"}),
        ("adalora", {"tinit_fraction": "0.5", "tfinal_fraction": "0.5"}),
    ]:
        with pytest.raises(OptionError):
            get_method(key).from_overrides(bad)


def test_peft_adapters_on_q_and_v_only() -> None:
    for key in ("lora", "adalora"):
        model = build(key)
        attn = model.net.base_model.model.blocks[0].attn
        assert hasattr(attn.q, "lora_A") and hasattr(attn.v, "lora_A")
        assert type(attn.k) is nn.Linear
        assert not hasattr(attn, "qkv")


def test_adalora_counts_ranknum() -> None:
    model = build("adalora")
    ranknums = [p for n, p in model.named_parameters() if "ranknum" in n]
    assert len(ranknums) == 2 * DEPTH and not any(p.requires_grad for p in ranknums)
    assert all(float(p) == 12.0 for p in ranknums)
    trainable, total = model.param_report()
    backbone_total = sum(p.numel() for p in create_backbone(TINY, RES, NUM_CLASSES).parameters())
    per_target = 12 * 64 + 64 * 12 + 12
    assert trainable == 2 * DEPTH * per_target + 64 * NUM_CLASSES + NUM_CLASSES
    assert total == backbone_total + 2 * DEPTH * (per_target + 1)


def test_adalora_extra_loss_matches_peft() -> None:
    """Our orthogonality term equals the one peft adds to `outputs.loss` (0.5 · mean Frobenius norm)."""
    model = build("adalora")
    tuner = adalora_tuner(model.net)
    tuner.model.forward = lambda *args, **kwargs: SimpleNamespace(loss=torch.zeros(()))
    try:
        reference = tuner(images()["image"]).loss
    finally:
        del tuner.model.forward
    ours = model.extra_loss()
    assert ours is not None and ours.requires_grad
    assert torch.allclose(ours, reference)
    assert build("adalora", {"orth_reg_weight": "0"}).extra_loss() is None


def test_adalora_reallocates_ranks_during_training() -> None:
    total_steps = 30
    model = build("adalora", total_steps=total_steps)
    tuner = adalora_tuner(model.net)
    config = tuner.peft_config["default"]
    assert (config.tinit, config.tfinal, config.total_step, config.deltaT) == (3, 6, 30, 10)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    singular_values = [p for n, p in model.named_parameters() if "lora_E" in n]
    batch = images(batch=3)
    zeros_per_step = []
    for step in range(total_steps):
        optimizer_step(model, optimizer, batch, step)
        zeros_per_step.append(sum(int((e == 0).sum()) for e in singular_values))
    init_budget, target_budget = 2 * DEPTH * 12, 2 * DEPTH * 8
    assert all(zeros == 0 for zeros in zeros_per_step[: config.tinit + 1])  # warm-up: nothing pruned
    assert zeros_per_step[-1] >= init_budget - target_budget  # final phase: budget shrunk to target
    pattern = config.rank_pattern  # per target: which of its init_r singular values survive
    assert len(pattern) == 2 * DEPTH
    assert sum(sum(mask) for mask in pattern.values()) <= target_budget


def test_adalora_schedule_clamps_short_runs() -> None:
    assert adalora_schedule(100, 0.1, 0.2) == (10, 20)
    for total in range(1, 60):
        for fractions in [(0.1, 0.2), (0.45, 0.5), (0.0, 0.9), (0.9, 0.0)]:
            tinit, tfinal = adalora_schedule(total, *fractions)
            assert 0 <= tinit < total - tfinal and tfinal >= 0
    with pytest.raises(ValueError):
        adalora_schedule(0, 0.1, 0.2)
    model = build("adalora", total_steps=1)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    optimizer_step(model, optimizer, images(), 0)


def learnable_task(res: int, n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class c has a brighter channel c."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    x = 0.5 * torch.randn(n, 3, res, res, generator=generator)
    x[torch.arange(n), labels] += 1.0
    return x, labels


def in_views(x: torch.Tensor, views: dict[str, View]) -> dict[str, torch.Tensor]:
    """`x` resized to every view's size."""
    return {
        name: x if v.size == x.shape[-1] else F.interpolate(x, size=(v.size, v.size), mode="bilinear", antialias=True)
        for name, v in views.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("key", method_keys())
def test_short_training_lowers_the_loss(key: str) -> None:
    """30 trainer steps on a learnable task cut the loss by 30 % (lr 3e-3: FPT's side networks start from scratch)."""
    method, model, ctx = build_tiny(key, total_steps=30)
    views = method.views(ctx.res)
    x, y = learnable_task(max(v.size for v in views.values()))
    optimizer = make_optimizer(model.trainable_parameters(), lr=3e-3, weight_decay=0.0)

    def full_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(in_views(x, views)), y))

    initial = full_loss()
    for step in range(30):
        model.train()
        index = torch.arange(step * 8, step * 8 + 8) % len(y)
        train_step(model, {**in_views(x[index], views), "label": y[index]}, optimizer, global_step=step)
    assert full_loss() < 0.7 * initial


@pytest.mark.slow
def test_vit_base_variant_counts_match_the_spec() -> None:
    """Reference variants: AdaptFormer 64, Houlsby 2 x 48, attention tuning + pos_embed + norm1."""
    ctx = BuildContext(BackboneSpec("vit_base_patch16_224"), 5, 512, total_steps=1000, log=lambda _: None)
    cases = [
        ("adapter", {"bottleneck": "64"}, 1_193_477),
        ("adapter", {"style": "houlsby"}, 1_792_901),
        ("attention_tuning", {"extra": "pos_embed,norm1"}, 29_157_893),
    ]
    for key, options, trainable in cases:
        with torch.device("meta"):
            model = get_method(key).from_overrides(options).build(ctx)
        assert model.param_report()[0] == trainable
