"""A name -> object registry, one per thing that varies (teachers, datasets, losses, launchers...).

Things register themselves where they are defined with ``@REGISTRY.register("name")``; lookups
accept a name or the object itself, and an unknown name is a one-line error listing what exists.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, TypeVar

from .errors import EmbedcacheError

T = TypeVar("T")


class RegistryError(EmbedcacheError, KeyError):
    """An unknown name: a user error (the CLI prints it as one line), and a KeyError for callers."""

    def __str__(self) -> str:  # KeyError quotes its message; a user should read plain text
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str, hint: str = "", prefixes: tuple = ()):
        self.kind = kind
        self.hint = hint  # appended to the unknown-name error, e.g. "or timm:<any timm model>"
        self.prefixes = tuple(prefixes)  # names built on demand, e.g. "timm:" + any timm model
        self._items: Dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"duplicate {self.kind} name {name!r}: pick another name")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name_or_obj: Any) -> Any:
        if not isinstance(name_or_obj, str):
            return name_or_obj
        try:
            return self._items[name_or_obj]
        except KeyError:
            raise RegistryError(self.unknown(name_or_obj)) from None

    def unknown(self, name: str) -> str:
        hint = f", {self.hint}" if self.hint else ""
        return f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}{hint}"

    def check(self, name: str) -> str:
        """The name itself if registered, else the one-line error (for validating settings early)."""
        self.get(name)
        return name

    def accepts(self, name: str) -> bool:
        return name in self._items or name.startswith(self.prefixes) if self.prefixes else name in self._items

    def names(self) -> list:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
