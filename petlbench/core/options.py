"""Typed method options: dataclasses whose fields carry defaults and help, set from `--opt key=value`."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


class OptionError(ValueError):
    """A bad `--opt` key or value."""


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (lists and tuples become immutable tuples)."""
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a method that has none."""


def _coerce(text: str, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", "") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(text, arg, where)
            except OptionError as err:
                errors.append(str(err))
        raise OptionError("; ".join(errors))
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise OptionError(f"{where}: {text!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        item_type = args[0] if args else str
        items = [part for part in text.replace(";", ",").split(",") if part.strip() != ""]
        return tuple(_coerce(item.strip(), item_type, where) for item in items)
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{where}: {text!r} is not a boolean (use true/false)")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise OptionError(f"{where}: {text!r} is not a valid {annotation.__name__}") from None
    raise OptionError(f"{where}: unsupported option type {annotation!r}")


def field_types(options_cls: type) -> dict[str, Any]:
    """Resolved type annotations of an options dataclass."""
    return typing.get_type_hints(options_cls)


def build_options(options_cls: type, overrides: dict[str, str | Any], method_key: str) -> Any:
    """Instantiate `options_cls` with string (or typed) overrides; unknown keys raise with the valid ones."""
    hints = field_types(options_cls)
    names = [field.name for field in dataclasses.fields(options_cls)]
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in names:
            valid = ", ".join(f"{method_key}.{n}" for n in names) or "(this method has no options)"
            raise OptionError(f"unknown option {method_key}.{key}; valid options: {valid}")
        where = f"--opt {method_key}.{key}"
        values[key] = _coerce(raw, hints[key], where) if isinstance(raw, str) else raw
    try:
        return options_cls(**values)
    except (TypeError, ValueError) as err:
        raise OptionError(f"invalid options for {method_key}: {err}") from None


def parse_opt_flags(flags: list[str] | None) -> dict[str, dict[str, str]]:
    """Split repeated `--opt method.key=value` flags into {method: {key: value}}."""
    parsed: dict[str, dict[str, str]] = {}
    for flag in flags or []:
        name, sep, value = flag.partition("=")
        method, dot, key = name.strip().partition(".")
        if not sep or not dot or not method or not key:
            raise OptionError(f"--opt {flag!r} must look like METHOD.KEY=VALUE, e.g. --opt lora.r=8")
        parsed.setdefault(method, {})[key] = value.strip()
    return parsed


def as_dict(options: Any) -> dict[str, Any]:
    """Options as a JSON-friendly dict."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(options).items()}
