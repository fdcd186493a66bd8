"""Apply a finished run's model to new images: rebuild it from the run's configuration and its saved state."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from petlbench.core.config import RunConfig
from petlbench.core.method import BuildContext
from petlbench.core.results import FINISHED, ResultStore
from petlbench.data.source import Sample, sample_id_for
from petlbench.data.views import ViewDataset
from petlbench.engine.artifacts import TRAINABLE_FILE, load_trainable
from petlbench.engine.build import build_model
from petlbench.engine.step import flush_denormals
from petlbench.engine.training import preserved_rng, seed_everything


class PredictError(ValueError):
    """A run that cannot predict (unknown, unfinished, no saved state) or an image that cannot be read."""


def load_run_model(store: ResultStore, run_id: str, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The run's model with its best epoch's trainable state, on `device` in eval mode, and the run's record."""
    record = store.load(run_id)
    if record is None:
        raise PredictError(f"no run {run_id!r} under {store.root} (see {store.root}/runs.jsonl for the run ids)")
    if record.get("status") != FINISHED:
        raise PredictError(f"run {run_id} is {record.get('status')}, not finished: it has no trained model")
    state = store.run_dir(run_id) / (record.get("artifacts") or {}).get("trainable", TRAINABLE_FILE)
    if not state.is_file():
        raise PredictError(
            f"run {run_id} kept no trained state ({state} is missing; runs before petlbench 0.2 kept none)"
        )
    cfg = RunConfig.from_dict(record["config"])
    dataset = record["dataset"]
    ctx = BuildContext(
        backbone=cfg.backbone_spec(),
        num_classes=len(dataset["class_names"]),
        res=cfg.res,
        device=device,
        cache_dir=store.root / "cache",
        attention=cfg.attention,
        log=lambda _: None,
    )
    with preserved_rng():  # the run built its model right after seeding: frozen random-init weights are the same
        seed_everything(cfg.seed)
        model = build_model(cfg.build_method(), ctx)
    load_trainable(model, state)
    model.place(device)
    model.eval()
    return model, record


@torch.no_grad()
def predict(
    store: ResultStore, run_id: str, images: Sequence[str | Path], device: str | torch.device = "cpu", batch: int = 8
) -> list[dict[str, Any]]:
    """Class probabilities of each image under run `run_id`'s trained model (evaluation transforms of the run)."""
    device = torch.device(device)
    paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PredictError(f"no such image file(s): {', '.join(missing)}")
    model, record = load_run_model(store, run_id, device)
    cfg, dataset = RunConfig.from_dict(record["config"]), record["dataset"]
    method = cfg.build_method()
    samples = [Sample(p, 0, "predict", sample_id_for(p, p.parent)) for p in paths]
    views = ViewDataset(samples, method.views(cfg.res), train=False, mean=dataset["mean"], std=dataset["std"])
    classes = list(dataset["class_names"])
    flush_denormals()
    out: list[dict[str, Any]] = []
    for start in range(0, len(samples), batch):
        items = default_collate([views[i] for i in range(start, min(start + batch, len(samples)))])
        items = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in items.items()}
        probs = torch.softmax(model(items).float(), dim=1).cpu()
        for offset, row in enumerate(probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "image": str(paths[start + offset]),
                    "predicted": classes[best],
                    "probs": dict(zip(classes, row, strict=True)),
                }
            )
    return out
