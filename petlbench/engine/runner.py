"""`petlbench run` as a function: resolve defaults, open the data once, train every (method, seed), summarise."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from petlbench.backbones.position import POS_INTERP_CHOICES
from petlbench.backbones.vit import TINY_BACKBONE, check_resolution, patch_size_of
from petlbench.core.config import (
    PAPER_BATCH_SIZE,
    PAPER_EPOCHS,
    PAPER_LR,
    PAPER_WEIGHT_DECAY,
    Amp,
    Attention,
    RunConfig,
    check_run_values,
    file_digest,
)
from petlbench.core.method import BackboneSpec, Method, get_method, method_keys, parse_method_keys
from petlbench.core.options import OptionError, parse_opt_flags
from petlbench.core.preset import Preset, get_preset, method_overrides
from petlbench.core.preset import backbone_name as backbone_name_for
from petlbench.core.results import BUSY, FAILED, FINISHED, ResultsFolderError, ResultStore, describe_holder, utc_now
from petlbench.data.source import DatasetSource
from petlbench.engine.callbacks import RunCallback
from petlbench.engine.metrics import mean_std
from petlbench.engine.training import ProgressHooks, run_training

# The embedded default: what `petlbench run` trains on a machine with no data and no GPU.
EMBEDDED_EPOCHS = 3
EMBEDDED_BATCH_SIZE = 8
AUTO = "auto"  # `--res auto` / `--batch-size auto`: the largest that fits the GPU budget, per method


@dataclass(frozen=True)
class PlannedSize:
    """The resolution and batch size a size planner chose for one method, and how (stored with the run)."""

    res: int
    batch_size: int
    how: str


class SizePlanner(Protocol):
    """Chooses `res` (given `batch_size`) or `batch_size` (given `res`) for a method; the other one is None.
    Raises ValueError, saying why, when nothing fits or no budget is known."""

    def __call__(
        self,
        method: Method,
        backbone: BackboneSpec,
        *,
        res: int | None,
        batch_size: int | None,
        num_classes: int,
        attention: str,
        device: torch.device,
    ) -> PlannedSize: ...


class RunRequestError(ValueError):
    """A `petlbench run` request that cannot be carried out as given."""


@dataclass
class RunRequest:
    """The user's request, with None meaning "not given" (so defaults can depend on the situation)."""

    methods: Sequence[str] | str = "all"
    dataset: str | None = None
    results: Path = Path("results")
    res: int | str = 512  # or AUTO
    backbone: str | None = None
    pretrained: bool = False
    weights: str | None = None
    epochs: int | None = None
    batch_size: int | str | None = None  # or AUTO
    lr: float | None = None
    weight_decay: float | None = None
    seeds: Sequence[int] = (0,)
    opts: Sequence[str] = ()
    device: str = "auto"
    amp: Amp = "none"
    attention: Attention = "auto"
    force: bool = False
    skip_bad_images: bool = False
    workers: int = 0
    profile: bool = True
    preset: str | None = None  # `core.preset`: conventions for every knob left unset (None: petlbench's own)
    pos_interp: str | None = None  # None: the preset's, else "timm"
    allow_leakage: bool = False  # train although identical image files occur in several splits (recorded)


@dataclass
class ResolvedRun:
    """Everything decided before training starts."""

    methods: list[Method]
    source: DatasetSource
    backbone: BackboneSpec
    configs: list[tuple[Method, RunConfig]]
    notes: list[str] = field(default_factory=list)


def build_methods(keys: list[str], opts: Sequence[str], preset: Preset | None = None) -> list[Method]:
    """Instantiate methods with their `--opt` overrides over the preset's settings; options for methods not run are
    still validated."""
    try:
        overrides = parse_opt_flags(list(opts))
    except OptionError as err:
        raise RunRequestError(str(err)) from None
    known = method_keys()
    for key in overrides:
        if key not in known:
            raise RunRequestError(f"--opt names unknown method {key!r}; known methods: {', '.join(known)}")
    try:
        for key, values in overrides.items():
            if key not in keys:
                get_method(key).from_overrides(values)  # validate anyway: a typo must not pass silently
        chosen = preset or get_preset(None)
        return [
            get_method(k).from_overrides(method_overrides(chosen, get_method(k), dict(overrides.get(k, {}))))
            for k in keys
        ]
    except OptionError as err:
        raise RunRequestError(str(err)) from None


def check_results_folder(results: str | Path) -> None:
    """Raise RunRequestError (one line, what to do) unless runs can be stored under `results`; creates nothing.
    Not part of `resolve`, which also plans read-only (`sweep --status`, `--dry-run`)."""
    try:
        ResultStore(results).check_writable()
    except ResultsFolderError as err:
        raise RunRequestError(f"{err}: choose another with --results") from None


def resolve(
    request: RunRequest, log: Callable[[str], None] = print, size_planner: SizePlanner | None = None
) -> ResolvedRun:
    """Apply defaults (embedded dataset, tiny ViT without a GPU), validate, and expand into run configs;
    `size_planner` answers `--res auto` / `--batch-size auto`."""
    from petlbench.data.discover import adopt_legacy_split, open_dataset

    auto_res, auto_batch = _auto_axes(request, size_planner)
    check_run_values(
        epochs=request.epochs,
        batch_size=None if auto_batch else request.batch_size,
        res=None if auto_res else request.res,
        lr=request.lr,
        weight_decay=request.weight_decay,
        num_workers=request.workers,
        amp=request.amp,
        attention=request.attention,
    )
    for seed in request.seeds:
        check_run_values(seed=seed)
    preset = get_preset(request.preset)
    attention: Attention = request.attention
    if attention == "auto" and preset.attention is not None:
        attention = preset.attention
    pos_interp = request.pos_interp or preset.pos_interp or "timm"
    if pos_interp not in POS_INTERP_CHOICES:
        raise RunRequestError(f"--pos-interp {pos_interp!r}: use {' or '.join(POS_INTERP_CHOICES)}")
    keys = parse_method_keys(request.methods)
    methods = build_methods(keys, request.opts, preset)
    notes: list[str] = []
    if preset.name != "none":
        notes.append(f"preset {preset.name}: {preset.description}; flags given explicitly win")
    embedded = request.dataset is None
    has_gpu = torch.cuda.is_available() and request.device != "cpu"
    backbone_name = request.backbone
    if backbone_name is None and preset.backbone is not None:
        backbone_name = backbone_name_for(preset, None, request.pretrained, fallback="vit_base_patch16_224")
    if backbone_name is None:
        if embedded and not has_gpu:
            backbone_name = TINY_BACKBONE
            init = "" if request.weights or request.pretrained else " (random init)"
            notes.append(
                f"embedded default: no --dataset and no GPU, so the synthetic lesion dataset and timm's tiny "
                f"ViT '{TINY_BACKBONE}'{init} are used; pass --dataset/--backbone for real runs"
            )
        else:
            backbone_name = "vit_base_patch16_224"
    if not auto_res:
        check_resolution(backbone_name, int(request.res))
    backbone = BackboneSpec(
        backbone_name, pretrained=request.pretrained, weights=request.weights, pos_interp=pos_interp
    )
    weights_label = backbone.weights_label
    if request.weights:
        if not Path(request.weights).is_file():
            raise RunRequestError(f"--weights {request.weights}: no such file")
        # any resolution the backbone accepts shows whether the file fits it; 'auto' sizes are chosen later
        check_res = 16 * patch_size_of(backbone_name) if auto_res else int(request.res)
        notes.extend(check_weights(backbone, request.weights, check_res))
        weights_label = weights_file_label(request.weights)
        if weights_label.startswith("generated-pretrained:"):
            notes.append(
                f"--weights {Path(request.weights).name}: an LPM pre-trained on generated formula-driven images "
                f"({weights_label.split('#')[0]}), not on natural images"
            )
    if weights_label == "random-init":
        notes.append(f"backbone {backbone_name}: random initialisation (no --pretrained or --weights)")

    source = open_dataset(
        request.dataset,
        split_dir=adopt_legacy_split(request.results, request.dataset, log=log),
        seed=0,
        skip_bad_images=request.skip_bad_images,
        log=log,
        allow_leakage=request.allow_leakage,
    )
    card_lr = _card_lr(request.dataset)
    small = embedded and not has_gpu
    epochs = request.epochs if request.epochs is not None else (EMBEDDED_EPOCHS if small else PAPER_EPOCHS)
    batch_size = (
        int(request.batch_size)
        if request.batch_size is not None and not auto_batch
        else (EMBEDDED_BATCH_SIZE if small else PAPER_BATCH_SIZE)
    )
    lr = request.lr if request.lr is not None else (card_lr or PAPER_LR)
    weight_decay = request.weight_decay if request.weight_decay is not None else PAPER_WEIGHT_DECAY
    from petlbench.core.environment import resolve_device

    device = resolve_device(request.device)
    if request.amp != "none" and device.type != "cuda":
        notes.append(f"--amp {request.amp} ignored on {device.type}: autocast is used on CUDA only")
    fingerprint = source.fingerprint()
    sizes: dict[str, PlannedSize] = {}
    if auto_res or auto_batch:
        assert size_planner is not None  # _auto_axes refused otherwise
        for method in methods:
            try:
                sizes[method.key] = size_planner(
                    method,
                    backbone,
                    res=None if auto_res else int(request.res),
                    batch_size=batch_size if auto_res else None,
                    num_classes=source.num_classes,
                    attention=attention,
                    device=device,
                )
            except ValueError as err:
                flag = "--res" if auto_res else "--batch-size"
                raise RunRequestError(f"{flag} auto for {method.key}: {err}") from None
            notes.append(f"{method.key}: {sizes[method.key].how}")
    configs = []
    for method in methods:
        size = sizes.get(method.key)
        for seed in request.seeds:
            cfg = RunConfig(
                method=method.key,
                dataset=source.name,
                dataset_fingerprint=fingerprint,
                backbone=backbone_name,
                weights=weights_label,
                res=size.res if size else int(request.res),
                epochs=epochs,
                batch_size=size.batch_size if size else batch_size,
                lr=lr,
                weight_decay=weight_decay,
                seed=int(seed),
                method_options=method.resolved_options(),
                device=str(device),
                amp=request.amp if device.type == "cuda" else "none",
                attention=attention,
                skip_bad_images=request.skip_bad_images,
                dataset_path=str(source.root),
                num_workers=request.workers,
                weights_path=str(Path(request.weights).resolve()) if request.weights else "",
                pos_interp=pos_interp,
                preset=preset.name,
                size_plan=size.how if size else "",
            )
            configs.append((method, cfg))
    return ResolvedRun(methods, source, backbone, configs, notes)


def _auto_axes(request: RunRequest, size_planner: SizePlanner | None) -> tuple[bool, bool]:
    """Which of res / batch size the planner chooses; refuses anything else given as text."""
    auto_res, auto_batch = request.res == AUTO, request.batch_size == AUTO
    for flag, value, auto in (("--res", request.res, auto_res), ("--batch-size", request.batch_size, auto_batch)):
        if isinstance(value, str) and not auto:
            raise RunRequestError(f"{flag} {value!r}: give a positive integer or 'auto'")
    if auto_res and auto_batch:
        raise RunRequestError(
            "--res auto and --batch-size auto together: fix one of them; the planner finds the largest value of the "
            "other that fits"
        )
    if (auto_res or auto_batch) and size_planner is None:
        raise RunRequestError("'auto' sizes need a size planner here; give --res and --batch-size as numbers")
    return auto_res, auto_batch


def weights_file_label(path: str | Path) -> str:
    """How results name a weights file: its name and content digest, prefixed with the recipe when its card says
    it was pre-trained on generated images (`petlbench pretrain`)."""
    from petlbench.pretrain.train import generated_label, read_card

    label = f"file:{Path(path).name}#{file_digest(path)}"
    card = read_card(Path(path))
    return f"{generated_label(card)}:{label}" if card is not None else label


def check_weights(backbone: BackboneSpec, path: str | Path, res: int) -> list[str]:
    """Load a --weights file once and check that it holds `backbone`'s weights as timm's loader will see them
    (its checkpoint filter applied to a meta-device model); raises RunRequestError saying what is wrong, returns
    notes (tensors the backbone will not use)."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    from petlbench.backbones.vit import create_backbone

    try:
        state = load_state_dict(str(path))  # what create_backbone's loader reads: safetensors, or torch weights_only
    except Exception as err:  # noqa: BLE001 - any failure to read it is the same answer for the user
        raise RunRequestError(
            f"--weights {path}: not a readable checkpoint ({type(err).__name__}: {err}); give a .safetensors file "
            "or a PyTorch state dict saved with torch.save(model.state_dict(), ...)"
        ) from None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        keys = ", ".join(map(str, list(state)[:5])) if isinstance(state, dict) else type(state).__name__
        raise RunRequestError(f"--weights {path}: holds no tensors ({keys or 'empty'}); give the backbone's state dict")
    with torch.device("meta"):
        model = create_backbone(dataclasses.replace(backbone, weights=None, pretrained=False), res, 0)
    try:
        filtered = checkpoint_filter_fn(tensors, model)
    except Exception as err:  # noqa: BLE001 - timm's filter fails in many ways on a foreign checkpoint
        raise RunRequestError(
            f"--weights {path} does not fit {backbone.name}: timm's checkpoint filter failed ({type(err).__name__}: "
            f"{err})"
        ) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in filtered]
    if missing:
        found = ", ".join(list(filtered)[:3]) or "none"
        raise RunRequestError(
            f"--weights {path} does not hold the weights of {backbone.name}: {len(missing)} of {len(expected)} "
            f"tensors missing, such as {', '.join(_pick(missing))} (the file has e.g. {found})"
        )
    wrong = [(k, tuple(filtered[k].shape), shape) for k, shape in expected.items() if tuple(filtered[k].shape) != shape]
    if wrong:
        key, got, want = next((w for w in wrong if "blocks.0.attn.qkv" in w[0]), wrong[0])
        raise RunRequestError(
            f"--weights {path} is for another architecture than {backbone.name}: {len(wrong)} of {len(expected)} "
            f"tensors differ in shape, e.g. {key} is {list(got)} in the file and {list(want)} in {backbone.name}"
        )
    unused = [k for k in filtered if k not in expected and not k.startswith("head")]
    if unused:
        return [
            f"--weights {Path(path).name}: {len(unused)} tensors that {backbone.name} does not use, e.g. {unused[0]}"
        ]
    return []


def _pick(keys: list[str]) -> list[str]:
    """A few keys to name, the attention weights of the first block first (they say the most about the shape)."""
    first = [k for k in keys if k.startswith("blocks.0.attn.qkv")]
    return (first + [k for k in keys if k not in first])[:3]


def _card_lr(dataset: str | None) -> float | None:
    if dataset is None or Path(dataset).exists():
        return None  # a folder or manifest: no card learning rate, whatever its name
    try:
        from petlbench.data.cards import load_card

        card = load_card(dataset)
    except Exception:  # noqa: BLE001 - not a card name: a path
        return None
    lr = card.get("lr") if isinstance(card, dict) else getattr(card, "lr", None)
    return float(lr) if lr else None


def execute(
    resolved: ResolvedRun,
    store: ResultStore,
    force: bool = False,
    hooks: ProgressHooks | None = None,
    on_run: Callable[[int, int, RunConfig, str], None] = lambda i, n, cfg, status: None,
    callbacks: Callable[[], RunCallback] = RunCallback,
) -> list[dict[str, Any]]:
    """Train every config not already finished (unless `force`); a failure is recorded and the rest go on.

    Each run is trained under its claim (`ResultStore.claim`): a run another process is training is skipped and
    given the status BUSY (not stored, not a failure). `callbacks()` makes the observers of each run (the CLI
    passes `reports.callbacks.run_callbacks`).
    """
    hooks = hooks or ProgressHooks()
    since = utc_now()
    total = len(resolved.configs)
    records = []
    for i, (method, cfg) in enumerate(resolved.configs):
        label = f"{method.key} seed {cfg.seed}"
        done = _already_done(store, cfg.run_id, force, since)
        if done is None:
            try:
                holder = store.try_claim(cfg.run_id)
            except OSError as err:  # the claim cannot be written, so neither can the record: the run is not tried
                error = f"cannot write under {store.root}: {type(err).__name__}: {err}"
                hooks.log(f"{cfg.run_id}: {FAILED}: {error}")
                on_run(i + 1, total, cfg, FAILED)
                records.append(_outcome(cfg, method, FAILED, error=error))
                continue
            if holder is not None:
                hooks.log(f"{cfg.run_id} ({label}) is being trained by {describe_holder(holder)}; skipping")
                on_run(i + 1, total, cfg, BUSY)
                records.append(_outcome(cfg, method, BUSY, claimed_by=holder))
                continue
            try:
                done = _already_done(store, cfg.run_id, force, since)  # finished by the claim's last holder
                if done is None:
                    on_run(i, total, cfg, "running")
                    hooks.log(f"train {label} ({cfg.run_id})")
                    record = run_training(cfg, resolved.source, store, hooks, callbacks(), recheck=force)
                    on_run(i + 1, total, cfg, record["status"])
                    records.append(record)
                    continue
            finally:
                store.release(cfg.run_id)
        on_run(i, total, cfg, "skipped")
        hooks.log(
            f"skip {label}: {'redone by another process meanwhile' if force else 'already finished'} ({cfg.run_id})"
        )
        records.append(done)
    return records


def _already_done(store: ResultStore, run_id: str, force: bool, since: str) -> dict[str, Any] | None:
    """The run's finished record if it needs no training: finished, and with `force` finished by a run that
    started after `since` (another process redid it while this one waited)."""
    record = store.load(run_id)
    if record is None or record.get("status") != FINISHED:
        return None
    if force and str((record.get("timestamps") or {}).get("started") or "") < since:
        return None
    return record


def _outcome(cfg: RunConfig, method: Method, status: str, **extra: Any) -> dict[str, Any]:
    """The summary's entry for a run this process did not train (never stored)."""
    return {
        "run_id": cfg.run_id,
        "status": status,
        "method_name": method.display_name,
        "config": cfg.to_dict(),
        **extra,
    }


def format_mean_std(mean: float, std: float, n: int) -> str:
    """'72.53 ± 0.41 (n=3)'; one value has no spread: '72.53 ± — (n=1)'; none: '—' (as the reports write it)."""
    if n < 1 or not math.isfinite(mean):
        return "—"
    spread = f"{std:.2f}" if n > 1 and math.isfinite(std) else "—"
    return f"{mean:.2f} ± {spread} (n={n})"


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: trainable %, val and test AUC mean ± std over finished seeds (std NaN for fewer than
    two, shown '± —'), the number `n` of finished seeds, other outcomes counted."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_method.setdefault(record["config"]["method"], []).append(record)
    rows = []
    for key, group in by_method.items():
        done = [r for r in group if r.get("status") == FINISHED]
        val_mean, val_std = mean_std([r["metrics"]["val_auc"] for r in done])
        test_mean, test_std = mean_std([r["metrics"]["test_auc"] for r in done])
        if len(done) < 2:
            val_std = test_std = math.nan  # one seed has no spread ("± —"), not a spread of 0
        ratio = next((r["params"]["ratio_pct"] for r in done if r.get("params")), math.nan)
        rows.append(
            {
                "method": key,
                "name": group[0].get("method_name") or key,
                "ratio_pct": ratio,
                "val_auc": (val_mean, val_std),
                "test_auc": (test_mean, test_std),
                "finished": len(done),
                "n": len(done),
                "runs": len(group),
                "statuses": sorted({str(r.get("status")) for r in group if r.get("status") != FINISHED}),
            }
        )
    return rows
