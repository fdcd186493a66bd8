"""Shared test setup: one thread (2-core CI), tiny ViTs, generated data in tmp folders."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("PETLBENCH_DATA", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "data"))
torch.set_num_threads(1)

TINY_VIT = "test_vit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU-marked tests where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def run_prepare(model: Any, splits: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """`model.prepare_data` returning the prepared splits; what was done is kept as `model.preload_info` so that
    tests can read it beside the model."""
    prepared = model.prepare_data(splits, ctx)
    model.preload_info = prepared.info
    return prepared.splits
