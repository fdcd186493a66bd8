"""`petlbench run` as a function: resolve defaults, open the data once, train every (method, seed), summarise."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from petlbench.backbones.vit import TINY_BACKBONE, check_resolution
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
from petlbench.core.results import FINISHED, ResultStore
from petlbench.data.source import DatasetSource
from petlbench.engine.callbacks import RunCallback
from petlbench.engine.metrics import mean_std
from petlbench.engine.training import ProgressHooks, run_training

# The embedded default: what `petlbench run` trains on a machine with no data and no GPU.
EMBEDDED_EPOCHS = 3
EMBEDDED_BATCH_SIZE = 8


class RunRequestError(ValueError):
    """A `petlbench run` request that cannot be carried out as given."""


@dataclass
class RunRequest:
    """The user's request, with None meaning "not given" (so defaults can depend on the situation)."""

    methods: Sequence[str] | str = "all"
    dataset: str | None = None
    results: Path = Path("results")
    res: int = 512
    backbone: str | None = None
    pretrained: bool = False
    weights: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
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


@dataclass
class ResolvedRun:
    """Everything decided before training starts."""

    methods: list[Method]
    source: DatasetSource
    backbone: BackboneSpec
    configs: list[tuple[Method, RunConfig]]
    notes: list[str] = field(default_factory=list)


def build_methods(keys: list[str], opts: Sequence[str]) -> list[Method]:
    """Instantiate methods with their `--opt` overrides; options for methods not run are still validated."""
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
        return [get_method(k).from_overrides(overrides.get(k, {})) for k in keys]
    except OptionError as err:
        raise RunRequestError(str(err)) from None


def dataset_slug(spec: str | None) -> str:
    """Folder name for a dataset's split files under the results root."""
    if spec is None:
        return "synthetic"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).name or str(spec)) or "dataset"


def resolve(request: RunRequest, log: Callable[[str], None] = print) -> ResolvedRun:
    """Apply defaults (embedded dataset, tiny ViT without a GPU), validate, and expand into run configs."""
    from petlbench.data.discover import open_dataset

    check_run_values(
        epochs=request.epochs,
        batch_size=request.batch_size,
        res=request.res,
        lr=request.lr,
        weight_decay=request.weight_decay,
        num_workers=request.workers,
        amp=request.amp,
        attention=request.attention,
    )
    for seed in request.seeds:
        check_run_values(seed=seed)
    keys = parse_method_keys(request.methods)
    methods = build_methods(keys, request.opts)
    notes: list[str] = []
    embedded = request.dataset is None
    has_gpu = torch.cuda.is_available() and request.device != "cpu"
    backbone_name = request.backbone
    if backbone_name is None:
        if embedded and not has_gpu:
            backbone_name = TINY_BACKBONE
            notes.append(
                f"embedded default: no --dataset and no GPU, so the synthetic lesion dataset and timm's tiny "
                f"ViT '{TINY_BACKBONE}' (random init) are used; pass --dataset/--backbone for real runs"
            )
        else:
            backbone_name = "vit_base_patch16_224"
    check_resolution(backbone_name, request.res)
    backbone = BackboneSpec(backbone_name, pretrained=request.pretrained, weights=request.weights)
    weights_label = backbone.weights_label
    if request.weights:
        if not Path(request.weights).is_file():
            raise RunRequestError(f"--weights {request.weights}: no such file")
        weights_label = f"file:{Path(request.weights).name}#{file_digest(request.weights)}"
    if weights_label == "random-init":
        notes.append(f"backbone {backbone_name}: random initialisation (no --pretrained or --weights)")

    source = open_dataset(
        request.dataset,
        split_dir=Path(request.results) / "datasets" / dataset_slug(request.dataset),
        seed=0,
        skip_bad_images=request.skip_bad_images,
        log=log,
    )
    card_lr = _card_lr(request.dataset)
    small = embedded and not has_gpu
    epochs = request.epochs if request.epochs is not None else (EMBEDDED_EPOCHS if small else PAPER_EPOCHS)
    batch_size = (
        request.batch_size if request.batch_size is not None else (EMBEDDED_BATCH_SIZE if small else PAPER_BATCH_SIZE)
    )
    lr = request.lr if request.lr is not None else (card_lr or PAPER_LR)
    weight_decay = request.weight_decay if request.weight_decay is not None else PAPER_WEIGHT_DECAY
    from petlbench.core.environment import resolve_device

    device = resolve_device(request.device)
    if request.amp != "none" and device.type != "cuda":
        notes.append(f"--amp {request.amp} ignored on {device.type}: autocast is used on CUDA only")
    fingerprint = source.fingerprint()
    configs = []
    for method in methods:
        for seed in request.seeds:
            cfg = RunConfig(
                method=method.key,
                dataset=source.name,
                dataset_fingerprint=fingerprint,
                backbone=backbone_name,
                weights=weights_label,
                res=request.res,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                seed=int(seed),
                method_options=method.resolved_options(),
                device=str(device),
                amp=request.amp if device.type == "cuda" else "none",
                attention=request.attention,
                skip_bad_images=request.skip_bad_images,
                dataset_path=str(source.root),
                num_workers=request.workers,
                weights_path=str(Path(request.weights).resolve()) if request.weights else "",
            )
            configs.append((method, cfg))
    return ResolvedRun(methods, source, backbone, configs, notes)


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

    `callbacks()` makes the observers of each run (the CLI passes `reports.callbacks.run_callbacks`).
    """
    hooks = hooks or ProgressHooks()
    records = []
    for i, (method, cfg) in enumerate(resolved.configs):
        stored = store.load(cfg.run_id) if not force and store.is_finished(cfg.run_id) else None
        if stored is not None:
            on_run(i, len(resolved.configs), cfg, "skipped")
            hooks.log(f"skip {method.key} seed {cfg.seed}: already finished ({cfg.run_id})")
            records.append(stored)
            continue
        on_run(i, len(resolved.configs), cfg, "running")
        record = run_training(cfg, resolved.source, store, hooks, callbacks())
        on_run(i + 1, len(resolved.configs), cfg, record["status"])
        records.append(record)
    return records


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: trainable %, val and test AUC mean ± std over finished seeds, failures counted."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_method.setdefault(record["config"]["method"], []).append(record)
    rows = []
    for key, group in by_method.items():
        done = [r for r in group if r.get("status") == FINISHED]
        val_mean, val_std = mean_std([r["metrics"]["val_auc"] for r in done])
        test_mean, test_std = mean_std([r["metrics"]["test_auc"] for r in done])
        ratio = next((r["params"]["ratio_pct"] for r in done if r.get("params")), math.nan)
        rows.append(
            {
                "method": key,
                "name": group[0].get("method_name") or key,
                "ratio_pct": ratio,
                "val_auc": (val_mean, val_std),
                "test_auc": (test_mean, test_std),
                "finished": len(done),
                "runs": len(group),
                "statuses": sorted({str(r.get("status")) for r in group if r.get("status") != FINISHED}),
            }
        )
    return rows
