"""The resolved configuration of one run, and the run id derived from it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Training protocol of the papers (methods spec §6.1); the CLI and sweeps override these.
PAPER_EPOCHS = 20
PAPER_BATCH_SIZE = 16
PAPER_LR = 1e-3
PAPER_WEIGHT_DECAY = 0.1
GRAD_CLIP_NORM = 1.0

# Fields that do not change what a run computes and so stay out of its id.
_NOT_IDENTITY = {"num_workers", "dataset_path"}


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run; its hash is the run id."""

    method: str
    dataset: str  # dataset name (card key, folder name or the embedded default's name)
    dataset_fingerprint: str
    backbone: str = "vit_base_patch16_224"
    weights: str = "random-init"  # "random-init", "timm-pretrained" or "file:<path>#<sha>"
    res: int = 512
    epochs: int = PAPER_EPOCHS
    batch_size: int = PAPER_BATCH_SIZE
    lr: float = PAPER_LR
    weight_decay: float = PAPER_WEIGHT_DECAY
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    amp: str = "none"  # "none" or "bf16" (CUDA only)
    attention: str = "auto"
    grad_clip: float = GRAD_CLIP_NORM
    skip_bad_images: bool = False
    dataset_path: str = ""
    num_workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of `to_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def run_id(self) -> str:
        """`<method>-<hash>`: identical configs share an id, so finished runs are skipped."""
        identity = {k: v for k, v in self.to_dict().items() if k not in _NOT_IDENTITY}
        identity["device"] = self.device.split(":")[0]  # which GPU index ran it does not change the result
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.method}-{digest}"


def file_digest(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Short sha256 of a file's content (identifies a local weights file in run ids and caches)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()[:16]
