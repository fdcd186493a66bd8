"""The paper preset and the paper check: the papers' printed values, reproduced where petlbench can compute them."""

from __future__ import annotations

import pytest

from petlbench.core.config import ConfigError
from petlbench.core.method import get_method
from petlbench.core.preset import PRESETS, backbone_name, get_preset, method_overrides
from petlbench.reports.paper_check import PaperCheck, check_csv, check_markdown, load_values

PAPER = PRESETS["paper"]
VALUES = load_values()


def test_preset_sets_each_knob_and_flags_win() -> None:
    assert PAPER.attention == "explicit" and PAPER.pos_interp == "official" and PAPER.param_convention == "official"
    assert backbone_name(PAPER, None, pretrained=False, fallback="x") == "vit_base_patch16_384"
    assert backbone_name(PAPER, None, pretrained=True, fallback="x") == "vit_base_patch16_384.orig_in21k_ft_in1k"
    assert backbone_name(PAPER, "vit_small_patch16_224", pretrained=True, fallback="x") == "vit_small_patch16_224"
    assert backbone_name(get_preset(None), None, pretrained=True, fallback="x") == "x"
    fpt_plus = get_method("fpt_plus")
    assert method_overrides(PAPER, fpt_plus, {}) == {"cache_dtype": "float32"}
    assert method_overrides(PAPER, fpt_plus, {"cache_dtype": "float16"}) == {"cache_dtype": "float16"}
    assert method_overrides(PAPER, get_method("lora"), {}) == {}
    with pytest.raises(ConfigError, match="--preset 'papers': use one of none, paper"):
        get_preset("papers")


FPT_PARAMS = [
    v
    for v in VALUES["values"]
    if v["key"] == "params"
    and v["method"] in ("fpt", "fpt_plus")
    and v["table"] in ("I", "V", "VI")
    and not str(v.get("section", "")).startswith("DINO")  # the DINO rows print the supervised rows' values again
]


@pytest.mark.parametrize("value", FPT_PARAMS, ids=lambda v: f"{v['table']}-{v['row']}")
def test_every_printed_fpt_params_value_is_reproduced_under_the_preset(value: dict) -> None:
    """Tables I, V and VI: the official convention (frozen LPM with its 1000-class head and native 577-row table)."""
    setting = VALUES["settings"][f"table_{value['table']}"]
    row = PaperCheck(PAPER).rows([value], VALUES["settings"])[0]
    assert row.matches_digits, (row.ours, row.printed, setting.get("backbone"))


def test_twelve_fpt_values_are_covered() -> None:
    assert len({(v["table"], v["row"]) for v in FPT_PARAMS}) == 12


@pytest.mark.slow
def test_check_rows_name_their_memory_kind_and_oom_verdicts() -> None:
    """A Table II FLOPs row (attention not counted) and a Table III out-of-memory cell, rendered to Markdown/CSV."""
    wanted = [
        next(v for v in VALUES["values"] if v["table"] == "II" and v["method"] == "full_ft" and v["key"] == "flops"),
        next(v for v in VALUES["values"] if v["table"] == "III" and v.get("oom") and v["method"] == "full_ft"),
    ]
    rows = PaperCheck(PAPER).rows(wanted, VALUES["settings"])
    flops, oom = rows
    assert flops.kind == "GFLOPs, no attention" and abs(flops.rel_error or 1) < 0.005  # 87.76 vs 87.84 printed
    assert oom.paper_oom is True and oom.ours_oom is True and "reserved" in oom.kind
    md = check_markdown(rows, PAPER, 1.0)
    assert "OOM agrees" in md and "002_5f1584f72f46c4f5.txt" in md
    assert check_csv(rows).count("\n") == 3


def test_run_request_under_the_paper_preset_records_every_knob(tmp_path) -> None:
    """Each knob the preset sets is in the run's configuration; flags given explicitly win."""
    from petlbench.engine.runner import RunRequest, resolve

    base = dict(methods="fpt_plus", backbone="test_vit", res=64, epochs=1, batch_size=4, results=tmp_path)
    ((_, cfg),) = resolve(RunRequest(**base, preset="paper")).configs
    assert (cfg.attention, cfg.pos_interp, cfg.preset) == ("explicit", "official", "paper")
    assert cfg.method_options["cache_dtype"] == "float32"
    ((_, mine),) = resolve(
        RunRequest(**base, preset="paper", attention="fused", pos_interp="timm", opts=["fpt_plus.cache_dtype=float16"])
    ).configs
    assert (mine.attention, mine.pos_interp, mine.method_options["cache_dtype"]) == ("fused", "timm", "float16")
    assert cfg.run_id != mine.run_id
    with pytest.raises(ConfigError, match="--preset"):
        resolve(RunRequest(**base, preset="papers"))


def test_sweep_spec_takes_the_preset(tmp_path) -> None:
    from petlbench.sweep.spec import SweepSpecError, load_spec

    assert load_spec("paper").preset == "paper"
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nmethods: [lora]\ndatasets: [ddr]\npreset: papers\n")
    with pytest.raises(SweepSpecError, match="key 'preset'"):
        load_spec(spec)
