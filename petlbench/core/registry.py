"""One registry mechanism for pluggable components (methods, profilers, ...)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, known: Iterable[str], n: int = 3) -> str:
    """The hint " Did you mean a, b?" naming the entries of `known` closest to `name`, best first; "" if none is."""
    close = difflib.get_close_matches(name, list(known), n=n)
    return f" Did you mean {', '.join(close)}?" if close else ""


class RegistryError(KeyError):
    """An unknown or duplicate name in a registry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name -> object map with decorator registration, lazy "module:attr" entries and suggestions."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._objects: dict[str, T] = {}
        self._lazy: dict[str, str] = {}
        self._order: list[str] = []  # registration order, stable when lazy entries get loaded

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register `obj` under `name`; usable as a decorator. Duplicate names raise."""

        def add(target: T) -> T:
            if name in self._objects and self._objects[name] is not target:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._objects[name] = target
            if name not in self._order:
                self._order.append(name)
            self._lazy.pop(name, None)
            return target

        return add(obj) if obj is not None else add

    def register_lazy(self, name: str, target: str) -> None:
        """Register `name` as "package.module:attr" (or a module that registers `name` itself), imported on first
        use."""
        if name in self._objects or name in self._lazy:
            raise RegistryError(f"{self.kind} {name!r} is already registered")
        self._lazy[name] = target
        self._order.append(name)

    def unregister(self, name: str) -> None:
        """Forget `name` (tests and interactive sessions that register throw-away components)."""
        self._objects.pop(name, None)
        self._lazy.pop(name, None)
        if name in self._order:
            self._order.remove(name)

    def names(self) -> list[str]:
        """All registered names, in registration order."""
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._objects or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The object registered as `name`; unknown names raise with suggestions."""
        if name in self._objects:
            return self._objects[name]
        if name in self._lazy:
            target = self._lazy[name]
            module_name, _, attr = target.partition(":")
            module = importlib.import_module(module_name)  # importing may register it via a decorator
            if attr:
                self._objects.setdefault(name, getattr(module, attr))
            elif name not in self._objects:
                raise RegistryError(f"{target} was imported for {self.kind} {name!r} but registered no such name")
            self._lazy.pop(name, None)
            return self._objects[name]
        known = self.names()
        raise RegistryError(f"unknown {self.kind} {name!r}.{did_you_mean(name, known)} Known: {', '.join(known)}")
