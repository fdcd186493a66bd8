"""Formula-driven supervised pre-training of a small ViT, and the content-addressed cache of its weights."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from petlbench.core.atomic import write_bytes_atomic, write_json_atomic
from petlbench.pretrain.recipes import Recipe

GENERATOR = "petlbench.pretrain"
GENERATOR_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
HELD_OUT_STREAM = 1 << 20  # random stream of the held-out instances (training chunks use 0, 1, ...)
CARD_SUFFIX = ".card.json"  # a card beside a copied weights file: FILE.safetensors -> FILE.card.json
Log = Callable[[str], None]


class PretrainError(ValueError):
    """A pre-training request that cannot be carried out as given."""


@dataclass(frozen=True)
class Pretrained:
    """A finished pre-training: the weights file, its card, and whether the cache already held it."""

    weights: Path
    card: dict[str, Any]
    reused: bool


def cache_key(recipe: Recipe, backbone: str, seed: int) -> str:
    """Short sha256 of everything that decides the weights (recipe fields, backbone, seed, generator version)."""
    identity = {"recipe": recipe.identity(), "backbone": backbone, "seed": seed, "version": GENERATOR_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_home() -> Path:
    """Folder of generated LPMs: beside the generated datasets (`data_home()/pretrained`)."""
    from petlbench.data.synthetic import data_home

    return data_home() / "pretrained"


def cache_folder(recipe: Recipe, backbone: str, seed: int) -> Path:
    """Where the weights of (recipe, backbone, seed) live in the cache."""
    return pretrained_home() / f"{recipe.name}-{backbone}-seed{seed}-{cache_key(recipe, backbone, seed)}"


def read_card(path: Path) -> dict[str, Any] | None:
    """The card of a generated LPM (its folder's card.json, or FILE.card.json beside a copied FILE), if the card
    is petlbench's and names this file's content; else None."""
    from petlbench.core.config import file_digest

    card_path = path.parent / CARD_FILE if path.name == WEIGHTS_FILE else path.with_suffix(CARD_SUFFIX)
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or card.get("generator") != GENERATOR:
        return None
    return card if card.get("weights_sha256_16") == file_digest(path) else None


def generated_label(card: dict[str, Any]) -> str:
    """How results name weights from a generated LPM: never "pretrained" alone, always the recipe."""
    return f"generated-pretrained:{card['recipe']['name']}"


def ensure_pretrained(
    recipe: Recipe, backbone: str, seed: int, log: Log = print, force: bool = False, threads: int = 1
) -> Pretrained:
    """The cached weights of (recipe, backbone, seed), pre-training them first if the cache lacks them."""
    folder = cache_folder(recipe, backbone, seed)
    weights = folder / WEIGHTS_FILE
    if not force and weights.is_file():
        card = read_card(weights)
        if card is not None:
            return Pretrained(weights, card, reused=True)
        log(f"generated LPM at {folder} is incomplete or altered: pre-training it again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        state, card = pretrain(recipe, backbone, seed, log, threads)
        save_weights(staging / WEIGHTS_FILE, state, card)
        if folder.exists():
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError:
            if read_card(weights) is None:  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    final = read_card(weights)
    if final is None:
        raise PretrainError(f"generated LPM at {folder} could not be stored")
    return Pretrained(weights, final, reused=False)


def save_weights(path: Path, state: dict[str, torch.Tensor], card: dict[str, Any]) -> dict[str, Any]:
    """Write `state` as safetensors and its card (with the file's digest) beside it, both atomically."""
    from safetensors.torch import save

    from petlbench.core.config import file_digest

    write_bytes_atomic(path, save({k: v.contiguous() for k, v in state.items()}))
    card = {**card, "weights_sha256_16": file_digest(path)}
    card_path = path.parent / CARD_FILE if path.name == WEIGHTS_FILE else path.with_suffix(CARD_SUFFIX)
    write_json_atomic(card_path, card)
    return card


def copy_pretrained(result: Pretrained, out: Path) -> Path:
    """Copy cached weights to `out` (a .safetensors path) with their card beside them (OUT.card.json)."""
    if out.suffix != ".safetensors":
        raise PretrainError(f"--out {out}: give a .safetensors file name")
    write_bytes_atomic(out, result.weights.read_bytes())
    write_json_atomic(out.with_suffix(CARD_SUFFIX), result.card)
    return out


def _generate(recipe: Recipe, seed: int, log: Log) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Training and held-out images with their labels, and the seconds it took."""
    start = time.perf_counter()
    render = recipe.renderer(seed)
    train_labels = np.repeat(np.arange(recipe.classes), recipe.per_class)
    chunks = []
    chunk = 1024
    for k in range(0, len(train_labels), chunk):
        chunks.append(render(seed, train_labels[k : k + chunk], k // chunk))
        log(f"generated {min(k + chunk, len(train_labels))}/{len(train_labels)} {recipe.family} images")
    held_labels = np.repeat(np.arange(recipe.classes), recipe.held_out)
    held = render(seed, held_labels, HELD_OUT_STREAM)  # its own random stream: instances never seen in training
    return np.concatenate(chunks), train_labels, held, held_labels, time.perf_counter() - start


def pretrain(
    recipe: Recipe, backbone: str, seed: int, log: Log = print, threads: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pre-train `backbone` on the recipe's generated categories; returns its state dict (head included) and card."""
    import timm

    from petlbench.backbones.vit import check_resolution

    check_resolution(backbone, recipe.size)
    if threads < 1:
        raise PretrainError(f"threads must be at least 1, got {threads}")
    torch.set_flush_denormal(True)  # as `engine.step.flush_denormals` (not imported: the engine imports us)
    previous_threads = torch.get_num_threads()
    # One thread by default: a tiny ViT gains little from intra-op threads, and on a shared CPU two OpenMP threads
    # were measured 11x slower per step than one (they spin-wait on each other's core).
    torch.set_num_threads(threads)
    try:
        return _train(recipe, backbone, seed, log, timm)
    finally:
        torch.set_num_threads(previous_threads)


def _train(recipe: Recipe, backbone: str, seed: int, log: Log, timm: Any) -> tuple[dict[str, torch.Tensor], dict]:
    start = time.perf_counter()
    images, labels, held, held_labels, gen_seconds = _generate(recipe, seed, log)
    log(f"generated {len(images)} training and {len(held)} held-out images in {gen_seconds:.1f}s")
    torch.manual_seed(seed)
    model = timm.create_model(backbone, img_size=recipe.size, num_classes=recipe.classes, drop_path_rate=0.0)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8, normalised per batch
    mean = pixels.float().mean(dim=(0, 2, 3), keepdim=True) / 255.0
    std = pixels.float().std(dim=(0, 2, 3), keepdim=True) / 255.0
    targets = torch.from_numpy(labels)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    warm = max(1, int(recipe.warmup * recipe.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (recipe.steps - warm))),
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    order = torch.Generator().manual_seed(seed)
    report_every = max(1, recipe.steps // 20)
    train_start = time.perf_counter()
    model.train()
    losses: list[float] = []
    correct = seen = 0
    for step in range(recipe.steps):
        index = torch.randint(len(pixels), (recipe.batch_size,), generator=order)
        batch = (pixels[index].float() / 255.0 - mean) / std
        flip = torch.rand(recipe.batch_size, generator=order) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        logits = model(batch)
        loss = loss_fn(logits, targets[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        correct += int((logits.argmax(1) == targets[index]).sum())
        seen += recipe.batch_size
        if (step + 1) % report_every == 0 or step + 1 == recipe.steps:
            elapsed = time.perf_counter() - train_start
            eta = elapsed / (step + 1) * (recipe.steps - step - 1)
            log(
                f"step {step + 1}/{recipe.steps} · loss {np.mean(losses[-report_every:]):.3f} · train acc "
                f"{100 * correct / seen:.1f}% · {elapsed:.0f}s (eta {eta:.0f}s)"
            )
            correct = seen = 0
    train_seconds = time.perf_counter() - train_start
    held_acc = _accuracy(model, held, held_labels, mean, std)
    log(f"held-out accuracy {held_acc:.1f}% over {recipe.classes} categories (chance {100 / recipe.classes:.1f}%)")
    card = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "kind": "generated-pretrained (formula-driven images; no natural images)",
        "recipe": {**recipe.identity(), "description": recipe.description, "reference": recipe.reference},
        "backbone": backbone,
        "seed": seed,
        "data": {
            "train_images": int(len(images)),
            "held_out_images": int(len(held)),
            "size": recipe.size,
            "categories": recipe.classes,
        },
        "steps": recipe.steps,
        "images_seen": recipe.steps * recipe.batch_size,
        "final_train_loss": float(np.mean(losses[-report_every:])),
        "held_out_accuracy": held_acc,
        "seconds": {
            "generate": round(gen_seconds, 2),
            "train": round(train_seconds, 2),
            "total": round(time.perf_counter() - start, 2),
        },
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "cache_key": cache_key(recipe, backbone, seed),
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, card


@torch.no_grad()
def _accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> float:
    model.eval()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    hits = 0
    for k in range(0, len(pixels), 256):
        logits = model((pixels[k : k + 256].float() / 255.0 - mean) / std)
        hits += int((logits.argmax(1).numpy() == labels[k : k + 256]).sum())
    return 100.0 * hits / max(1, len(labels))


def _versions() -> dict[str, str]:
    import platform

    import timm

    from petlbench import __version__

    return {
        "petlbench": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
