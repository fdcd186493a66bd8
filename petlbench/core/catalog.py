"""Method cards (key, display name, rank, options with defaults and help) for listings, read from the source.

Importing a method module means importing torch, timm and often peft: seconds before `petlbench methods` could
print a line. The cards are declarations (class attributes and `option(default, help)` fields), so they are read
from the modules' syntax trees instead, following base classes and imports inside petlbench. A module that
declares something this reader cannot evaluate (a computed default, a base class outside petlbench) is imported
and described from its classes; so are third-party plugins, which are user code by contract. The contract tests
check that every built-in's card equals what importing it gives.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

REGISTER_DECORATOR = "register_method"
OPTION_FACTORY = "option"
PLUGIN_GROUP = "petlbench.methods"  # entry-point group of third-party methods


class StaticReadError(ValueError):
    """A declaration the source reader cannot evaluate without running the module."""


@dataclass(frozen=True)
class OptionCard:
    """One option of a method: name, annotation as written, default and help."""

    name: str
    type: str
    default: Any
    help: str

    def as_dict(self) -> dict[str, Any]:
        """The option as `petlbench methods --json` prints it."""
        return {"name": self.name, "type": self.type, "default": self.default, "help": self.help}


@dataclass(frozen=True)
class MethodCard:
    """What a listing shows of a method, and whether it came from the source or from importing the module."""

    key: str
    display_name: str
    rank: int
    options: tuple[OptionCard, ...]
    read_from: str  # "source" or "import"


def type_label(annotation: Any) -> str:
    """An annotation as its source text would read (`int | None`, `Literal['a', 'b']`), for imported classes."""
    name = getattr(annotation, "__name__", None)
    if isinstance(annotation, type) and name is not None:
        return name
    return str(annotation).replace("typing.", "")


def card_from_class(cls: Any) -> MethodCard:
    """The card of an imported Method subclass."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls.Options)
    options = tuple(
        OptionCard(f.name, type_label(hints[f.name]), f.default, str(f.metadata.get("help", "")))
        for f in dataclasses.fields(cls.Options)
    )
    return MethodCard(cls.key, cls.display_name, cls.rank, options, "import")


def builtin_card(module_name: str) -> MethodCard:
    """The card of the method a built-in module registers, from its source; StaticReadError if it cannot be read."""
    module = _parsed(module_name)
    registered = [
        node
        for node in module.tree.body
        if isinstance(node, ast.ClassDef) and any(_names(d, REGISTER_DECORATOR) for d in node.decorator_list)
    ]
    if len(registered) != 1:
        raise StaticReadError(f"{module_name}: expected one @{REGISTER_DECORATOR} class, found {len(registered)}")
    cls = _ClassRef(module, registered[0])
    key, display_name, rank = (cls.attribute(name) for name in ("key", "display_name", "rank"))
    options_ref = cls.attribute_class("Options")
    if not isinstance(key, str) or not isinstance(display_name, str) or not isinstance(rank, int):
        raise StaticReadError(f"{module_name}: key, display_name and rank must be literals")
    return MethodCard(key, display_name, rank, tuple(options_ref.dataclass_fields().values()), "source")


def _names(node: ast.expr, name: str) -> bool:
    return (isinstance(node, ast.Name) and node.id == name) or (isinstance(node, ast.Attribute) and node.attr == name)


@dataclass(frozen=True)
class _Module:
    name: str
    tree: ast.Module

    def resolve(self, name: str) -> tuple[_Module, ast.stmt]:
        """The module-level definition `name` refers to here: a class, an assignment, or one imported from
        petlbench."""
        for node in reversed(self.tree.body):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return self, node
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return self, node
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return _parsed(self._absolute(node)).resolve(alias.name)
        raise StaticReadError(f"{self.name}: cannot find the definition of {name!r}")

    def _absolute(self, node: ast.ImportFrom) -> str:
        if node.level:
            package = self.name.rsplit(".", node.level)[0]
            target = f"{package}.{node.module}" if node.module else package
        else:
            target = node.module or ""
        if not target.startswith("petlbench"):
            raise StaticReadError(f"{self.name}: {target} is outside petlbench")
        return target

    def evaluate(self, node: ast.expr) -> Any:
        """A declaration's value: literals, containers of them, module-level names bound to them (followed through
        petlbench imports), f-strings and `"sep".join(...)` of such values; anything else is not read."""
        if isinstance(node, ast.Name):
            module, definition = self.resolve(node.id)
            if isinstance(definition, ast.Assign | ast.AnnAssign) and definition.value is not None:
                return module.evaluate(definition.value)
            raise StaticReadError(f"{self.name}: {node.id} is not bound to a value")
        if isinstance(node, ast.JoinedStr):
            return "".join(self._formatted(part) for part in node.values)
        if isinstance(node, ast.Call) and _is_str_join(node):
            return node.func.value.value.join(self.evaluate(node.args[0]))  # type: ignore[attr-defined]
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = [self.evaluate(item) for item in node.elts]
            return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {self.evaluate(k): self.evaluate(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise StaticReadError(
                f"{self.name}: {ast.unparse(node)} is not a declaration this reader evaluates"
            ) from None

    def _formatted(self, part: ast.expr) -> str:
        if isinstance(part, ast.Constant):
            return str(part.value)
        if isinstance(part, ast.FormattedValue) and part.conversion == -1 and part.format_spec is None:
            return str(self.evaluate(part.value))
        raise StaticReadError(f"{self.name}: f-string part {ast.unparse(part)} is not read")


def _is_str_join(node: ast.Call) -> bool:
    func = node.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "join"
        and isinstance(func.value, ast.Constant)
        and isinstance(func.value.value, str)
        and len(node.args) == 1
        and not node.keywords
    )


@dataclass(frozen=True)
class _ClassRef:
    module: _Module
    node: ast.ClassDef

    def bases(self) -> list[_ClassRef]:
        refs = []
        for base in self.node.bases:
            name = base.id if isinstance(base, ast.Name) else None
            if name is None:
                raise StaticReadError(f"{self.module.name}.{self.node.name}: base {ast.unparse(base)} is not a name")
            module, definition = self.module.resolve(name)
            if not isinstance(definition, ast.ClassDef):
                raise StaticReadError(f"{module.name}: {name} is not a class")
            refs.append(_ClassRef(module, definition))
        return refs

    def _own(self, name: str) -> ast.expr | None:
        for node in self.node.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return node.value
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return node.value
        return None

    def _lookup(self, name: str) -> tuple[_ClassRef, ast.expr]:
        """The class that sets `name`: this one, else its bases depth first."""
        value = self._own(name)
        if value is not None:
            return self, value
        for base in self.bases():
            try:
                return base._lookup(name)
            except StaticReadError:
                continue
        raise StaticReadError(f"{self.module.name}.{self.node.name}: {name} is not set")

    def attribute(self, name: str) -> Any:
        """A literal class attribute, inherited ones included."""
        owner, value = self._lookup(name)
        return owner.module.evaluate(value)

    def attribute_class(self, name: str) -> _ClassRef:
        """A class attribute naming a class (`Options = LoRAOptions`)."""
        owner, value = self._lookup(name)
        if not isinstance(value, ast.Name):
            raise StaticReadError(f"{owner.module.name}: {name} = {ast.unparse(value)} is not a class name")
        module, definition = owner.module.resolve(value.id)
        if not isinstance(definition, ast.ClassDef):
            raise StaticReadError(f"{module.name}: {value.id} is not a class")
        return _ClassRef(module, definition)

    def dataclass_fields(self) -> dict[str, OptionCard]:
        """Fields in dataclass order: bases' first (a redefinition keeps the base's position), then new ones."""
        fields: dict[str, OptionCard] = {}
        for base in reversed(self.bases()):
            fields.update(base.dataclass_fields())
        for node in self.node.body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            annotation = ast.unparse(node.annotation)
            if annotation.startswith(("ClassVar", "typing.ClassVar")):
                continue
            fields[node.target.id] = self._field(node.target.id, annotation, node.value)
        return fields

    def _field(self, name: str, annotation: str, value: ast.expr | None) -> OptionCard:
        where = f"{self.module.name}.{self.node.name}.{name}"
        if value is None:
            raise StaticReadError(f"{where}: an option without a default")
        if not (isinstance(value, ast.Call) and _names(value.func, OPTION_FACTORY)):
            return OptionCard(name, annotation, self.module.evaluate(value), "")
        arguments = dict(zip(("default", "help"), value.args, strict=False))
        arguments.update({k.arg: k.value for k in value.keywords if k.arg in ("default", "help")})
        if set(arguments) != {"default", "help"}:
            raise StaticReadError(f"{where}: option() needs a default and a help text")
        default = self.module.evaluate(arguments["default"])
        if isinstance(default, list):
            default = tuple(default)  # as option() stores it
        return OptionCard(name, annotation, default, str(self.module.evaluate(arguments["help"])))


@cache
def _parsed(module_name: str) -> _Module:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise StaticReadError(f"{module_name}: no Python source to read")
    return _Module(module_name, ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin))


def builtin_method_modules() -> list[str]:
    """The module names of `petlbench.methods` (each is a method key), without importing them."""
    import pkgutil

    import petlbench.methods

    return sorted(m.name for m in pkgutil.iter_modules(petlbench.methods.__path__) if not m.name.startswith("_"))


def plugin_sources() -> bool:
    """Whether third-party methods are declared (an installed entry point or a PETLBENCH_PLUGINS file)."""
    import os
    from importlib.metadata import entry_points

    return bool(os.environ.get("PETLBENCH_PLUGINS", "").strip()) or bool(entry_points(group=PLUGIN_GROUP))


def method_cards() -> list[MethodCard]:
    """Every method's card in listing order (rank, then key): built-ins from source where it can be read, the
    rest imported."""
    cards: dict[str, MethodCard] = {}
    for module_name in builtin_method_modules():
        try:
            card = builtin_card(f"petlbench.methods.{module_name}")
        except (StaticReadError, SyntaxError, OSError):
            from petlbench.core.method import get_method

            card = card_from_class(get_method(module_name))
        cards[card.key] = card
    if plugin_sources():
        from petlbench.core.method import get_method, method_keys

        for key in method_keys():
            if key not in cards:
                cards[key] = card_from_class(get_method(key))
    return sorted(cards.values(), key=lambda card: (card.rank, card.key))
