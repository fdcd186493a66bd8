"""The eight backbone-based baselines, parametrised over their keys, on timm's tiny `test_vit` (width 64, 6 blocks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from petlbench.backbones.peft_adapters import adalora_schedule, adalora_tuner
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BackboneSpec, BuildContext, PetlModel, get_method
from petlbench.core.options import OptionError

torch.set_num_threads(1)

KEYS = ["full_ft", "linear_probe", "vpt", "attention_tuning", "adapter", "bitfit", "lora", "adalora"]
DISPLAY_NAMES = {
    "full_ft": "Full fine-tuning",
    "linear_probe": "Linear probing",
    "vpt": "Prompt-tuning",
    "attention_tuning": "Attention-tuning",
    "adapter": "Adapter",
    "bitfit": "BitFit",
    "lora": "LoRA",
    "adalora": "AdaLoRA",
}
TINY = BackboneSpec("test_vit")
DEPTH = 6
RES = 32
NUM_CLASSES = 3
PEFT_PREFIX = "net.base_model.model."


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


def per_block(*suffixes: str, prefix: str = "net.") -> set[str]:
    """`{prefix}blocks.{i}.{suffix}` for every block and suffix."""
    return {f"{prefix}blocks.{i}.{suffix}" for i in range(DEPTH) for suffix in suffixes}


HEAD = {"net.head.weight", "net.head.bias"}
PEFT_HEAD = {f"{PEFT_PREFIX}head.weight", f"{PEFT_PREFIX}head.bias"}
EXPECTED_TRAINABLE: dict[str, set[str] | None] = {
    "full_ft": None,  # every parameter
    "linear_probe": HEAD,
    "vpt": HEAD | {"prompt.embeddings"},
    "attention_tuning": HEAD | per_block(*(f"attn.{m}.{p}" for m in ("qkv", "proj") for p in ("weight", "bias"))),
    "adapter": HEAD | per_block(*(f"adapter.{m}.{p}" for m in ("down", "up") for p in ("weight", "bias"))),
    "bitfit": HEAD
    | {"net.patch_embed.proj.bias", "net.norm.bias"}
    | per_block(*(f"{m}.bias" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"))),
    "lora": PEFT_HEAD
    | per_block(*(f"attn.{p}.lora_{m}.default.weight" for p in "qv" for m in "AB"), prefix=PEFT_PREFIX),
    "adalora": PEFT_HEAD | per_block(*(f"attn.{p}.lora_{m}.default" for p in "qv" for m in "AEB"), prefix=PEFT_PREFIX),
}


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


@pytest.mark.parametrize("key", KEYS)
def test_registered_with_display_name(key: str) -> None:
    cls = get_method(key)
    assert cls.key == key
    assert cls.display_name == DISPLAY_NAMES[key]


@pytest.mark.parametrize("key", KEYS)
def test_trainable_parameter_names(key: str) -> None:
    model = build(key)
    expected = EXPECTED_TRAINABLE[key]
    if expected is None:
        expected = {name for name, _ in model.named_parameters()}
    assert trainable_names(model) == expected
    assert not any(".k." in name for name in trainable_names(model))


@pytest.mark.parametrize("key", KEYS)
def test_forward_shape(key: str) -> None:
    model = build(key)
    for train in (True, False):
        model.train(train)
        logits = model(images(batch=2))
        assert logits.shape == (2, NUM_CLASSES)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("key", KEYS)
def test_frozen_parameters_get_no_gradient_and_stay_unchanged(key: str) -> None:
    model = build(key)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    batch = images()
    model.train()
    labels = torch.arange(4) % NUM_CLASSES
    nn.functional.cross_entropy(model(batch), labels).backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    optimizer.zero_grad(set_to_none=True)
    # Two steps: zero-initialised branches (LoRA B, adapter up, AdaLoRA E) pass gradient upstream from step 2 on.
    for step in range(2):
        optimizer_step(model, optimizer, batch, step)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("key", KEYS)
def test_train_mode_keeps_frozen_submodules_in_eval(key: str) -> None:
    model = build(key)
    model.train()
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            assert not module.training, f"frozen {name} is in training mode"
        elif params:
            assert module.training, f"{name} holds trainable parameters but is in eval mode"
    method_dropouts = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.Dropout) and ("lora_dropout" in name or ".adapter" in name)
    ]
    if key in ("lora", "adalora", "adapter"):
        assert method_dropouts and all(d.training and d.p == 0.1 for d in method_dropouts)
    model.eval()
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize(
    ("key", "options"),
    [("adapter", None), ("adapter", {"style": "houlsby"}), ("lora", None), ("adalora", None)],
)
def test_added_modules_start_as_the_identity(key: str, options: dict[str, str] | None) -> None:
    """Zero-initialised up/B/E: at step 0 the adapted model computes exactly the backbone's logits."""
    model = build(key, options).eval()
    torch.manual_seed(0)
    backbone = create_backbone(TINY, RES, NUM_CLASSES).eval()
    batch = images()
    with torch.no_grad():
        assert torch.allclose(model(batch), backbone(batch["image"]), atol=1e-6, rtol=0)


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
        *(f"adapter_{where}.{m}.{p}" for where in ("attn", "mlp") for m in ("down", "up") for p in ("weight", "bias"))
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
    assert trainable_names(model) == EXPECTED_TRAINABLE["attention_tuning"] | {"net.pos_embed"} | per_block(
        "norm1.weight", "norm1.bias"
    )
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


def learnable_task(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class c has a brighter channel c."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    x = 0.5 * torch.randn(n, 3, RES, RES, generator=generator)
    x[torch.arange(n), labels] += 1.0
    return x, labels


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_short_training_lowers_the_loss(key: str) -> None:
    model = build(key, total_steps=30)
    x, y = learnable_task()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)

    def full_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model({"image": x}), y))

    initial = full_loss()
    for step in range(30):
        model.train()
        index = torch.arange(step * 8, step * 8 + 8) % len(y)
        loss = nn.functional.cross_entropy(model({"image": x[index]}), y[index])
        extra = model.extra_loss()
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        model.after_optimizer_step(step)
        optimizer.zero_grad(set_to_none=True)
    assert full_loss() < 0.7 * initial


def test_state_dict_round_trip_restores_trainable_weights() -> None:
    for key in ("vpt", "adapter", "lora", "adalora"):
        model = build(key, seed=0)
        other = build(key, seed=1)
        other.load_state_dict(model.state_dict())
        batch = images()
        with torch.no_grad():
            assert torch.equal(model.eval()(batch), other.eval()(batch))


VIT_B_COUNTS = {
    "full_ft": (86_438_405, 86_438_405),
    "linear_probe": (3_845, 86_438_405),
    "bitfit": (106_757, 86_438_405),
    "attention_tuning": (28_352_261, 86_438_405),
    "vpt": (151_301, 86_585_861),
    "adapter": (1_783_685, 88_218_245),
    "lora": (593_669, 87_028_229),
    "adalora": (446_501, 86_881_085),
}


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_vit_base_counts_match_the_spec(key: str) -> None:
    """methods.md §5: ViT-B/16 at 512 px, C = 5 (built on the meta device: shapes only, same counts)."""
    ctx = BuildContext(BackboneSpec("vit_base_patch16_224"), 5, 512, total_steps=1000, log=lambda _: None)
    with torch.device("meta"):
        model = get_method(key)().build(ctx)
    assert model.param_report() == VIT_B_COUNTS[key]


@pytest.mark.slow
def test_vit_base_variant_counts_match_the_spec() -> None:
    """methods.md §5 reference variants: AdaptFormer 64, Houlsby 2 x 48, attention tuning + pos_embed + norm1."""
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
