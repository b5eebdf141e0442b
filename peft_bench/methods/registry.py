"""The method registry: each method module registers its class by name; `get_method` builds one."""

from __future__ import annotations

import dataclasses

from ..errors import UserError
from ..registry import Registry
from .base import Method

_REGISTRY: Registry[type[Method]] = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available under `cls.name`. Duplicate names are a bug."""
    return _REGISTRY.add(cls.name, cls)


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return _REGISTRY.names()


def method_class(name: str) -> type[Method]:
    return _REGISTRY.get(name)


def get_method(name: str, **options: object) -> Method:
    """Build the method `name` with validated options (unknown options are rejected by name)."""
    cls = method_class(name)
    allowed = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r} for method {name!r}; allowed: {', '.join(allowed) or 'none'}")
    return cls(cls.Options(**options))
