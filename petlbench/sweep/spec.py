"""Sweep specs: a YAML file (or `petlbench sweep` flags) naming every axis of a sweep, parsed into a typed dataclass.

A spec lists methods, datasets, backbones (timm name plus where the weights come from), resolutions, seeds,
per-method option grids and a learning-rate x weight-decay grid. Each (method, option point, dataset, backbone,
resolution) is one *cell*: its grid is searched with the first seed on validation AUC, then the best point is run
on every seed. Errors name the file, the key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from petlbench.backbones.attention import ATTENTION_CHOICES
from petlbench.core.config import Amp, Attention
from petlbench.core.yamlfile import read_yaml

EMBEDDED = "embedded"  # dataset name meaning the embedded synthetic dataset (`petlbench run` without --dataset)
SPEC_KEYS = (
    "name",
    "description",
    "methods",
    "datasets",
    "backbones",
    "resolutions",
    "seeds",
    "grid",
    "method_grids",
    "method_options",
    "epochs",
    "batch_size",
    "device",
    "amp",
    "attention",
    "preset",
    "workers",
    "skip_bad_images",
    "profile",
    "log_to",
    "results",
    "data_root",
    "max_retries",
)
GRID_KEYS = ("lr", "weight_decay")


def _preset(value: Any, where: Any) -> str | None:
    """A known preset name, or None when the spec names none."""
    from petlbench.core.preset import PRESETS

    if value is None:
        return None
    if not isinstance(value, str) or value not in PRESETS:
        raise where.fail("preset", f"expected one of {', '.join(PRESETS)}, got {value!r}")
    return value


BACKBONE_KEYS = ("name", "pretrained", "weights")
AMP_CHOICES: tuple[Amp, ...] = ("none", "bf16")

Choice = TypeVar("Choice", bound=str)


class SweepSpecError(ValueError):
    """A sweep spec that cannot be used: the message names the file, the key and what is wrong."""


@dataclass(frozen=True)
class BackboneChoice:
    """One backbone of a sweep: a timm ViT name (with its weight tag) and where its weights come from."""

    name: str
    pretrained: bool = False
    weights: str | None = None

    @property
    def label(self) -> str:
        """Short human-readable label: name plus weights source."""
        if self.weights:
            return f"{self.name}[file:{Path(self.weights).name}]"
        return f"{self.name}[{'pretrained' if self.pretrained else 'random-init'}]"


@dataclass(frozen=True)
class HyperGrid:
    """The learning-rate x weight-decay grid searched on validation; None = the `run` default (card's rate)."""

    lr: tuple[float, ...] | None = None
    weight_decay: tuple[float, ...] | None = None

    def points(self) -> list[tuple[float | None, float | None]]:
        """Grid points in a fixed order (lr-major); ties in the search go to the earlier point."""
        return list(itertools.product(self.lr or (None,), self.weight_decay or (None,)))


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep: every axis, the hyperparameter grid and the shared training settings."""

    name: str
    methods: tuple[str, ...]
    datasets: tuple[str | None, ...] = (None,)  # card names, folders, manifests; None = embedded synthetic data
    backbones: tuple[BackboneChoice | None, ...] = (None,)  # None = `petlbench run`'s default backbone
    resolutions: tuple[int, ...] = (512,)
    seeds: tuple[int, ...] = (0,)
    grid: HyperGrid = field(default_factory=HyperGrid)
    method_grids: Mapping[str, Mapping[str, tuple[Any, ...]]] = field(default_factory=dict)
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    amp: Amp = "none"
    attention: Attention = "auto"
    preset: str | None = None  # `core.preset` name: conventions for every knob the spec leaves unset
    workers: int = 0
    skip_bad_images: bool = False
    profile: bool = True
    log_to: tuple[str, ...] = ()  # experiment trackers fed every run's epochs (`reports.tracker`)
    results: str | None = None
    data_root: str | None = None
    max_retries: int = 2
    description: str = ""
    source: str = "<flags>"  # the file the spec came from (for messages)

    def option_points(self, method: str) -> list[dict[str, str]]:
        """Every option point of `method`: its fixed options combined with each point of its option grid."""
        fixed = {k: _option_text(v) for k, v in (self.method_options.get(method) or {}).items()}
        grid = self.method_grids.get(method) or {}
        keys = sorted(grid)
        points = []
        for values in itertools.product(*(grid[k] for k in keys)):
            point = dict(fixed)
            point.update({k: _option_text(v) for k, v in zip(keys, values, strict=True)})
            points.append(point)
        return points or [fixed]

    def with_overrides(self, **overrides: Any) -> SweepSpec:
        """A copy with the given fields replaced (None values are ignored: "flag not given")."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self


def _option_text(value: Any) -> str:
    """An option value as `--opt` text, so a sweep resolves options exactly like `petlbench run` does."""
    if isinstance(value, (list, tuple)):
        return ",".join(_option_text(v) for v in value)
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


class _Where:
    """Error context: the spec file and the key path being parsed."""

    def __init__(self, source: str) -> None:
        """Remember the spec's source for messages."""
        self.source = source

    def fail(self, key: str, problem: str) -> SweepSpecError:
        """An error naming the file, the key and the problem."""
        return SweepSpecError(f"sweep spec {self.source}: key '{key}': {problem}")


def _as_list(value: Any, key: str, where: _Where) -> list[Any]:
    """A list from a YAML list, a scalar, or a comma-separated string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    raise where.fail(key, f"expected a list (or a comma-separated string), got {type(value).__name__} {value!r}")


def _number(value: Any, key: str, where: _Where, kind: type = float) -> Any:
    """A number; YAML reads `1e-5` (no dot) as a string, so numeric strings are accepted too."""
    if isinstance(value, bool):
        raise where.fail(key, f"expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip())):
            return int(value)
        raise where.fail(key, f"expected an integer, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise where.fail(key, f"expected a number, got {value!r}") from None


def _numbers(
    value: Any, key: str, where: _Where, kind: type, minimum: float | None = None, positive: bool = False
) -> tuple[Any, ...]:
    """A non-empty tuple of distinct numbers, each checked against the bounds."""
    items = _as_list(value, key, where)
    if not items:
        raise where.fail(key, "must list at least one value")
    out = []
    for i, item in enumerate(items):
        number = _number(item, f"{key}[{i}]", where, kind)
        if positive and number <= 0:
            raise where.fail(f"{key}[{i}]", f"must be > 0, got {number}")
        if minimum is not None and number < minimum:
            raise where.fail(f"{key}[{i}]", f"must be >= {minimum}, got {number}")
        out.append(number)
    duplicates = sorted({x for x in out if out.count(x) > 1})
    if duplicates:
        raise where.fail(key, f"duplicate value(s) {', '.join(map(str, duplicates))}")
    return tuple(out)


def _choice(value: Any, key: str, where: _Where, choices: Sequence[Choice]) -> Choice:
    """One of `choices` (typed as the choices are: `Amp`, `Attention`)."""
    for choice in choices:
        if value == choice:
            return choice
    raise where.fail(key, f"{value!r} is not one of {', '.join(choices)}")


def _bool(value: Any, key: str, where: _Where) -> bool:
    """A YAML boolean."""
    if not isinstance(value, bool):
        raise where.fail(key, f"expected true or false, got {value!r}")
    return value


def _trackers(value: Any, where: _Where) -> tuple[str, ...]:
    """Experiment tracker names (`reports.tracker`), each known."""
    from petlbench.reports.tracker import TRACKERS

    items = [str(item) for item in _as_list(value, "log_to", where)]
    for i, item in enumerate(items):
        if item not in TRACKERS:
            raise where.fail(f"log_to[{i}]", f"{item!r} is not one of {', '.join(TRACKERS)}")
    return tuple(dict.fromkeys(items))


def _unknown_keys(data: Mapping[str, Any], allowed: Sequence[str], prefix: str, where: _Where) -> None:
    """Reject keys not in `allowed`, suggesting the closest one."""
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
            raise where.fail(f"{prefix}{key}", f"unknown key{hint}")


def _methods(value: Any, where: _Where) -> tuple[str, ...]:
    """Method keys ('all' for every method), each known."""
    from petlbench.core.method import method_keys

    known = method_keys()
    items = [str(m) for m in _as_list(value, "methods", where)]
    if items == ["all"]:
        return tuple(known)
    if not items:
        raise where.fail("methods", "must list at least one method")
    for i, item in enumerate(items):
        if item not in known:
            close = difflib.get_close_matches(item, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise where.fail(f"methods[{i}]", f"unknown method {item!r}{hint}; known methods: {', '.join(known)}")
    if len(set(items)) != len(items):
        raise where.fail("methods", "a method is listed twice")
    return tuple(items)


def _datasets(value: Any, where: _Where) -> tuple[str | None, ...]:
    """Dataset specs; 'embedded' (or null) becomes None."""
    if value is None:
        return (None,)
    items = _as_list(value, "datasets", where)
    if not items:
        raise where.fail("datasets", "must list at least one dataset (card name, folder, manifest or 'embedded')")
    out: list[str | None] = []
    for i, item in enumerate(items):
        if item is None or str(item) == EMBEDDED:
            out.append(None)
        elif isinstance(item, str) and item.strip():
            out.append(item.strip())
        else:
            raise where.fail(f"datasets[{i}]", f"expected a card name, a path or '{EMBEDDED}', got {item!r}")
    if len(set(out)) != len(out):
        raise where.fail("datasets", "a dataset is listed twice")
    return tuple(out)


def _backbones(value: Any, where: _Where) -> tuple[BackboneChoice | None, ...]:
    """Backbones given as timm names or as {name, pretrained, weights} mappings."""
    if value is None:
        return (None,)
    items = value if isinstance(value, list) else _as_list(value, "backbones", where)
    if not items:
        raise where.fail("backbones", "must list at least one backbone")
    out: list[BackboneChoice | None] = []
    for i, item in enumerate(items):
        key = f"backbones[{i}]"
        if isinstance(item, str):
            out.append(BackboneChoice(item.strip()))
            continue
        if not isinstance(item, dict):
            raise where.fail(key, f"expected a timm model name or a mapping with {', '.join(BACKBONE_KEYS)}")
        _unknown_keys(item, BACKBONE_KEYS, f"{key}.", where)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise where.fail(f"{key}.name", "a timm model name is required, e.g. vit_base_patch16_224.augreg_in21k")
        weights = item.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise where.fail(f"{key}.weights", f"expected a file path, got {weights!r}")
        pretrained = _bool(item.get("pretrained", False), f"{key}.pretrained", where)
        out.append(BackboneChoice(name.strip(), pretrained=pretrained, weights=weights))
    if len(set(out)) != len(out):
        raise where.fail("backbones", "a backbone is listed twice")
    return tuple(out)


def _grid(value: Any, where: _Where) -> HyperGrid:
    """The lr x weight-decay grid."""
    if value is None:
        return HyperGrid()
    if not isinstance(value, dict):
        raise where.fail("grid", "expected a mapping with lr and/or weight_decay lists")
    _unknown_keys(value, GRID_KEYS, "grid.", where)
    lr = value.get("lr")
    wd = value.get("weight_decay")
    return HyperGrid(
        lr=None if lr is None else _numbers(lr, "grid.lr", where, float, positive=True),
        weight_decay=None if wd is None else _numbers(wd, "grid.weight_decay", where, float, minimum=0.0),
    )


def _method_table(value: Any, key: str, where: _Where, grid: bool) -> dict[str, Any]:
    """Per-method option mappings ({method: {option: value}}); option names and values are checked."""
    from petlbench.core.method import get_method, method_keys
    from petlbench.core.options import OptionError

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise where.fail(key, "expected a mapping {method: {option: value}}")
    known = method_keys()
    table: dict[str, Any] = {}
    for method, options in value.items():
        mkey = f"{key}.{method}"
        if method not in known:
            raise where.fail(mkey, f"unknown method; known methods: {', '.join(known)}")
        if not isinstance(options, dict):
            raise where.fail(mkey, "expected a mapping {option: value}")
        cls = get_method(method)
        names = [f.name for f in dataclasses.fields(cls.Options)]
        _unknown_keys(options, names or ["(this method has no options)"], f"{mkey}.", where)
        entry: dict[str, Any] = {}
        for option, raw in options.items():
            okey = f"{mkey}.{option}"
            values = list(raw) if grid and isinstance(raw, list) else [raw]
            if grid and not values:
                raise where.fail(okey, "an option grid needs at least one value")
            for candidate in values:
                try:
                    cls.from_overrides({option: _option_text(candidate)})
                except OptionError as err:
                    raise where.fail(okey, str(err)) from None
            if grid and len({_option_text(v) for v in values}) != len(values):
                raise where.fail(okey, "duplicate value in the option grid")
            entry[option] = tuple(values) if grid else raw
        table[method] = entry  # methods not in this sweep are validated too: a typo must not pass silently
    return table


def parse_spec(data: Any, source: str = "<spec>") -> SweepSpec:
    """Validate the YAML content of a sweep spec and build the typed spec."""
    where = _Where(source)
    if not isinstance(data, dict):
        raise SweepSpecError(f"sweep spec {source}: expected a mapping of keys, got {type(data).__name__}")
    _unknown_keys(data, SPEC_KEYS, "", where)
    if "methods" not in data:
        raise where.fail("methods", "required: a list of method keys, or 'all'")
    methods = _methods(data["methods"], where)
    name = data.get("name") or (Path(source.split(" (")[0]).stem if not source.startswith("<") else "sweep")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
        raise where.fail("name", f"{name!r}: use letters, digits, '_', '-' and '.' only (it names files)")
    resolutions = _numbers(data.get("resolutions", [512]), "resolutions", where, int, positive=True)
    seeds = _numbers(data.get("seeds", [0]), "seeds", where, int, minimum=0)
    optional_int = {}
    for key, minimum in (("epochs", 1), ("batch_size", 1)):
        value = data.get(key)
        if value is not None:
            number = _number(value, key, where, int)
            if number < minimum:
                raise where.fail(key, f"must be >= {minimum}, got {number}")
            optional_int[key] = number
    workers = _number(data.get("workers", 0), "workers", where, int)
    max_retries = _number(data.get("max_retries", 2), "max_retries", where, int)
    if workers < 0 or max_retries < 0:
        raise where.fail("workers" if workers < 0 else "max_retries", "must be >= 0")
    device = str(data.get("device", "auto"))
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise where.fail("device", f"{device!r}: use auto, cpu, cuda or cuda:N")
    for key in ("results", "data_root", "description"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise where.fail(key, f"expected a string, got {data[key]!r}")
    spec = SweepSpec(
        name=str(name),
        methods=methods,
        datasets=_datasets(data.get("datasets"), where),
        backbones=_backbones(data.get("backbones"), where),
        resolutions=resolutions,
        seeds=seeds,
        grid=_grid(data.get("grid"), where),
        method_grids=_method_table(data.get("method_grids"), "method_grids", where, grid=True),
        method_options=_method_table(data.get("method_options"), "method_options", where, grid=False),
        epochs=optional_int.get("epochs"),
        batch_size=optional_int.get("batch_size"),
        device=device,
        amp=_choice(data.get("amp", "none"), "amp", where, AMP_CHOICES),
        attention=_choice(data.get("attention", "auto"), "attention", where, ATTENTION_CHOICES),
        preset=_preset(data.get("preset"), where),
        workers=workers,
        skip_bad_images=_bool(data.get("skip_bad_images", False), "skip_bad_images", where),
        profile=_bool(data.get("profile", True), "profile", where),
        log_to=_trackers(data.get("log_to") or [], where),
        results=data.get("results"),
        data_root=data.get("data_root"),
        max_retries=max_retries,
        description=str(data.get("description") or "").strip(),
        source=source,
    )
    for method, grid in spec.method_grids.items():
        overlap = set(grid) & set(spec.method_options.get(method) or {})
        if overlap:
            raise where.fail(
                f"method_grids.{method}", f"option(s) {', '.join(sorted(overlap))} also fixed in method_options"
            )
    check_backbones(spec)
    return spec


def check_backbones(spec: SweepSpec) -> None:
    """Every backbone must be a timm ViT whose patch size divides every resolution (no weights are loaded)."""
    from petlbench.backbones.vit import BackboneError, check_resolution

    where = _Where(spec.source)
    for i, backbone in enumerate(spec.backbones):
        if backbone is None:
            continue
        for res in spec.resolutions:
            try:
                check_resolution(backbone.name, res)
            except BackboneError as err:
                raise where.fail(f"backbones[{i}]", str(err)) from None


def read_spec_data(path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw YAML mapping of a spec file (a path, or a built-in spec's name) and the file's path."""
    resolved = resolve_spec_path(path)
    data = read_yaml(resolved, "sweep spec", SweepSpecError)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepSpecError(f"sweep spec {resolved}: expected a mapping of keys, got {type(data).__name__}")
    return data, str(resolved)


def load_spec(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep spec file, with command-line values (spec keys) taking precedence.

    Without a file the overrides alone make the spec (`petlbench sweep --methods ... --lr ...`).
    """
    data, source = read_spec_data(path) if path is not None else ({}, "<flags>")
    merged = dict(data)
    for key, value in (overrides or {}).items():
        if key == "grid" and isinstance(merged.get("grid"), dict) and isinstance(value, dict):
            merged["grid"] = {**merged["grid"], **value}
        elif key in ("method_grids", "method_options") and isinstance(value, dict):
            merged[key] = _merge_method_table(merged.get(key), value)
        else:
            merged[key] = value
    for given, other in (("method_options", "method_grids"), ("method_grids", "method_options")):
        for method, options in ((overrides or {}).get(given) or {}).items():
            table = merged.get(other)
            if isinstance(table, dict) and isinstance(table.get(method), dict) and isinstance(options, dict):
                table[method] = {k: v for k, v in table[method].items() if k not in options}
    if path is not None and overrides:
        source = f"{source} (with command-line overrides)"
    if "methods" not in merged and path is None:
        merged["methods"] = "all"
    return parse_spec(merged, source)


def _merge_method_table(base: Any, update: Mapping[str, Any]) -> Any:
    """Per-method option tables merged option by option (`update` wins)."""
    if not isinstance(base, dict):
        return dict(update)
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for method, options in update.items():
        if isinstance(merged.get(method), dict) and isinstance(options, dict):
            merged[method].update(options)
        else:
            merged[method] = options
    return merged


def builtin_specs_dir() -> Path:
    """Folder of the specs shipped with petlbench (paper.yaml, smoke.yaml)."""
    from petlbench.data.cards import shipped_folder

    return shipped_folder("sweeps")


def resolve_spec_path(path: str | Path) -> Path:
    """A spec file path; a bare name like `paper` means the built-in datasets/sweeps/paper.yaml."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    builtin = builtin_specs_dir() / f"{Path(path).stem}.yaml"
    if candidate.suffix in ("", ".yaml", ".yml") and builtin.is_file() and len(candidate.parts) == 1:
        return builtin
    shipped = ", ".join(p.stem for p in sorted(builtin_specs_dir().glob("*.yaml")))
    raise SweepSpecError(f"sweep spec {path}: no such file (built-in specs: {shipped or 'none'})")
