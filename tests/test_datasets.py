"""Dataset layer: image modes, layouts, splits, bad files, checks, synthetic data and cards (tiny files, fast)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from petlbench.data import discover, synthetic
from petlbench.data.cards import CardError, list_cards, load_card, read_card
from petlbench.data.check import check_dataset
from petlbench.data.discover import DatasetError, open_dataset
from petlbench.data.loading import load_image


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_CACHE", str(tmp_path / "user-cache"))


_colours = itertools.count(1)


def save(path: Path, colour: tuple[int, int, int] | None = None, size: int = 8) -> Path:
    """A tiny RGB PNG; without `colour`, one no other call made (identical files are leakage across splits)."""
    if colour is None:
        n = next(_colours)
        colour = (n % 256, n // 256 % 256, 77)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def make_flat(root: Path, per_class: dict[str, int]) -> Path:
    for name, n in per_class.items():
        for i in range(n):
            save(root / name / f"{name}_{i:03d}.png")
    return root


def make_split_folders(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                save(root / split / name / f"{split}_{name}_{i}.png")
    return root


def quiet(messages: list[str]):
    return messages.append


# ---------------------------------------------------------------------------------------------------------------
# Image modes


def test_every_image_mode_loads_as_8bit_rgb(tmp_path: Path) -> None:
    grey = Image.new("L", (6, 4), 128)
    grey.save(tmp_path / "grey.png")
    deep = Image.fromarray(np.array([[0, 65535], [32768, 65535]], dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    palette = Image.new("P", (5, 5), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 255, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    save(tmp_path / "rgb.png", (1, 2, 3))

    for name in ("grey", "deep", "palette", "rgba", "rgb"):
        assert load_image(tmp_path / f"{name}.png").mode == "RGB", name
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (128, 128, 128)
    deep_px = np.asarray(load_image(tmp_path / "deep.png"))
    assert deep_px[0, 0].tolist() == [0, 0, 0] and deep_px[0, 1].tolist() == [255, 255, 255]
    assert deep_px[1, 0, 0] == 128  # 16-bit rescaled by bit depth, not clipped
    assert load_image(tmp_path / "palette.png").getpixel((2, 2)) == (10, 200, 30)
    rgba_img = load_image(tmp_path / "rgba.png")
    assert rgba_img.getpixel((0, 0)) == (0, 255, 0) and rgba_img.getpixel((1, 1)) == (0, 0, 0)  # on black
    assert load_image(tmp_path / "rgb.png").getpixel((0, 0)) == (1, 2, 3)


def test_exif_rotated_jpeg_is_upright(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high: left half red, right half blue
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "rotated.jpg")
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_all_modes_pass_validation_in_a_dataset(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    for k, cls in enumerate(("a", "b")):  # pixel values differ by class: identical files would leak across splits
        (root / cls).mkdir(parents=True)
        Image.new("L", (8, 8), 90 + k).save(root / cls / "l.png")
        Image.fromarray(np.full((8, 8), 40000 + k, dtype=np.uint16)).save(root / cls / "i16.png")
        Image.new("P", (8, 8), k).save(root / cls / "p.png")
        Image.new("RGBA", (8, 8), (1, 2, 3 + k, 128)).save(root / cls / "rgba.png")
        Image.new("RGB", (8, 8), (9, 9, 9 + 40 * k)).save(root / cls / "rgb.jpg")
    source = open_dataset(root, log=quiet([]))
    assert len(source.samples) == 10 and not source.skipped


# ---------------------------------------------------------------------------------------------------------------
# Layouts and splits


def test_split_folders_give_official_split_and_sorted_classes(tmp_path: Path) -> None:
    root = make_split_folders(
        tmp_path / "ds",
        {
            "train": {"cat": 3, "bird": 2, "dog": 2},
            "valid": {"cat": 1, "bird": 1, "dog": 1},
            "test": {"cat": 1, "dog": 2},
        },
    )
    messages: list[str] = []
    source = open_dataset(root, split_dir=tmp_path / "run", log=messages.append)
    assert source.split_origin == "official"
    assert source.classes == ["bird", "cat", "dog"]
    counts = source.class_counts()
    assert counts["train"] == {"bird": 2, "cat": 3, "dog": 2}
    assert counts["val"] == {"bird": 1, "cat": 1, "dog": 1}
    assert counts["test"] == {"bird": 0, "cat": 1, "dog": 2}
    assert any("test split has no images of class(es) bird" in m for m in messages)  # a warning, not a crash
    assert all(source.classes[s.label] in s.path.parent.name for s in source.samples)
    assert len({s.sample_id for s in source.samples}) == len(source.samples)
    assert (tmp_path / "run" / "split.csv").is_file()


def test_train_and_test_only_draws_val_from_train(tmp_path: Path) -> None:
    root = make_split_folders(tmp_path / "ds", {"train": {"a": 8, "b": 8}, "test": {"a": 2, "b": 2}})
    source = open_dataset(root, log=quiet([]))
    assert source.split_origin == "official+val-from-train"
    assert source.class_counts()["val"] == {"a": 1, "b": 1}
    assert source.class_counts()["test"] == {"a": 2, "b": 2}


def test_manifest_with_split_and_integer_labels(tmp_path: Path) -> None:
    root = tmp_path / "m"
    rows = ["path,label,split"]
    for i in range(12):
        label = [2, 10, 3][i % 3]
        save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{label},{['train', 'validation', 'test'][i % 4 % 3]}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    source = open_dataset(root, log=quiet([]))  # a folder holding manifest.csv
    assert source.split_origin == "official"
    assert source.classes == ["2", "3", "10"]  # integer labels sort numerically
    by_name = {s.path.name: s for s in source.samples}
    assert source.classes[by_name["1.png"].label] == "10"
    assert by_name["1.png"].split == "val"
    same = open_dataset(root / "manifest.csv", log=quiet([]))  # or the CSV itself
    assert [s.sample_id for s in same.samples] == [s.sample_id for s in source.samples]
    (root / "img" / "4.png").unlink()  # a listed file that is gone is a bad file like any other
    with pytest.raises(DatasetError, match=r"4\.png: file not found"):
        open_dataset(root, log=quiet([]))
    assert open_dataset(root, skip_bad_images=True, log=quiet([])).skipped[0]["reason"] == "file not found"


def test_manifest_with_class_names_and_no_split_is_split_70_10_20(tmp_path: Path) -> None:
    root = tmp_path / "m"
    rows = ["path,label"]
    for i in range(20):
        label = "benign" if i % 2 else "malignant"
        save(root / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    source = open_dataset(root / "labels.csv", log=quiet([]))
    assert source.name == "labels" and source.split_origin == "generated"
    assert source.classes == ["benign", "malignant"]
    assert Counter(s.split for s in source.samples) == {"train": 14, "val": 2, "test": 4}


def test_bad_manifest_rows_are_named(tmp_path: Path) -> None:
    save(tmp_path / "a.png")
    (tmp_path / "x.csv").write_text("path,label,split\na.png,1,train\na.png,1,train\n,2,test\nb.png,2,holdout\n")
    with pytest.raises(DatasetError) as err:
        open_dataset(tmp_path / "x.csv", log=quiet([]))
    text = str(err.value)
    assert "line 3" in text and "line 4" in text and "'holdout'" in text
    (tmp_path / "y.csv").write_text("file_name;y\na.png;1\n")
    with pytest.raises(DatasetError, match="header row with columns path,label"):
        open_dataset(tmp_path / "y.csv", log=quiet([]))


def test_flat_folder_split_is_stratified_reproducible_and_reused(tmp_path: Path) -> None:
    root = make_flat(tmp_path / "flat", {"neg": 20, "pos": 10})
    run = tmp_path / "run"
    first = open_dataset(root, split_dir=run, seed=3, log=quiet([]))
    assert first.split_origin == "generated"
    assert first.class_counts() == {
        "train": {"neg": 14, "pos": 7},
        "val": {"neg": 2, "pos": 1},
        "test": {"neg": 4, "pos": 2},
    }
    again = open_dataset(root, seed=3, log=quiet([]))  # same seed, no saved file: same split
    assert [(s.path, s.split) for s in again.samples] == [(s.path, s.split) for s in first.samples]
    other = open_dataset(root, seed=4, log=quiet([]))
    assert {(s.path, s.split) for s in other.samples} != {(s.path, s.split) for s in first.samples}

    split_csv = run / "split.csv"
    lines = split_csv.read_text().splitlines()
    assert lines[0] == "path,label,split" and len(lines) == 31
    assert json.loads((run / "split.json").read_text())["seed"] == 3
    # the saved file wins over re-drawing: edit it and the edit is used
    edited = [lines[0]] + [ln.replace(",train", ",test", 1) if i == 1 else ln for i, ln in enumerate(lines) if i]
    split_csv.write_text("\n".join(edited) + "\n")
    moved = edited[1].split(",")[0]
    reused = open_dataset(root, split_dir=run, seed=99, log=quiet([]))
    assert next(s for s in reused.samples if s.path == root / moved).split == "test"

    save(root / "pos" / "new.png")  # the file set changes: a new split is drawn and saved
    messages: list[str] = []
    redrawn = open_dataset(root, split_dir=run, seed=3, log=messages.append)
    assert any("does not match the files (1 added" in m for m in messages)
    assert len(redrawn.samples) == 31 and len(split_csv.read_text().splitlines()) == 32


# ---------------------------------------------------------------------------------------------------------------
# Bad files and errors


def make_bad_dataset(root: Path) -> dict[str, Path]:
    make_flat(root, {"a": 4, "b": 4})
    zero = root / "a" / "zero.png"
    zero.write_bytes(b"")
    good = root / "b" / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=90)
    truncated = root / "b" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = root / "a" / "notes.png"
    text.write_text("this is not an image\n")
    return {"zero": zero, "truncated": truncated, "text": text}


def test_bad_files_are_all_named_with_reasons(tmp_path: Path) -> None:
    bad = make_bad_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError) as err:
        open_dataset(tmp_path / "ds", log=quiet([]))
    text = str(err.value)
    assert "3 unusable image file(s)" in text and "--skip-bad-images" in text
    assert f"{bad['zero']}: empty file (0 bytes)" in text
    assert f"{bad['truncated']}: truncated image data" in text
    assert f"{bad['text']}: not an image" in text


def test_skip_bad_images_records_them(tmp_path: Path) -> None:
    bad = make_bad_dataset(tmp_path / "ds")
    source = open_dataset(tmp_path / "ds", skip_bad_images=True, log=quiet([]))
    assert {b["path"] for b in source.skipped} == {str(p) for p in bad.values()}
    assert all(b["reason"] for b in source.skipped)
    assert len(source.samples) == 9 and not {s.path for s in source.samples} & set(bad.values())


def test_validation_verdicts_are_cached_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_flat(tmp_path / "ds", {"a": 3, "b": 3})
    calls: list[Path] = []
    real = discover._inspect
    monkeypatch.setattr(discover, "_inspect", lambda p: calls.append(p) or real(p))
    open_dataset(root, split_dir=tmp_path / "run", log=quiet([]))
    assert len(calls) == 6
    calls.clear()
    open_dataset(root, split_dir=tmp_path / "run", log=quiet([]))
    assert calls == []  # nothing decoded again
    victim = root / "a" / "a_001.png"
    victim.write_bytes(b"garbage, not a png at all")  # other size and mtime: decoded again, now bad
    with pytest.raises(DatasetError, match="a_001.png: not an image"):
        open_dataset(root, split_dir=tmp_path / "run", log=quiet([]))
    assert calls == [victim]


def test_actionable_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no file or folder .*nope"):
        open_dataset(tmp_path / "nope", log=quiet([]))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found in"):
        open_dataset(tmp_path / "empty", log=quiet([]))
    make_flat(tmp_path / "one", {"only": 5})
    with pytest.raises(DatasetError, match="at least 2 are needed"):
        open_dataset(tmp_path / "one", log=quiet([]))
    save(tmp_path / "loose" / "x.png")
    with pytest.raises(DatasetError, match="no class folders"):
        open_dataset(tmp_path / "loose", log=quiet([]))
    make_split_folders(tmp_path / "notest", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    with pytest.raises(DatasetError, match="no test/ folder"):
        open_dataset(tmp_path / "notest", log=quiet([]))


def test_empty_class_folder_is_left_out_with_a_warning(tmp_path: Path) -> None:
    root = make_flat(tmp_path / "ds", {"a": 5, "c": 5})
    (root / "b").mkdir()
    save(root / "__MACOSX" / "a" / "a_000.png")  # unzip droppings are no class
    messages: list[str] = []
    source = open_dataset(root, log=messages.append)
    assert source.classes == ["a", "c"]
    assert any("class(es) b have no usable images" in m for m in messages)


def test_auto_normalisation_is_mean_of_image_means_and_std_over_pixels(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for cls in ("x", "y"):  # same pixels in both classes, different bytes (a tag): not leakage when val is drawn
        note = PngInfo()
        note.add_text("class", cls)
        for split, name, value in (("train", "white", 255), ("train", "black", 0), ("test", "grey", 100)):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (value,) * 3).save(root / split / cls / f"{name}.png", pnginfo=note)
    source = open_dataset(root, split_dir=tmp_path / "run", log=quiet([]))
    assert source.mean == pytest.approx((0.5, 0.5, 0.5))
    assert source.std == pytest.approx((0.5, 0.5, 0.5))
    assert json.loads((tmp_path / "run" / "stats.json").read_text())["mean"] == [0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------------------------
# Check report


def test_check_report_finds_empty_class_missing_class_and_bad_files(tmp_path: Path) -> None:
    root = make_split_folders(
        tmp_path / "ds",
        {"train": {"a": 2, "b": 2, "c": 0}, "val": {"a": 1}, "test": {"a": 1, "b": 1}},
    )
    (root / "test" / "b" / "broken.png").write_bytes(b"")
    report = check_dataset(root)
    assert not report.ok
    assert report.empty_classes == ["c"]
    assert report.missing == {"train": [], "val": ["b"], "test": []}
    assert report.counts["train"] == {"a": 2, "b": 2, "c": 0}
    assert [b["path"] for b in report.bad_files] == [str(root / "test" / "b" / "broken.png")]
    text = report.to_text()
    assert "empty class(es): c" in text and "classes missing from val: b" in text and "broken.png" in text
    data = report.to_dict()
    assert data["ok"] is False and json.dumps(data)


def test_check_report_of_a_good_and_of_a_missing_dataset(tmp_path: Path) -> None:
    report = check_dataset(make_flat(tmp_path / "ok", {"a": 10, "b": 10}))
    assert report.ok and report.split_origin == "generated"
    assert sum(report.counts["test"].values()) == 4 and "OK" in report.to_text()
    missing = check_dataset(tmp_path / "absent")
    assert not missing.ok and "not found" in missing.errors[0]


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_generation_is_deterministic(tmp_path: Path) -> None:
    args = {"n_per_class": 3, "size": 128, "num_classes": 3, "seed": 7}
    a = synthetic.generate(tmp_path / "a", **args)
    b = synthetic.generate(tmp_path / "b", **args)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len([f for f in files_a if f.suffix == ".jpg"]) == 9
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    card = (a / "dataset.yaml").read_text()
    assert "generator_version: 1" in card and "seed: 7" in card
    source = open_dataset(a, log=quiet([]))
    assert source.classes == ["0_healthy", "1_dark", "2_bright"]
    assert source.class_counts()["train"] == {c: 1 for c in source.classes}
    synthetic.generate(tmp_path / "a", **{**args, "seed": 8})  # rewriting its own output is allowed
    assert (a / "dataset.yaml").read_text() != card
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        synthetic.generate(tmp_path / "foreign", **args)


def test_synthetic_classes_differ_only_by_lesions() -> None:
    size = 256
    healthy, none = synthetic.make_image(size, 0, 5, 0)
    assert none == []
    for label in (1, 2, 3, 4):
        img, lesions = synthetic.make_image(size, 0, 5, label)
        kind, _ = synthetic.lesion_plan(label)
        low, high = synthetic.lesion_count_range(label)
        assert low <= len(lesions) <= high and {les.kind for les in lesions} == {kind}
        footprint = np.zeros((size, size), dtype=bool)
        for les in lesions:
            reach = int(np.ceil(les.radius + 2))
            footprint[
                max(0, int(les.y) - reach) : int(les.y) + reach + 2,
                max(0, int(les.x) - reach) : int(les.x) + reach + 2,
            ] = True
        changed = np.any(img != healthy, axis=-1)
        assert changed.any() and not (changed & ~footprint).any()  # only lesion pixels differ
        centre = [
            img[int(les.y), int(les.x)].astype(int).sum() - healthy[int(les.y), int(les.x)].astype(int).sum()
            for les in lesions
        ]
        assert all(d < 0 for d in centre) if kind == "dark" else all(d > 0 for d in centre)
    assert synthetic.lesion_count_range(3)[0] > synthetic.lesion_count_range(1)[1]  # levels do not overlap


def test_synthetic_lesions_vanish_at_low_resolution() -> None:
    healthy, _ = synthetic.make_image(1024, 0, 1, 0)
    sick, lesions = synthetic.make_image(1024, 0, 1, 1)
    assert max(les.radius for les in lesions) < 3.0  # a handful of pixels wide at 1024 px

    def gap(res: int) -> float:
        a, b = (
            np.asarray(Image.fromarray(x).resize((res, res), Image.Resampling.BILINEAR), float) for x in (healthy, sick)
        )
        return float(np.abs(a - b).max())

    assert gap(1024) > 60 and gap(512) > 40 and gap(64) < 12


def test_embedded_default_is_generated_once_and_regenerated_when_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PETLBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(synthetic, "EMBEDDED_SIZE", 64)
    monkeypatch.setattr(synthetic, "EMBEDDED_N_PER_CLASS", 3)
    messages: list[str] = []
    root = synthetic.embedded_default(log=messages.append)
    assert root == tmp_path / "data" / synthetic.EMBEDDED_NAME and (root / synthetic.COMPLETE_MARKER).is_file()
    stamp = (root / "dataset.yaml").stat().st_mtime_ns
    assert synthetic.embedded_default(log=messages.append) == root
    assert (root / "dataset.yaml").stat().st_mtime_ns == stamp  # reused
    (root / synthetic.COMPLETE_MARKER).unlink()
    (root / "train" / "0_healthy").rename(root / "junk")
    assert synthetic.embedded_default(log=messages.append) == root
    assert (root / "train" / "0_healthy").is_dir() and not (root / "junk").exists()
    assert any("incomplete or outdated" in m for m in messages)
    messages.clear()
    source = open_dataset(None, log=messages.append)
    assert any(
        m.startswith("no --dataset given: using the embedded synthetic dataset") and str(root) in m for m in messages
    )
    assert source.num_classes == synthetic.EMBEDDED_CLASSES and source.split_origin == "official"


# ---------------------------------------------------------------------------------------------------------------
# Cards


def test_all_cards_load_with_the_papers_settings() -> None:
    cards = {c.key: c for c in list_cards()}
    assert set(cards) == {"ddr", "messidor2", "isic2018", "isic2016", "ddsm", "cmmd", "covid", "chncxr"}
    expected = {
        "ddr": (5, 5e-4),
        "messidor2": (5, 2e-4),
        "isic2018": (7, 1e-4),
        "isic2016": (2, 5e-3),
        "ddsm": (3, 1e-3),
        "cmmd": (2, 5e-5),
        "covid": (3, 1e-4),
        "chncxr": (2, 5e-4),
    }
    for key, (classes, lr) in expected.items():
        card = cards[key]
        assert (card.num_classes, card.lr, card.weight_decay) == (classes, lr, 0.1)
        assert len(card.mean) == 3 and min(card.std) > 0 and card.source and card.layout
        assert card.data_root().name == key
    assert cards["cmmd"].mean == (0.1674,) * 3 and cards["ddr"].std == (0.2948, 0.2017, 0.1367)
    assert load_card("ISIC 2018").key == "isic2018" and load_card("Messidor-2").key == "messidor2"
    with pytest.raises(CardError, match="did you mean"):
        load_card("isic2017")


def test_bad_card_names_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text("key: mine\nname: Mine\nmodality: x\nnum_classes: 2\n")
    with pytest.raises(CardError, match=r"mine\.yaml: missing field\(s\) layout, split, lr"):
        read_card(bad)


def test_card_without_data_says_where_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_DATA_ROOT", str(tmp_path / "data"))
    with pytest.raises(DatasetError) as err:
        open_dataset("chncxr", log=quiet([]))
    text = str(err.value)
    assert str(tmp_path / "data" / "chncxr") in text and "Shenzhen" in text and "Expected layout" in text
    make_flat(tmp_path / "data" / "chncxr", {"normal": 10, "tuberculosis": 10})
    source = open_dataset("CHNCXR", split_dir=tmp_path / "run", log=quiet([]))
    assert source.name == "CHNCXR" and source.mean == (0.6105,) * 3 and source.split_origin == "generated"


# ---------------------------------------------------------------------------------------------------------------
# Results integrity: leakage, symlinks, labels as written, one class, undecodable names, dataset identity


def make_leaky(root: Path) -> Path:
    """Split folders where test/a/leak.png is a copy of train/a/train_a_0.png and val/ is a copy of train/."""
    make_split_folders(root, {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}})
    shutil.copyfile(root / "train" / "a" / "train_a_0.png", root / "test" / "a" / "leak.png")
    shutil.copytree(root / "train", root / "val")
    return root


def test_identical_files_across_splits_are_reported_by_check(tmp_path: Path) -> None:
    root = make_leaky(tmp_path / "ds")
    report = check_dataset(root)
    assert not report.ok
    assert len(report.leaks) == 6  # every training image is also in val, one also in test
    files = {f["path"]: f["split"] for leak in report.leaks for f in leak["files"]}
    assert files["test/a/leak.png"] == "test" and files["val/b/train_b_2.png"] == "val"
    leak = next(g for g in report.leaks if any(f["path"] == "test/a/leak.png" for f in g["files"]))
    assert {f["path"] for f in leak["files"]} == {"train/a/train_a_0.png", "val/a/train_a_0.png", "test/a/leak.png"}
    text = report.to_text()
    assert "test/a/leak.png" in text and "train/a/train_a_0.png" in text and "PROBLEMS FOUND" in text
    assert json.dumps(report.to_dict())
    clean = check_dataset(make_split_folders(tmp_path / "clean", {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}}))
    assert clean.ok and clean.leaks == []


def test_leakage_refuses_a_run_unless_allowed(tmp_path: Path) -> None:
    root = make_leaky(tmp_path / "ds")
    with pytest.raises(DatasetError) as err:
        open_dataset(root, log=quiet([]))
    text = str(err.value)
    assert "test/a/leak.png" in text and "train/a/train_a_0.png" in text and "val/b/train_b_1.png" in text
    assert "more than one split" in text and "--allow-leakage" in text and "allow_leakage" in text
    messages: list[str] = []
    source = open_dataset(root, allow_leakage=True, log=messages.append)
    assert source.allow_leakage is True and len(source.leakage) == 6
    assert any("leak.png" in m for m in messages)
    assert open_dataset(make_flat(tmp_path / "ok", {"a": 5, "b": 5}), log=quiet([])).allow_leakage is False


def test_content_hashes_are_cached_with_the_verdicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_leaky(tmp_path / "ds")
    check_dataset(root, split_dir=tmp_path / "run")
    cache = json.loads((tmp_path / "run" / "image_check.json").read_text())
    assert all(len(entry[4]) == 64 for entry in cache["files"].values())  # sha256 of the bytes, stored
    for entry in cache["files"].values():  # a cache from before content hashes: verdicts kept, hashes added
        del entry[4]
    cache["version"] = 1
    (tmp_path / "run" / "image_check.json").write_text(json.dumps(cache))
    monkeypatch.setattr(discover, "_inspect", lambda p: pytest.fail(f"decoded {p} again"))
    assert len(check_dataset(root, split_dir=tmp_path / "run").leaks) == 6


def test_symlinks_leading_out_of_their_class_folder_are_ignored(tmp_path: Path) -> None:
    root = make_flat(tmp_path / "ds", {"a": 4, "b": 4})
    (root / "a" / "up").symlink_to(root, target_is_directory=True)
    (root / "a" / "to_b").symlink_to(root / "b", target_is_directory=True)
    (root / "a" / "sub").mkdir()
    save(root / "a" / "sub" / "deep.png")
    (root / "a" / "inside").symlink_to(root / "a" / "sub", target_is_directory=True)  # stays in class a: kept
    messages: list[str] = []
    source = open_dataset(root, log=messages.append)
    counts = {c: sum(n[c] for n in source.class_counts().values()) for c in source.classes}
    assert counts == {"a": 5, "b": 4}
    assert all("b_" not in s.path.name or source.classes[s.label] == "b" for s in source.samples)
    warning = next(m for m in messages if "folder symlink" in m)
    assert str(root / "a" / "up") in warning and str(root / "a" / "to_b") in warning and "inside" not in warning
    assert any("a/up" in w for w in check_dataset(root).warnings)


def test_numeric_looking_labels_are_kept_as_written(tmp_path: Path) -> None:
    folders = make_flat(tmp_path / "folders", {"1": 5, "01": 5, "2": 5})
    messages: list[str] = []
    source = open_dataset(folders, log=messages.append)
    assert sorted(source.classes) == ["01", "1", "2"]
    assert any("'01' and '1'" in m for m in messages)  # same number, kept apart: said once
    root = tmp_path / "m"
    rows = ["path,label"]
    for i, label in enumerate(["1", "01", "2", "10"] * 5):
        save(root / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    manifest = open_dataset(root, log=quiet([]))
    assert manifest.classes == ["01", "1", "2", "10"]  # numeric order, ties by text
    assert Counter(manifest.classes[s.label] for s in manifest.samples) == {"1": 5, "01": 5, "2": 5, "10": 5}
    report = check_dataset(root)
    assert report.classes == ["01", "1", "2", "10"] and any("'01' and '1'" in w for w in report.warnings)


def test_one_class_dataset_is_an_error_in_check_and_refused(tmp_path: Path) -> None:
    root = make_flat(tmp_path / "one", {"only": 6})
    report = check_dataset(root)
    assert not report.ok and any("1 class" in e and "only" in e for e in report.errors)
    text = report.to_text()
    assert "ERROR" in text and "only" in text and "PROBLEMS FOUND" in text
    with pytest.raises(DatasetError, match="at least 2 are needed") as err:
        open_dataset(root, log=quiet([]))
    assert "only" in str(err.value) and "class folder" in str(err.value)
    split = make_split_folders(tmp_path / "split", {"train": {"x": 3}, "test": {"x": 1}})
    assert not check_dataset(split).ok


def test_undecodable_file_name_is_named(tmp_path: Path) -> None:
    root = make_flat(tmp_path / "ds", {"a": 5, "b": 5})
    weird = os.fsencode(root / "a") + b"/scan\xff\xfe.png"
    with open(weird, "wb") as handle:
        handle.write((root / "a" / "a_000.png").read_bytes()[:-1] + b"\x00")  # any bytes: never decoded
    with pytest.raises(DatasetError) as err:
        open_dataset(root, log=quiet([]))
    text = str(err.value)
    text.encode("utf-8")  # printable whatever the terminal
    assert "scan\\xff\\xfe.png" in text and "not valid UTF-8" in text
    source = open_dataset(root, skip_bad_images=True, log=quiet([]))
    assert len(source.samples) == 10 and "scan\\xff\\xfe.png" in source.skipped[0]["path"]
    report = check_dataset(root)
    assert "scan\\xff\\xfe.png" in report.bad_files[0]["path"]
    report.to_text().encode("utf-8")
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")


def test_same_folder_name_elsewhere_gets_its_own_split_cache(tmp_path: Path) -> None:
    one = make_flat(tmp_path / "x" / "lesions", {"a": 10, "b": 10})
    two = make_flat(tmp_path / "y" / "lesions", {"a": 10, "b": 12})
    results = tmp_path / "results"
    dir_one, dir_two = discover.split_dir_for(results, str(one)), discover.split_dir_for(results, str(two))
    assert dir_one != dir_two and dir_one.parent == dir_two.parent == results / "datasets"
    assert dir_one.name.startswith("lesions-") and dir_two.name.startswith("lesions-")
    assert discover.split_dir_for(results, one) == dir_one  # a Path or a str: the same place
    (tmp_path / "link").symlink_to(one, target_is_directory=True)
    assert discover.split_dir_for(results, tmp_path / "link").name.endswith(dir_one.name.split("-")[-1])
    assert discover.split_dir_for(results, None).name.startswith("synthetic-")
    first = open_dataset(one, split_dir=dir_one, log=quiet([]))
    second = open_dataset(two, split_dir=dir_two, log=quiet([]))
    assert (dir_one / "split.csv").is_file() and (dir_two / "split.csv").is_file()
    assert len((dir_one / "split.csv").read_text().splitlines()) == 21
    assert len((dir_two / "split.csv").read_text().splitlines()) == 23
    assert first.name == second.name == "lesions"
    assert first.identity != second.identity
    assert first.identity == f"lesions@{first.fingerprint()}"


def test_split_cache_of_a_card_is_keyed_by_its_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results"
    monkeypatch.setenv("PETLBENCH_DATA_ROOT", str(tmp_path / "one"))
    first = discover.split_dir_for(results, "chncxr")
    monkeypatch.setenv("PETLBENCH_DATA_ROOT", str(tmp_path / "two"))
    second = discover.split_dir_for(results, "chncxr")
    assert first != second and first.name.startswith("chncxr-")
    assert not (tmp_path / "one").exists()  # locating writes and generates nothing


def test_a_hand_edited_split_in_the_old_shared_folder_is_adopted_only_by_its_own_data(tmp_path: Path) -> None:
    one = make_flat(tmp_path / "x" / "lesions", {"a": 10, "b": 10})
    two = make_flat(tmp_path / "y" / "lesions", {"a": 10, "b": 10})
    results = tmp_path / "results"
    legacy = results / "datasets" / "lesions"  # where runs kept the split before
    assert discover.legacy_split_dir(results, str(one)) == legacy
    open_dataset(one, split_dir=legacy, log=quiet([]))
    lines = (legacy / "split.csv").read_text().splitlines()
    edited = [lines[0], lines[1].replace(",train", ",test"), *lines[2:]]
    (legacy / "split.csv").write_text("\n".join(edited) + "\n")
    messages: list[str] = []
    adopted = discover.adopt_legacy_split(results, str(one), log=messages.append)
    assert adopted == discover.split_dir_for(results, str(one)) and any(str(legacy) in m for m in messages)
    moved = one / edited[1].split(",")[0]
    source = open_dataset(one, split_dir=adopted, log=quiet([]))
    assert next(s for s in source.samples if s.path == moved).split == "test"
    fresh = discover.adopt_legacy_split(results, str(two), log=quiet([]))  # same name, other data: not adopted
    assert not fresh.exists()
