"""The method contract, checked for every registered method (built-ins and plugins) on timm's tiny `test_vit`.

Adding a method = one module in `methods/` + one row in `CASES` below. Every key of `method_keys()` (read at
collection time, so methods from PETLBENCH_PLUGINS files and entry points are collected too) runs the generic
checks; the method-specific ones read the method's row in `CASES` and skip when it has none.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import default_collate

from petlbench.backbones.attention import ATTENTION_CHOICES, attention_modules, describe_attention
from petlbench.backbones.classifier import HEAD_PATTERN, BackboneClassifier, freeze_except, name_matcher
from petlbench.backbones.vit import create_backbone
from petlbench.core.catalog import builtin_card, builtin_method_modules, card_from_class
from petlbench.core.method import (
    METHODS,
    BackboneSpec,
    Batch,
    BuildContext,
    Method,
    OneOffWork,
    PetlModel,
    Prepared,
    View,
    get_method,
    method_keys,
    register_method,
)
from petlbench.core.options import option
from petlbench.data.source import SPLITS, DatasetSource, Sample, sample_id_for
from petlbench.data.views import ViewDataset
from petlbench.engine.build import build_model
from petlbench.engine.step import make_optimizer, train_step
from petlbench.profiling.memory_estimate import estimate_training_memory
from petlbench.profiling.models import build_meta, make_context
from petlbench.profiling.params import param_row

torch.set_num_threads(1)

REPO = Path(__file__).parents[1]
TINY = BackboneSpec("test_vit")  # width 64, 6 blocks, 2 heads, patch 16, MLP ratio 3
DEPTH = 6
RES = 32
NUM_CLASSES = 3
BATCH = 2
VIT_B = BackboneSpec("vit_base_patch16_224")  # the papers' setting for counts: 512 px, 5 classes
KERNELS = [a for a in ATTENTION_CHOICES if a != "auto"]


# ----------------------------------------------------------------------------------------- the case table
@dataclass(frozen=True)
class Case:
    """Method-specific expectations: one row per method (a method without a row skips these checks)."""

    name: str  # display name
    options: Mapping[str, str] = field(default_factory=dict)  # `--opt` overrides for the tiny build
    res: int = RES  # resolution of the tiny build
    # Exactly the trainable parameters: a frozenset of names, or a tuple of regular expressions whose full matches
    # among all parameter names are the trainable ones (each matching at least one).
    trainable: frozenset[str] | tuple[str, ...] | None = None
    vit_b: tuple[int, int] | None = None  # (trainable, total) on ViT-B/16 at 512 px with 5 classes, default options
    # Option sets under which the model computes exactly the same-seed backbone's logits of `{"image": x}` at step 0
    # (nothing added, or zero-initialised branches).
    identity_at_init: tuple[Mapping[str, str], ...] = ()
    preloads: bool = False  # prepare_data caches frozen features: after assume_prepared() there is one-off work


def per_block(*suffixes: str, prefix: str = "net.") -> frozenset[str]:
    """`{prefix}blocks.{i}.{suffix}` for every block of the tiny ViT and every suffix."""
    return frozenset(f"{prefix}blocks.{i}.{suffix}" for i in range(DEPTH) for suffix in suffixes)


def param_names(*modules: str, params: tuple[str, ...] = ("weight", "bias")) -> tuple[str, ...]:
    """`{module}.{param}` for every module and parameter name."""
    return tuple(f"{m}.{p}" for m in modules for p in params)


PEFT = "net.base_model.model."
HEAD = frozenset(param_names("net.head"))
PEFT_HEAD = frozenset(param_names(f"{PEFT}head"))
BLOCK_LAYERS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")  # every layer of a ViT block
FPT_TINY = {"side_res": "32", "preload_workers": "0", "preload_batch_size": "4"}  # LPM 64 px, side 32 px

CASES: dict[str, Case] = {
    "full_ft": Case("Full fine-tuning", trainable=(r".+",), vit_b=(86_438_405, 86_438_405), identity_at_init=({},)),
    "linear_probe": Case("Linear probing", trainable=HEAD, vit_b=(3_845, 86_438_405), identity_at_init=({},)),
    "vpt": Case("Prompt-tuning", trainable=HEAD | {"prompt.embeddings"}, vit_b=(151_301, 86_585_861)),
    "attention_tuning": Case(
        "Attention-tuning",
        trainable=HEAD | per_block(*param_names("attn.qkv", "attn.proj")),
        vit_b=(28_352_261, 86_438_405),
        identity_at_init=({},),
    ),
    "adapter": Case(
        "Adapter",
        trainable=HEAD | per_block(*param_names("adapter.down", "adapter.up")),
        vit_b=(1_783_685, 88_218_245),
        identity_at_init=({}, {"style": "houlsby"}),
    ),
    "bitfit": Case(
        "BitFit",
        trainable=HEAD
        | {"net.patch_embed.proj.bias", "net.norm.bias"}
        | per_block(*param_names(*BLOCK_LAYERS, params=("bias",))),
        vit_b=(106_757, 86_438_405),
        identity_at_init=({},),
    ),
    "lora": Case(
        "LoRA",
        trainable=PEFT_HEAD
        | per_block(
            *param_names("attn.q", "attn.v", params=("lora_A.default.weight", "lora_B.default.weight")), prefix=PEFT
        ),
        vit_b=(593_669, 87_028_229),
        identity_at_init=({},),
    ),
    "adalora": Case(
        "AdaLoRA",
        trainable=PEFT_HEAD
        | per_block(
            *param_names("attn.q", "attn.v", params=("lora_A.default", "lora_E.default", "lora_B.default")), prefix=PEFT
        ),
        vit_b=(446_501, 86_881_085),
        identity_at_init=({},),
    ),
    "ssf": Case(
        "SSF",
        trainable=HEAD
        | frozenset(param_names("net.patch_embed.proj.ssf", "net.norm.ssf", params=("scale", "shift")))
        | per_block(*param_names(*(f"{m}.ssf" for m in BLOCK_LAYERS), params=("scale", "shift"))),
        vit_b=(209_669, 86_644_229),
        identity_at_init=({"init_std": "0"},),
    ),
    "fpt": Case(
        "FPT",
        options=FPT_TINY,
        res=64,
        trainable=(r"side\..+", r"fusion\..+"),
        vit_b=(1_602_341, 88_036_901),
        preloads=True,
    ),
    "fpt_plus": Case(
        "FPT+",
        options=FPT_TINY,
        res=64,
        trainable=(r"side\..+", r"fusion\..+"),
        vit_b=(900_965, 87_335_525),
        preloads=True,
    ),
}

KEYS = method_keys()  # at collection time: built-ins and plugins


def case_for(key: str, what: str) -> Case:
    """The case row of `key`, or skip the calling method-specific check."""
    case = CASES.get(key)
    if case is None:
        pytest.skip(f"no case row for {key}: {what} not checked (add a row to CASES in tests/test_contract.py)")
    return case


# ----------------------------------------------------------------------------------------- helpers
def _quiet(_: str) -> None:
    return None


def build(
    key: str,
    *,
    options: Mapping[str, str] | None = None,
    attention: str = "auto",
    seed: int = 0,
    total_steps: int = 10,
    cache_dir: Path = Path("results/cache"),
) -> tuple[Method, PetlModel, BuildContext]:
    """Method (its case row's options unless given), model (`build_model`, fixed seed) and context on the tiny ViT."""
    case = CASES.get(key)
    if options is None:
        options = case.options if case else {}
    method = get_method(key).from_overrides(dict(options))
    res = case.res if case else RES
    ctx = BuildContext(TINY, NUM_CLASSES, res, total_steps, attention=attention, cache_dir=cache_dir, log=_quiet)
    torch.manual_seed(seed)
    return method, build_model(method, ctx), ctx


def example(method: Method, model: PetlModel, ctx: BuildContext, seed: int = 1) -> Batch:
    """`model.example_batch` for the method's views (fixed seed), with labels of every class."""
    torch.manual_seed(seed)
    batch = model.example_batch(method.views(ctx.res), BATCH, "cpu")
    batch["label"] = torch.arange(BATCH) % NUM_CLASSES
    return batch


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that require grad."""
    return {name for name, param in model.named_parameters() if param.requires_grad}


def steps(model: PetlModel, batch: Batch, count: int) -> None:
    """`count` trainer steps (`train_step` with the trainer's AdamW) on one batch."""
    optimizer = make_optimizer(model.trainable_parameters())
    model.train()
    for step in range(count):
        loss = train_step(model, batch, optimizer, global_step=step)
        assert torch.isfinite(loss), f"step {step}: loss {loss}"


def option_text(value: object) -> str:
    """A default as `--opt` would spell it (tuples comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def make_source(root: Path) -> DatasetSource:
    """Four small PNGs of two classes (odd sizes) split 2/1/1 into train/val/test."""
    rng = np.random.default_rng(0)
    samples = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(40 + 8 * i, 48, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, i % 2, split, sample_id_for(path, root)))
    return DatasetSource("contract", root, ["c0", "c1"], samples, "official")


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> DatasetSource:
    """The generated dataset shared by this module's prepare_data checks."""
    return make_source(tmp_path_factory.mktemp("contract_data"))


# ----------------------------------------------------------------------------------------- generic checks
@pytest.mark.parametrize("key", KEYS)
def test_registered_with_options_and_views(key: str) -> None:
    cls = get_method(key)
    assert issubclass(cls, Method) and cls.key == key
    assert isinstance(cls.display_name, str) and cls.display_name.strip()
    assert dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen  # type: ignore[attr-defined]
    method = cls()
    assert isinstance(method.options, cls.Options) and method.options == cls.Options()
    json.dumps(method.resolved_options())  # stored in results and hashed into the run id
    # the listing's card, read from the module's source without importing it, says what the class says
    if key in builtin_method_modules():
        assert dataclasses.replace(builtin_card(cls.__module__), read_from="import") == card_from_class(cls)
    # every default survives the `--opt` round trip (option types are ones `--opt` can parse)
    texts = {f.name: option_text(f.default) for f in dataclasses.fields(cls.Options)}
    assert cls.from_overrides(texts).options == method.options
    views = method.views(RES)
    assert views and all(isinstance(name, str) and isinstance(v, View) for name, v in views.items())


@pytest.mark.parametrize("key", KEYS)
def test_forward_shape(key: str) -> None:
    method, model, ctx = build(key)
    assert isinstance(model, PetlModel)
    batch = example(method, model, ctx)
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            logits = model(batch)
        assert logits.shape == (BATCH, NUM_CLASSES) and torch.isfinite(logits).all()


@pytest.mark.parametrize("key", KEYS)
def test_param_report_matches_requires_grad(key: str) -> None:
    _, model, _ = build(key)
    distinct = {id(p): p for p in model.parameters()}.values()
    trainable = [p for p in distinct if p.requires_grad]
    assert trainable, "nothing is trainable"
    assert model.param_report() == (sum(p.numel() for p in trainable), sum(p.numel() for p in distinct))
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in trainable}
    assert len(model.trainable_parameters()) == len(trainable)  # each once


@pytest.mark.parametrize("key", KEYS)
def test_train_step_changes_only_trainable_parameters(key: str) -> None:
    method, model, ctx = build(key)
    before = snapshot(model)
    steps(model, example(method, model, ctx), 1)
    moved = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(param, before[name]), f"frozen {name} changed"
        elif not torch.equal(param, before[name]):
            moved.append(name)
    assert moved, "no trainable parameter changed in one step"


@pytest.mark.parametrize("key", KEYS)
def test_train_mode_keeps_frozen_submodules_in_eval(key: str) -> None:
    _, model, _ = build(key)
    model.train()
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            assert not module.training, f"frozen {name} is in training mode"
        elif params:
            assert module.training, f"{name} holds trainable parameters but is in eval mode"
    model.eval()
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize("key", KEYS)
def test_state_dict_round_trip(key: str) -> None:
    method, model, ctx = build(key, seed=0)
    batch = example(method, model, ctx)
    steps(model, batch, 1)
    _, fresh, _ = build(key, seed=1)
    fresh.load_state_dict(model.state_dict())
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(batch), model(batch))


@pytest.mark.parametrize("key", KEYS)
def test_memory_estimate_meta_engine_equals_fake_engine(key: str) -> None:
    """The fast engine (meta tensors + fake-tensor optimizer priming) against the reference (the whole step,
    twice, on fake tensors): peft wrappers, prompts, hooks, FPT's side network and preloaded features alike."""
    case = CASES.get(key)
    method = get_method(key).from_overrides(dict(case.options) if case else {})
    res = case.res if case else RES
    fast = estimate_training_memory(method, TINY, res, BATCH, NUM_CLASSES, engine="meta")
    reference = estimate_training_memory(method, TINY, res, BATCH, NUM_CLASSES, engine="fake", warmup="full")
    assert fast.peak_bytes == reference.peak_bytes > 0
    assert fast.breakdown_bytes == reference.breakdown_bytes


@pytest.mark.parametrize("attention", KERNELS)
@pytest.mark.parametrize("key", KEYS)
def test_attention_kernel_is_honoured(key: str, attention: str) -> None:
    """`build_model` sets ctx.attention on every attention module (FPT's LPM blocks always compute explicitly
    inside, but their flags are set too)."""
    _, model, _ = build(key, attention=attention)
    assert describe_attention(model) == (attention if attention_modules(model) else "none")


@pytest.mark.parametrize("key", KEYS)
def test_fused_and_explicit_attention_give_the_same_logits(key: str) -> None:
    logits = []
    for attention in KERNELS:
        method, model, ctx = build(key, attention=attention)
        with torch.no_grad():
            logits.append(model.eval()(example(method, model, ctx)))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key", KEYS)
def test_prepare_data_returns_prepared_splits_the_model_reads(
    key: str, tiny_source: DatasetSource, tmp_path: Path
) -> None:
    method, model, ctx = build(key, cache_dir=tmp_path / "cache")
    views = method.views(ctx.res)
    mean, std = tiny_source.mean, tiny_source.std
    splits = {s: ViewDataset(tiny_source.split(s), views, train=s == "train", mean=mean, std=std) for s in SPLITS}
    prepared = model.prepare_data(splits, ctx)
    assert isinstance(prepared, Prepared) and set(prepared.splits) == set(SPLITS)
    assert isinstance(prepared.info, dict) and isinstance(prepared.info.get("preloaded", False), bool)
    train = prepared.splits["train"]
    batch = default_collate([train[i] for i in range(len(train))])
    model.place(torch.device("cpu"))
    with torch.no_grad():
        assert model.eval()(batch).shape == (len(train), NUM_CLASSES)


@pytest.mark.parametrize("key", KEYS)
def test_optional_hooks_keep_the_contract(key: str) -> None:
    """place returns the model, extra_loss is None or a finite scalar, introspect None or a dict; in the prepared
    state (what profilers assume) the example batch still feeds the model and any one-off work reads a view."""
    method, model, ctx = build(key)
    views = method.views(ctx.res)
    batch = example(method, model, ctx)
    assert model.place(torch.device("cpu")) is model
    extra = model.extra_loss()
    assert extra is None or (isinstance(extra, torch.Tensor) and extra.ndim == 0 and torch.isfinite(extra))
    maps = model.introspect(batch)
    assert maps is None or isinstance(maps, dict)
    model.assume_prepared()
    work = model.one_off_work()
    if work is not None:
        assert isinstance(work, OneOffWork) and isinstance(work.module, nn.Module) and work.view in views
    prepared_batch = example(method, model, ctx)
    with torch.no_grad():
        assert model.eval()(prepared_batch).shape == (BATCH, NUM_CLASSES)


GENERIC_CHECKS = (
    test_registered_with_options_and_views,
    test_forward_shape,
    test_param_report_matches_requires_grad,
    test_train_step_changes_only_trainable_parameters,
    test_train_mode_keeps_frozen_submodules_in_eval,
    test_state_dict_round_trip,
    test_memory_estimate_meta_engine_equals_fake_engine,
    test_fused_and_explicit_attention_give_the_same_logits,
    test_optional_hooks_keep_the_contract,
)


# ----------------------------------------------------------------------------------------- method-specific checks
@pytest.mark.parametrize("key", KEYS)
def test_display_name_matches_case(key: str) -> None:
    case = case_for(key, "display name")
    assert get_method(key).display_name == case.name


@pytest.mark.parametrize("key", KEYS)
def test_trainable_names_match_case(key: str) -> None:
    case = case_for(key, "trainable parameter names")
    if case.trainable is None:
        pytest.skip(f"the case row for {key} gives no trainable names")
    _, model, _ = build(key)
    names = trainable_names(model)
    if isinstance(case.trainable, frozenset):
        assert names == case.trainable
        return
    everything = [name for name, _ in model.named_parameters()]
    assert names == {name for name in everything if name_matcher(case.trainable)(name)}
    for pattern in case.trainable:
        assert any(re.fullmatch(pattern, name) for name in names), f"{pattern!r} matches no trainable parameter"


@pytest.mark.parametrize("key", KEYS)
def test_every_trainable_parameter_moves_in_two_steps(key: str) -> None:
    """Zero-initialised branches (LoRA B, adapter up, AdaLoRA E) pass gradient upstream from step 2 on."""
    case_for(key, "that every trainable parameter moves")
    method, model, ctx = build(key)
    before = snapshot(model)
    steps(model, example(method, model, ctx), 2)
    still = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not still, f"trainable parameters unchanged after two steps: {still}"


@pytest.mark.parametrize("key", KEYS)
def test_identity_at_init(key: str) -> None:
    """Under the row's option sets the model computes exactly the (same-seed) backbone's logits at step 0."""
    case = case_for(key, "identity at initialisation")
    if not case.identity_at_init:
        pytest.skip(f"the case row for {key} lists no option set that starts as the backbone")
    images = torch.randn(BATCH, 3, case.res, case.res, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    backbone = create_backbone(TINY, case.res, NUM_CLASSES).eval()
    with torch.no_grad():
        reference = backbone(images)
    for options in case.identity_at_init:
        _, model, _ = build(key, options=options)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()({"image": images}), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("key", KEYS)
def test_preloading_matches_case(key: str) -> None:
    case = case_for(key, "preloading")
    _, model, _ = build(key)
    model.assume_prepared()
    assert (model.one_off_work() is not None) == case.preloads


@pytest.mark.parametrize("key", KEYS)
def test_vit_base_counts_match_the_spec(key: str) -> None:
    """ViT-B/16 at 512 px, C = 5, default options, as `petlbench params` and the profilers count."""
    case = case_for(key, "ViT-B/16 parameter counts")
    if case.vit_b is None:
        pytest.skip(f"the case row for {key} gives no ViT-B/16 counts")
    row = param_row(key, VIT_B, 512, 5)
    assert (row["trainable"], row["total"]) == case.vit_b and row["name"] == case.name
    model, how = build_meta(get_method(key)(), make_context(VIT_B, 512, 5))
    assert how == "meta", how  # the profilers build it without allocating weights
    assert model.param_report() == case.vit_b


SPECIFIC_CHECKS = (
    test_display_name_matches_case,
    test_trainable_names_match_case,
    test_every_trainable_parameter_moves_in_two_steps,
    test_identity_at_init,
    test_preloading_matches_case,
    test_vit_base_counts_match_the_spec,
)


# ----------------------------------------------------------------------------------------- the table itself
def test_case_table_covers_the_builtin_methods_and_names_only_registered_ones() -> None:
    assert set(builtin_method_modules()) <= set(CASES), "every built-in method needs a row in CASES"
    assert set(CASES) <= set(method_keys()), "a row names a method that is not registered"


@dataclass(frozen=True)
class ThrowAwayOptions:
    """Options of the throw-away method."""

    norms: bool = option(True, "train the LayerNorms besides the head")
    note: str | None = option(None, "unused")


class ThrowAway(Method):
    """A method defined in a test, registered only while it runs: LayerNorms and the head train."""

    key = "contract_throwaway"
    display_name = "Throw-away"
    Options = ThrowAwayOptions

    def build(self, ctx: BuildContext) -> PetlModel:
        """The tiny backbone with its norms (optionally) and the head trainable."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        freeze_except(net, name_matcher([HEAD_PATTERN, *([r"(.+\.)?norm\d?\..+"] if self.options.norms else [])]))
        return BackboneClassifier(net)


@pytest.fixture
def throwaway() -> Iterator[str]:
    """ThrowAway registered for one test."""
    register_method(ThrowAway)
    try:
        yield ThrowAway.key
    finally:
        METHODS.unregister(ThrowAway.key)


def test_method_without_case_row_runs_the_generic_checks_and_skips_the_specific_ones(
    throwaway: str, tiny_source: DatasetSource, tmp_path: Path
) -> None:
    assert throwaway in method_keys() and throwaway not in CASES
    for check in GENERIC_CHECKS:
        check(throwaway)
    for attention in KERNELS:
        test_attention_kernel_is_honoured(throwaway, attention)
    test_prepare_data_returns_prepared_splits_the_model_reads(throwaway, tiny_source, tmp_path)
    for check in SPECIFIC_CHECKS:
        with pytest.raises(pytest.skip.Exception, match=f"^no case row for {throwaway}: "):
            check(throwaway)


PLUGIN = '''from __future__ import annotations

from dataclasses import dataclass

from petlbench.backbones.classifier import BackboneClassifier, freeze_except, name_matcher
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BuildContext, Method, PetlModel, register_method
from petlbench.core.options import option


@dataclass(frozen=True)
class NormTuningOptions:
    """Options of norm tuning."""

    include_head: bool = option(True, "train the head too")
    extra: tuple[str, ...] = option((), "more regular expressions of trainable parameters")


@register_method
class NormTuning(Method):
    """Train the LayerNorm weights (and the head)."""

    key = "norm_tuning"
    display_name = "Norm tuning"
    Options = NormTuningOptions

    def build(self, ctx: BuildContext) -> PetlModel:
        """The backbone with its norms trainable."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        patterns = [r"(.+\\.)?norm\\d?\\..+", *self.options.extra]
        patterns += [r"head\\..+"] if self.options.include_head else []
        freeze_except(net, name_matcher(patterns))
        return BackboneClassifier(net)
'''


@pytest.mark.slow
def test_plugin_file_is_collected_by_this_suite(tmp_path: Path) -> None:
    """A method in a PETLBENCH_PLUGINS file gets every test of this module, and `petlbench methods` lists it."""
    plugin = tmp_path / "norm_tuning.py"
    plugin.write_text(PLUGIN)
    env = {**os.environ, "PETLBENCH_PLUGINS": str(plugin)}
    collect = [sys.executable, "-m", "pytest", *"--collect-only -q -p no:cacheprovider tests/test_contract.py".split()]
    listing = [sys.executable, "-m", "petlbench", "methods", "--json"]
    # both at once: each is mostly interpreter and torch start-up
    runs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in (collect, listing)
    ]
    (collected, collect_err), (listed, list_err) = (run.communicate(timeout=300) for run in runs)
    assert runs[0].returncode == 0, collected + collect_err
    assert runs[1].returncode == 0, list_err
    lines = set(collected.splitlines())
    for check in (*GENERIC_CHECKS, test_prepare_data_returns_prepared_splits_the_model_reads, *SPECIFIC_CHECKS):
        assert f"tests/test_contract.py::{check.__name__}[norm_tuning]" in lines, check.__name__
    for attention in KERNELS:
        assert f"tests/test_contract.py::test_attention_kernel_is_honoured[norm_tuning-{attention}]" in lines
    entries = {entry["method"]: entry for entry in json.loads(listed)}
    assert entries["norm_tuning"]["name"] == "Norm tuning"
    assert [o["name"] for o in entries["norm_tuning"]["options"]] == ["include_head", "extra"]
