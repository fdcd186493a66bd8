"""The plugin contract every transfer-learning method implements, and the method registry.

A method is one module in `methods/` that defines a `Method` subclass and registers it with
`@register_method`. The trainer only talks to this contract:

* `Method.views(res)` names the input views a sample must provide (one augmented image for the
  baselines; a fixed high-resolution view plus an augmented low-resolution view for FPT/FPT+);
* `Method.build(ctx)` returns a `PetlModel`, an `nn.Module` whose `forward(batch)` maps a batch dict
  to logits and whose hooks cover the rest (extra loss, after-step work, preloading, placement), and which
  describes itself to the profilers (`example_batch`, `one_off_work`, `assume_prepared`).

The engine applies the run's attention kernel to every model it builds (`engine.build.build_model`); methods do
not read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from petlbench.core.options import NoOptions, build_options
from petlbench.core.registry import Registry

Batch = dict[str, Any]
ParamConvention = Literal["petlbench", "official"]
PARAM_CONVENTIONS: tuple[ParamConvention, ...] = ("petlbench", "official")


@dataclass(frozen=True)
class View:
    """One image view a sample must provide: its square size and whether training augments it."""

    size: int
    augment: bool = True


@dataclass(frozen=True)
class BackboneSpec:
    """Which pre-trained ViT to build: a timm name plus where its weights come from."""

    name: str = "vit_base_patch16_224"
    pretrained: bool = False
    weights: str | None = None
    pos_interp: str = "timm"  # "timm" (resampled once at build) or "official" (the authors' per-forward rule)

    @property
    def weights_label(self) -> str:
        """How the weights were obtained, as stored in results."""
        if self.weights:
            return f"file:{self.weights}"
        return "timm-pretrained" if self.pretrained else "random-init"


@dataclass
class BuildContext:
    """Everything a method needs to build its model for one run."""

    backbone: BackboneSpec
    num_classes: int
    res: int
    total_steps: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache_dir: Path = Path("results/cache")
    attention: str = "auto"  # applied by `build_model` after `build`, never by the method
    log: Callable[[str], None] = print
    recheck: bool = False  # the run was forced: verify whatever `prepare_data` reuses in full


@dataclass
class Prepared:
    """What `prepare_data` produced: the split datasets training reads, and what was done (stored with the run).

    `info` is free-form, except two keys the reports read: `preloaded` (whether work was cached ahead of training)
    and `preload_seconds` (the time that work took; None when a cache was reused or nothing was done).
    """

    splits: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OneOffWork:
    """Frozen work a model does once per image before training (FPT's preloading pass), profiled on its own.

    `module(batch[view])` is that work for a batch of `size` x `size` images; its FLOPs are reported per image
    apart from the training step's. `floor(batch[view])`, where given, is the plain computation the work cannot be
    faster than (FPT: the frozen ViT's fused forward through the same blocks, without scoring or gathering); the
    bench reports the work's speed as a fraction of it.
    """

    module: nn.Module
    view: str
    size: int
    floor: nn.Module | None = None


class PetlModel(nn.Module):
    """Base of every method's model: batch-dict forward, frozen-parts-stay-in-eval, optional hooks."""

    def forward(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        """Logits [B, C] for one batch."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> PetlModel:
        """Set training mode, keeping every fully frozen sub-network in eval mode."""
        super().train(mode)
        if mode:
            for module in _frozen_subtrees(self):
                module.eval()
        return self

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser added to the task loss (AdaLoRA's orthogonality term); None by default."""
        return None

    def after_optimizer_step(self, global_step: int) -> None:
        """Called after `optimizer.step()` and before `zero_grad()` (AdaLoRA rank allocation)."""

    def prepare_data(self, splits: Mapping[str, Any], ctx: BuildContext) -> Prepared:
        """Transform the split datasets before training (FPT/FPT+ preloading); identity by default."""
        return Prepared(dict(splits))

    def assume_prepared(self) -> None:
        """Switch to the state `prepare_data` would leave, without data (profilers); nothing by default."""

    def one_off_work(self) -> OneOffWork | None:
        """The per-image work done once before training, in the current state; None by default."""
        return None

    def example_batch(self, views: Mapping[str, View], batch_size: int, device: torch.device | str) -> Batch:
        """Random inputs shaped like one training batch in the current state: one image per view, plus labels.

        Tensors whose keys are not views are prepared inputs (preloaded features) in the profilers' breakdown.
        """
        batch: Batch = {k: torch.randn(batch_size, 3, v.size, v.size, device=device) for k, v in views.items()}
        batch["label"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return batch

    def introspect(self, batch: Batch) -> dict[str, Any] | None:
        """Attention maps for the reports' figures 6 and 9 (FPT/FPT+); None for methods without prompts."""
        return None

    def place(self, device: torch.device) -> PetlModel:
        """Move what training needs to `device` (FPT+ keeps a preloaded-away LPM off the GPU)."""
        return self.to(device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Distinct parameters that require grad."""
        return [p for p in _distinct_parameters(self) if p.requires_grad]

    def param_report(self, convention: ParamConvention = "petlbench") -> tuple[int, int]:
        """(trainable, total) element counts: distinct parameters, once each.

        `petlbench` counts the modules the model holds. `official` counts as the FPT authors' code does: also the
        frozen parts that code instantiates without using (FPT/FPT+ override this; for a model holding everything
        it instantiates, both conventions agree).
        """
        params = list(_distinct_parameters(self))
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return trainable, sum(p.numel() for p in params)


def _distinct_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            yield param


def _frozen_subtrees(root: nn.Module) -> Iterator[nn.Module]:
    """Maximal sub-modules that own parameters, none of them trainable (parameter-free leaves are left alone)."""
    for child in root.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            yield child
        elif params:
            yield from _frozen_subtrees(child)


class Method:
    """A transfer-learning method: display name, typed options, input views and a model builder."""

    key: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # Position in listings and tables (the built-ins follow the papers' Table I); plugins come after them.
    rank: ClassVar[int] = 1000
    # Option values each named preset (`core.preset`) gives this method unless the user sets them.
    preset_options: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init__(self, options: Any | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None = None) -> Method:
        """Instantiate with `--opt` overrides (strings are coerced to the option's type)."""
        return cls(build_options(cls.Options, dict(overrides or {}), cls.key))

    def views(self, res: int) -> dict[str, View]:
        """Input views at run resolution `res`; baselines take one augmented image."""
        return {"image": View(res, augment=True)}

    def build(self, ctx: BuildContext) -> PetlModel:  # pragma: no cover - abstract
        """Build the trainable model from the backbone described by `ctx`."""
        raise NotImplementedError

    def resolved_options(self) -> dict[str, Any]:
        """Options as a plain dict (stored in results and hashed into the run id)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.options).items()}


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a Method subclass under its `key`."""
    if not cls.key or not cls.display_name:
        raise ValueError(f"{cls.__name__} must set `key` and `display_name`")
    METHODS.register(cls.key, cls)
    return cls


def get_method(key: str) -> type[Method]:
    """The Method class registered under `key` (loading built-ins and plugins first)."""
    load_plugins()
    return METHODS.get(key)


def method_keys() -> list[str]:
    """All known method keys (built-ins and plugins), ordered by each class's `rank`, then key."""
    load_plugins()
    return sorted(METHODS.names(), key=lambda key: (METHODS.get(key).rank, key))


def parse_method_keys(methods: str | Sequence[str]) -> list[str]:
    """'all' (every registered method, in rank order) or comma-separated / listed keys, validated, duplicates
    dropped; an unknown key raises `RegistryError` with suggestions."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    if methods == ["all"]:
        return method_keys()
    for key in methods:
        get_method(key)
    return list(dict.fromkeys(methods))


_plugins_loaded = False


def load_plugins() -> None:
    """Register built-in methods (lazily) and third-party ones (entry points, PETLBENCH_PLUGINS files)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib.util
    import os
    import sys
    from importlib.metadata import entry_points

    from petlbench.core.catalog import PLUGIN_GROUP, builtin_method_modules

    for key in builtin_method_modules():
        if key not in METHODS:
            METHODS.register_lazy(key, f"petlbench.methods.{key}")
    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()  # the module registers itself with @register_method
    for path in filter(None, os.environ.get("PETLBENCH_PLUGINS", "").split(os.pathsep)):
        name = f"petlbench_plugin_{Path(path).stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None or not Path(path).is_file():
            raise FileNotFoundError(f"PETLBENCH_PLUGINS names {path!r}, which is not a Python file")
        module = importlib.util.module_from_spec(spec)
        # dataclasses (and pickling) look the module up by name while it executes: it must be in sys.modules
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
