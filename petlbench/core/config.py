"""The resolved configuration of one run, and the run id derived from it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from petlbench.core.method import BackboneSpec, Method

# Training protocol of the papers; the CLI and sweeps override these.
PAPER_EPOCHS = 20
PAPER_BATCH_SIZE = 16
PAPER_LR = 1e-3
PAPER_WEIGHT_DECAY = 0.1
GRAD_CLIP_NORM = 1.0

# Fields that do not change what a run computes and so stay out of its id.
_NOT_IDENTITY = {"num_workers", "dataset_path", "weights_path", "preset", "size_plan"}
# Fields added after runs were stored: left out of the id at their default, so earlier run ids stay valid.
_ADDED_WITH_DEFAULT = {"pos_interp": "timm", "augmentation": "global-stream"}

Amp = Literal["none", "bf16"]
Attention = Literal["auto", "fused", "explicit"]


class ConfigError(ValueError):
    """A run configuration value out of its range; the message names the flag."""


_FLAGS = {"seed": "--seeds", "num_workers": "--workers"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def check_run_values(**values: Any) -> None:
    """Raise `ConfigError` for the first value out of range (None means "not given" and is skipped).

    The one place the ranges live: `RunConfig` checks itself with it, and `run`/`sweep` check flags with it before
    any work starts.
    """
    at_least = {"epochs": 1, "batch_size": 1, "res": 1, "seed": 0, "num_workers": 0}
    for name, value in values.items():
        if value is None:
            continue
        if name in at_least and (isinstance(value, bool) or not isinstance(value, int) or value < at_least[name]):
            raise ConfigError(f"{_flag(name)} {value!r}: must be a whole number >= {at_least[name]}")
        if name == "lr" and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"--lr {value!r}: must be a finite number > 0 (e.g. 1e-3)")
        if name in ("weight_decay", "grad_clip") and not (
            isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        ):
            raise ConfigError(f"{_flag(name)} {value!r}: must be a finite number >= 0")
        if name == "amp" and value not in ("none", "bf16"):
            raise ConfigError(f"--amp {value!r}: use none or bf16")
        if name == "attention" and value not in ("auto", "fused", "explicit"):
            raise ConfigError(f"--attention {value!r}: use auto, fused or explicit")
        if name == "device" and not re.fullmatch(r"cpu|cuda(:\d+)?", str(value)):
            raise ConfigError(f"--device {value!r}: use cpu, cuda or cuda:N")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run; its hash is the run id."""

    method: str
    dataset: str  # dataset name (card key, folder name or the embedded default's name)
    dataset_fingerprint: str
    backbone: str = "vit_base_patch16_224"
    weights: str = "random-init"  # "random-init", "timm-pretrained", "file:<name>#<sha>" or
    # "generated-pretrained:<recipe>:file:<name>#<sha>" (an LPM from `petlbench pretrain`)
    res: int = 512
    epochs: int = PAPER_EPOCHS
    batch_size: int = PAPER_BATCH_SIZE
    lr: float = PAPER_LR
    weight_decay: float = PAPER_WEIGHT_DECAY
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    amp: Amp = "none"  # bf16 autocast on CUDA only
    attention: Attention = "auto"
    grad_clip: float = GRAD_CLIP_NORM
    skip_bad_images: bool = False
    dataset_path: str = ""
    num_workers: int = 0
    weights_path: str = ""  # where the weights file named by `weights` was read (not part of the id)
    pos_interp: str = "timm"  # position table: resampled once ("timm") or per forward, the authors' way ("official")
    # How training images are augmented: "per-sample" draws from (seed, epoch, index) alone (since petlbench 0.2;
    # before, from the global random stream, which made results depend on the worker count and the method).
    augmentation: str = "per-sample"
    preset: str = "none"  # the preset that chose defaults (its choices are the fields above; not part of the id)
    # How `--res auto` / `--batch-size auto` chose res or batch_size ("" when given); not part of the id, which the
    # chosen values already are.
    size_plan: str = ""

    def __post_init__(self) -> None:
        check_run_values(
            epochs=self.epochs,
            batch_size=self.batch_size,
            res=self.res,
            seed=self.seed,
            num_workers=self.num_workers,
            lr=self.lr,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            amp=self.amp,
            attention=self.attention,
            device=self.device,
        )

    def backbone_spec(self) -> BackboneSpec:
        """The backbone this run trains on, rebuilt from the configuration."""
        from petlbench.core.method import BackboneSpec

        return BackboneSpec(
            self.backbone,
            pretrained=self.weights == "timm-pretrained",
            weights=self.weights_path or None,
            pos_interp=self.pos_interp,
        )

    def build_method(self) -> Method:
        """The method with this run's options; raises if this petlbench resolves them differently."""
        from petlbench.core.method import get_method

        method = get_method(self.method).from_overrides(self.method_options)
        if method.resolved_options() != self.method_options:
            raise ConfigError(
                f"{self.method} options {self.method_options} resolve to {method.resolved_options()} here: "
                "this petlbench differs from the one that planned the run"
            )
        return method

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
        identity = {
            k: v
            for k, v in self.to_dict().items()
            if k not in _NOT_IDENTITY and not (k in _ADDED_WITH_DEFAULT and v == _ADDED_WITH_DEFAULT[k])
        }
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
