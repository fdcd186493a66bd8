"""The papers' training and evaluation protocol, identical for every method.

AdamW (betas 0.9/0.999, decay on every trainable parameter), cosine annealing to 0 updated every
iteration, gradient clipping at norm 1.0, cross-entropy, best epoch chosen by validation AUC and the test
metrics of that epoch reported (the last epoch's test metrics are logged too).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from petlbench.backbones.attention import describe_attention
from petlbench.core.config import RunConfig
from petlbench.core.environment import environment, resolve_device
from petlbench.core.method import BackboneSpec, BuildContext, Method, PetlModel, get_method
from petlbench.core.results import FAILED, FINISHED, OOM, ResultStore, running_record, utc_now
from petlbench.data.source import DatasetSource
from petlbench.data.views import EpochSampler, ViewDataset
from petlbench.engine.artifacts import TRAINABLE_FILE, save_trainable, settle_trainable
from petlbench.engine.build import build_model
from petlbench.engine.callbacks import RunCallback, RunView
from petlbench.engine.metrics import classification_metrics
from petlbench.engine.step import flush_denormals, make_optimizer, train_step


@dataclass
class ProgressHooks:
    """Callbacks the CLI uses to drive progress bars; all optional."""

    on_epoch: Callable[[int, int], None] = lambda epochs_done, epochs: None
    on_batch: Callable[[int, int, str], None] = lambda done, total, phase: None
    log: Callable[[str], None] = print


@dataclass
class TrainState:
    """What the loop accumulates over a run."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_auc: float = -math.inf
    best_epoch: int = -1
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    train_seconds: float = 0.0
    images_trained: int = 0
    global_step: int = 0
    best_val_predictions: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing python, numpy or torch (CPU and CUDA) random states."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA and host out-of-memory errors (the CPU allocator says "can't allocate memory")."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def cosine_factor(step: int, steps_per_epoch: int, epochs: int) -> float:
    """lr multiplier at `step`: ½(1 + cos(π t / E)) with fractional epoch t = step / steps_per_epoch."""
    t = step / max(1, steps_per_epoch)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, epochs) / epochs))


def make_loader(dataset: Any, batch_size: int, train: bool, seed: int, workers: int) -> DataLoader:
    """A loader of (epoch, index) keys: training shuffles per (seed, epoch) and drops the last incomplete batch.

    Augmentation depends on (seed, epoch, index) only (`data.views`), so the worker count and whatever a method's
    construction drew from the global random stream change nothing: every method sees the same augmented images.
    """
    generator = torch.Generator()  # kept: without it each iteration draws worker seeds from the global stream
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed=seed, shuffle=train),
        drop_last=train,
        num_workers=workers,
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch dict to `device`."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _autocast(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.amp == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: PetlModel, loader: DataLoader, device: torch.device, cfg: RunConfig, hooks: ProgressHooks, phase: str
) -> dict[str, Any]:
    """Metrics of `model` on one split (softmax probabilities, AUC x100), plus every image's prediction under
    `predictions`: sample ids, labels and class probabilities in the loader's order."""
    model.eval()
    flush_denormals()
    labels, probs, indices = [], [], []
    for i, batch in enumerate(loader):
        batch = to_device(batch, device)
        with _autocast(cfg, device):
            logits = model(batch)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(batch["label"].cpu())
        indices.append(batch["index"].cpu())
        hooks.on_batch(i + 1, len(loader), phase)
    all_labels, all_probs = torch.cat(labels).numpy(), torch.cat(probs).numpy()
    metrics = classification_metrics(all_labels, all_probs)
    samples = getattr(loader.dataset, "samples", None)
    order = torch.cat(indices).tolist()
    metrics["predictions"] = {
        "sample_ids": [samples[i].sample_id for i in order] if samples is not None else order,
        "labels": all_labels.tolist(),
        "probs": [[round(float(p), 6) for p in row] for row in all_probs],
    }
    return metrics


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


def train_epochs(
    run: RunView,
    hooks: ProgressHooks,
    callbacks: RunCallback | None = None,
) -> TrainState:
    """The training loop: one optimizer step per batch, validation after every epoch."""
    callbacks = callbacks or RunCallback()
    model, loaders, cfg, device = run.model, run.loaders, run.cfg, run.device
    state = TrainState()
    params = model.trainable_parameters()
    optimizer = make_optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(loaders["train"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, steps_per_epoch, cfg.epochs)
    )
    sampler = loaders["train"].sampler
    for epoch in range(cfg.epochs):
        hooks.on_epoch(epoch, cfg.epochs)
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch)
        model.train()
        losses: list[float] = []
        regularisers: list[float] = []
        lr_first = optimizer.param_groups[0]["lr"]
        epoch_start = time.perf_counter()
        for i, batch in enumerate(loaders["train"]):
            batch = to_device(batch, device)
            callbacks.on_step_start(run)
            parts: dict[str, torch.Tensor] = {}
            lr_last = optimizer.param_groups[0]["lr"]
            loss = train_step(
                model,
                batch,
                optimizer,
                grad_clip=cfg.grad_clip,
                global_step=state.global_step,
                autocast=lambda: _autocast(cfg, device),
                parts=parts,
            )
            scheduler.step()
            state.global_step += 1
            callbacks.on_step_end(run, state.global_step, int(batch["label"].shape[0]))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {i + 1}")
            state.images_trained += int(batch["label"].shape[0])
            losses.append(float(parts["task"]))
            if "regulariser" in parts:
                regularisers.append(float(parts["regulariser"]))
            hooks.on_batch(i + 1, steps_per_epoch, "train")
        state.train_seconds += time.perf_counter() - epoch_start
        val = evaluate(model, loaders["val"], device, cfg, hooks, "val")
        state.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)) if losses else math.nan,  # the task loss alone
                "train_regulariser": float(np.mean(regularisers)) if regularisers else None,
                "lr": lr_first,  # learning rate of the epoch's first step (cosine, updated every step)
                "lr_last": lr_last if losses else lr_first,
                "val_auc": val["auc"],
                "val_acc": val["acc"],
                "epoch_train_seconds": time.perf_counter() - epoch_start,
            }
        )
        callbacks.on_epoch_end(run, state.history[-1])
        val_auc = val["auc"] if math.isfinite(val["auc"]) else -math.inf
        if val_auc > state.best_val_auc or state.best_epoch < 0:
            state.best_val_auc, state.best_epoch = val_auc, epoch + 1
            state.best_weights = _trainable_state(model)
            state.best_val_predictions = val["predictions"]
    hooks.on_epoch(cfg.epochs, cfg.epochs)
    return state


def build_loaders(splits: dict[str, Any], batch_size: int, seed: int, workers: int) -> dict[str, DataLoader]:
    """Train/val/test loaders over the (possibly method-prepared) split datasets."""
    return {name: make_loader(ds, batch_size, name == "train", seed, workers) for name, ds in splits.items()}


def run_training(
    cfg: RunConfig,
    source: DatasetSource,
    store: ResultStore,
    hooks: ProgressHooks | None = None,
    callbacks: RunCallback | None = None,
    recheck: bool = False,
) -> dict[str, Any]:
    """Train and evaluate one configuration (the method and backbone are rebuilt from it); returns the stored
    record whatever the outcome. `recheck` (a forced run) verifies whatever prepared data it reuses in full.

    `callbacks` observe the run (measurement, figure data) and contribute to the record's `efficiency` section.
    The caller holds the run's claim (`ResultStore.claim`). A re-run of a finished run trains beside it
    (attempt.json) and replaces result.json only once it finishes.
    """
    hooks = hooks or ProgressHooks()

    device = resolve_device(cfg.device)
    record = running_record(cfg.run_id, cfg.to_dict(), get_method(cfg.method).display_name)
    try:
        if store.save(record) == store.attempt_path(cfg.run_id):
            hooks.log(
                f"{cfg.run_id}: re-running a finished run; it replaces result.json only if it finishes "
                f"(until then: {store.attempt_path(cfg.run_id)})"
            )
    except OSError as error:
        record["status"] = FAILED
        record["error"] = f"could not write {store.result_path(cfg.run_id)}: {error.strerror or error}"
        record["timestamps"]["finished"] = utc_now()
        hooks.log(f"{cfg.run_id}: {record['status']}: {record['error']}")
        return record
    record["environment"] = environment(device)
    record["dataset"] = {
        "name": source.name,
        "root": str(source.root),
        "split_origin": source.split_origin,
        "class_names": source.classes,
        "class_counts": source.class_counts(),
        "skipped_files": source.skipped,
        "fingerprint": cfg.dataset_fingerprint,
        "identity": source.identity,
        "allow_leakage": source.allow_leakage,
        "leakage": source.leakage,
        "mean": list(source.mean),
        "std": list(source.std),
    }
    started = time.perf_counter()
    try:
        method, backbone = cfg.build_method(), cfg.backbone_spec()
        record.update(
            _train_and_test(cfg, method, source, backbone, store, device, hooks, callbacks or RunCallback(), recheck)
        )
        record["status"] = FINISHED
    except KeyboardInterrupt:
        raise  # leaves the "running" record: the run is redone next time
    except BaseException as error:  # noqa: BLE001 - one run's failure must not stop a sweep
        record["status"] = OOM if is_out_of_memory(error) else FAILED
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc(limit=20)
        hooks.log(f"{cfg.run_id}: {record['status']}: {record['error']}")  # plain text: never read as markup
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["timestamps"]["finished"] = utc_now()
    record["timestamps"]["wall_seconds"] = time.perf_counter() - started
    _store_final(store, record, hooks)
    return record


def _store_final(store: ResultStore, record: dict[str, Any], hooks: ProgressHooks) -> None:
    """Store the outcome of a run: retry a failed write once, then write the record outside the results folder
    (a trained run is not lost to a full disk); only when nothing can be written is the run failed."""
    run_id, target = record["run_id"], store.result_path(record["run_id"])
    error: OSError | None = None
    for _ in range(2):
        try:
            written = store.save(record)
        except OSError as err:
            error = err
            continue
        if written != target:
            hooks.log(
                f"{run_id}: {record['status']}; the finished record in {target} is kept, this attempt is in {written}"
            )
        settle_trainable(store.run_dir(run_id), finished=written == target and record["status"] == FINISHED)
        return
    reason = f"{error.strerror or error}" if error is not None else "unknown error"
    try:
        fallback = store.save_fallback(record)
    except OSError as err:
        earlier = f" (the run itself: {record['status']}: {record['error']})" if record.get("error") else ""
        record["status"] = FAILED
        record["error"] = f"could not store the record: {target}: {reason}; {err.strerror or err}{earlier}"
        hooks.log(f"{run_id}: {record['status']}: {record['error']}")
        return
    hooks.log(
        f"{run_id}: could not write {target} ({reason}); the {record['status']} record was written to {fallback} "
        f"instead: move it to {target} once there is room (a re-run would redo the run)"
    )


def _train_and_test(
    cfg: RunConfig,
    method: Method,
    source: DatasetSource,
    backbone: BackboneSpec,
    store: ResultStore,
    device: torch.device,
    hooks: ProgressHooks,
    callbacks: RunCallback,
    recheck: bool = False,
) -> dict[str, Any]:
    seed_everything(cfg.seed)
    views = method.views(cfg.res)
    n_train = len(source.split("train"))
    batch_size = min(cfg.batch_size, n_train)
    if batch_size < cfg.batch_size:
        hooks.log(f"batch size {cfg.batch_size} > {n_train} training images: using {batch_size}")
    steps_per_epoch = n_train // batch_size
    ctx = BuildContext(
        backbone=backbone,
        num_classes=source.num_classes,
        res=cfg.res,
        total_steps=cfg.epochs * steps_per_epoch,
        device=device,
        cache_dir=store.root / "cache",
        attention=cfg.attention,
        log=hooks.log,
        recheck=recheck,
    )
    model = build_model(method, ctx)
    splits = {
        name: ViewDataset(
            source.split(name), views, train=(name == "train"), mean=source.mean, std=source.std, seed=cfg.seed
        )
        for name in ("train", "val", "test")
    }
    prepare_start = time.perf_counter()
    with preserved_rng():  # building a cache or reusing one must leave the same random stream for training
        prepared = model.prepare_data(splits, ctx)
    prepare_seconds = time.perf_counter() - prepare_start
    model.place(device)
    trainable, total = model.param_report()
    _, official_total = model.param_report("official")
    loaders = build_loaders(prepared.splits, batch_size, cfg.seed, cfg.num_workers)
    run = RunView(cfg, method, model, ctx, device, loaders, batch_size, store.run_dir(cfg.run_id), hooks.log)
    callbacks.on_model_ready(run)
    callbacks.on_train_start(run)
    train_start = time.perf_counter()
    try:
        state = train_epochs(run, hooks, callbacks)
    finally:
        callbacks.on_train_end(run)
    train_seconds = time.perf_counter() - train_start
    last_test = evaluate(model, loaders["test"], device, cfg, hooks, "test")
    _load_trainable_state(model, state.best_weights)
    best_test = evaluate(model, loaders["test"], device, cfg, hooks, "test")
    save_trainable(model, run.run_dir, {"run_id": cfg.run_id, "method": cfg.method, "best_epoch": state.best_epoch})
    callbacks.on_test_end(run)
    predictions = {"val": state.best_val_predictions, "test": best_test.pop("predictions")}
    last_test.pop("predictions")
    eff: dict[str, Any] = {"attention": describe_attention(model)}
    eff.update(callbacks.results())
    eff.update(
        {
            "train_seconds": train_seconds,  # all epochs, validation included
            "train_loop_seconds": state.train_seconds,  # training batches only, data loading included
            "prepare_seconds": prepare_seconds,
            "end_to_end_images_per_s": state.images_trained / state.train_seconds if state.train_seconds else None,
        }
    )
    if prepared.info:
        eff["preload"] = prepared.info
        eff["preload_seconds"] = prepared.info.get("preload_seconds")
    return {
        "method_name": method.display_name,
        "params": {
            "trainable": trainable,
            "total": total,
            "ratio_pct": 100.0 * trainable / total,
            # as the FPT authors' code counts: the frozen LPM with its unused head and native position table
            "official_total": official_total,
            "official_ratio_pct": 100.0 * trainable / official_total,
        },
        "history": state.history,
        "metrics": {
            "best_epoch": state.best_epoch,
            "val_auc": state.best_val_auc if math.isfinite(state.best_val_auc) else None,
            "test_auc": best_test["auc"],
            "test_acc": best_test["acc"],
            "test": best_test,
            "last_epoch_test": last_test,
        },
        "efficiency": eff,
        "artifacts": {"trainable": TRAINABLE_FILE},  # in the run's folder; `petlbench predict RUN_ID IMAGES` uses it
        "predictions": predictions,  # best epoch's per-image probabilities (confidence intervals, paired tests)
        "batch_size_used": batch_size,
    }
