"""What a finished run keeps of its model: the trainable state (safetensors) and what rebuilds the rest.

`trainable.safetensors` in the run's folder holds the best epoch's trainable parameters; its metadata says which
method, options and backbone they belong to. Everything frozen is rebuilt from the run's configuration (the backbone
from its weights reference; a random-init backbone from its fixed seed), so the file stays small: a LoRA or FPT+ run
keeps about 1 % of the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petlbench.core.atomic import write_bytes_atomic

TRAINABLE_FILE = "trainable.safetensors"
# Written while the run is an attempt: it replaces TRAINABLE_FILE only once the run's finished record is stored, so a
# forced re-run that fails or is killed never overwrites the state that belongs to the finished record.
PENDING_FILE = "trainable.attempt.safetensors"


def save_trainable(model: nn.Module, folder: Path, metadata: dict[str, Any]) -> Path:
    """Write `model`'s trainable parameters (contiguous CPU copies) and `metadata` (JSON-encoded) atomically, as the
    pending state of the run's attempt (see `settle_trainable`)."""
    from safetensors.torch import save

    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    path = Path(folder) / PENDING_FILE
    write_bytes_atomic(path, save(tensors, metadata={"petlbench": json.dumps(metadata, sort_keys=True)}))
    return path


def load_trainable(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load a saved trainable state into `model` (every trainable parameter must be there); returns its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get("petlbench", "{}"))
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open has no iter
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != wanted:
        missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return metadata


def settle_trainable(folder: Path, finished: bool) -> None:
    """After the record is stored: a finished run's pending state becomes its trainable state, any other is dropped."""
    pending = Path(folder) / PENDING_FILE
    if not pending.exists():
        return
    if finished:
        pending.replace(Path(folder) / TRAINABLE_FILE)
    else:
        pending.unlink()
