"""Floor 1: one small registry type, reused for every choice set of the toolkit.

A registry maps names to implementations (functions, classes, specs). Looking up a name that is
not there is bad input: the error names the choice set and lists what exists.

    SCORERS = Registry("scorer")

    @SCORERS.register("taylor")
    def taylor_scores(...): ...

    SCORERS.get("taylor")      # -> the function
    SCORERS.get("tayler")      # UserError: unknown scorer 'tayler'; use one of magnitude, random, taylor
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from gqaprune.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> implementation, in registration order; ``kind`` names the choice set in errors
    (use the flag name, e.g. ``"normalization"``, so the message points at what to change)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """``REG.register("x", obj)`` or as a decorator ``@REG.register("x")``."""
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj
        return add if item is None else add(item)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserError(f"unknown {self.kind} '{name}'", f"use one of {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def items(self):
        return self._items.items()

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
