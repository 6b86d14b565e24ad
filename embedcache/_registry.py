"""A name -> object registry, one per thing that varies (teachers, datasets, text sources...).

Things register themselves where they are defined with ``@REGISTRY.register("name")``; lookups
accept a name or the object itself, and an unknown name lists what exists.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; a user should read plain text
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
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
            raise RegistryError(
                f"unknown {self.kind} {name_or_obj!r}; available: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
