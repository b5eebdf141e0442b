"""A name → item mapping shared by the method, workload and suite registries.

Registering a name twice is a bug (RuntimeError); asking for an unknown name is bad input (UserError) whose
message lists the known names in registration order.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise RuntimeError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def names(self) -> list[str]:
        return list(self._items)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._items)}") from None
