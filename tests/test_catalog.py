"""Method cards read from source: the listing needs no torch, and what the reader cannot evaluate is imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from petlbench.core import catalog
from petlbench.core.catalog import StaticReadError, builtin_card, card_from_class, method_cards
from petlbench.core.method import get_method, method_keys


def test_methods_listing_imports_neither_torch_nor_timm() -> None:
    script = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from petlbench.cli import app\n"
        "result = CliRunner().invoke(app, ['methods', '--json'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(json.dumps({'keys': [m['method'] for m in json.loads(result.output)],\n"
        "                  'heavy': sorted(m for m in ('torch', 'timm', 'peft') if m in sys.modules)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    listed = json.loads(out.stdout.strip().splitlines()[-1])
    assert listed["heavy"] == []
    assert listed["keys"] == method_keys()


def test_every_builtin_card_is_read_from_source_in_rank_order() -> None:
    cards = method_cards()
    assert [card.key for card in cards] == method_keys()
    assert {card.read_from for card in cards} == {"source"}
    assert [card.rank for card in cards] == sorted(get_method(card.key).rank for card in cards)


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


HEADER = """
    from dataclasses import dataclass
    from petlbench.core.method import Method, register_method
    from petlbench.core.options import option
    """


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('n: int = option(max(1, 2), "computed")', "max(1, 2)"),
        ('n: int = option(1, "help " + "joined")', "is not a declaration this reader evaluates"),
        ("n: int = option(1)", "needs a default and a help text"),
    ],
)
def test_reader_refuses_what_it_cannot_evaluate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str
) -> None:
    source = HEADER + textwrap.indent(
        textwrap.dedent(f"""
        @dataclass(frozen=True)
        class Opts:
            {body}

        @register_method
        class Probe(Method):
            key = "probe_card"
            display_name = "Probe"
            Options = Opts
        """),
        "    ",
    )
    name = _module(tmp_path, monkeypatch, f"probe_{abs(hash(body))}", source)
    with pytest.raises(StaticReadError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        builtin_card(name)


def test_reader_follows_constants_fstrings_and_bases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = (
        HEADER
        + """
    CHOICES = {"a": 1, "b": 2}
    WIDTH = 8

    @dataclass(frozen=True)
    class Base:
        width: int = option(WIDTH, "base width")
        depth: int | None = option(None, "depth")

    @dataclass(frozen=True)
    class Opts(Base):
        depth: int | None = option(3, f"depth, one of {', '.join(CHOICES)}")
        tags: tuple[str, ...] = option(["x", "y"], "tags")

    class Shared(Method):
        rank = 7

    @register_method
    class Probe(Shared):
        key = "probe_card"
        display_name = "Probe"
        Options = Opts
    """
    )
    card = builtin_card(_module(tmp_path, monkeypatch, "probe_follow", source))
    assert (card.key, card.display_name, card.rank) == ("probe_card", "Probe", 7)
    assert [(o.name, o.type, o.default, o.help) for o in card.options] == [
        ("width", "int", 8, "base width"),
        ("depth", "int | None", 3, "depth, one of a, b"),
        ("tags", "tuple[str, ...]", ("x", "y"), "tags"),
    ]


def test_a_builtin_the_reader_cannot_follow_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(module_name: str) -> catalog.MethodCard:
        if module_name.endswith(".lora"):
            raise StaticReadError("pretend lora's declarations were computed")
        return builtin_card(module_name)

    monkeypatch.setattr(catalog, "builtin_card", refuse)
    cards = {card.key: card for card in method_cards()}
    assert cards["lora"].read_from == "import" and cards["lora"] == card_from_class(get_method("lora"))
    assert cards["fpt_plus"].read_from == "source"
