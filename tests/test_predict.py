"""A finished run keeps its trainable state, and `predict` reproduces the run's own evaluation of an image."""

from __future__ import annotations

from pathlib import Path

import pytest

from petlbench.core.results import ResultStore
from petlbench.engine.artifacts import TRAINABLE_FILE
from petlbench.engine.predict import PredictError, predict
from petlbench.engine.runner import RunRequest, execute, resolve


@pytest.mark.slow
@pytest.mark.parametrize(("method", "atol"), [("lora", 1e-5), ("fpt_plus", 2e-3)])
def test_predict_matches_the_runs_own_evaluation(tmp_path: Path, method: str, atol: float) -> None:
    """FPT+ predicts with its LPM online in float32; its run read float16 cached features: a small tolerance."""
    request = RunRequest(methods=method, backbone="test_vit", res=64, epochs=1, batch_size=4, results=tmp_path)
    resolved = resolve(request)
    store = ResultStore(tmp_path)
    (record,) = execute(resolved, store)
    assert record["status"] == "finished", record.get("error")
    assert (store.run_dir(record["run_id"]) / TRAINABLE_FILE).is_file()
    test = resolved.source.split("test")[:2]
    out = predict(store, record["run_id"], [s.path for s in test])
    stored = dict(zip(record["predictions"]["test"]["sample_ids"], record["predictions"]["test"]["probs"], strict=True))
    classes = record["dataset"]["class_names"]
    for sample, row in zip(test, out, strict=True):
        assert row["image"] == str(sample.path) and set(row["probs"]) == set(classes)
        assert [row["probs"][c] for c in classes] == pytest.approx(stored[sample.sample_id], abs=atol)


def test_predict_refuses_unknown_runs_and_missing_images(tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="no such image"):
        predict(ResultStore(tmp_path), "lora-x", [tmp_path / "missing.png"])
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    with pytest.raises(PredictError, match="no run 'lora-x'"):
        predict(ResultStore(tmp_path), "lora-x", [image])


def test_a_pending_state_replaces_the_kept_one_only_when_its_run_finishes(tmp_path: Path) -> None:
    """A forced re-run writes its state beside the finished run's; it is promoted only with a finished record."""
    import torch

    from petlbench.engine.artifacts import PENDING_FILE, load_trainable, save_trainable, settle_trainable

    model = torch.nn.Linear(2, 1)
    save_trainable(model, tmp_path, {"attempt": 1})
    settle_trainable(tmp_path, finished=True)
    assert (tmp_path / TRAINABLE_FILE).is_file() and not (tmp_path / PENDING_FILE).exists()
    kept = (tmp_path / TRAINABLE_FILE).read_bytes()
    with torch.no_grad():
        model.weight.add_(1.0)
    save_trainable(model, tmp_path, {"attempt": 2})
    settle_trainable(tmp_path, finished=False)  # the second attempt failed
    assert (tmp_path / TRAINABLE_FILE).read_bytes() == kept and not (tmp_path / PENDING_FILE).exists()
    assert load_trainable(torch.nn.Linear(2, 1), tmp_path / TRAINABLE_FILE) == {"attempt": 1}
