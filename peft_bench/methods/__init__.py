"""The method registry: each method module registers its class by name; `get_method` builds one."""

from __future__ import annotations

from ..errors import UserError
from .base import Method, MethodOptions

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available under `cls.name`. Duplicate names are a bug."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def get_method(name: str, **options: object) -> Method:
    """Build the method `name` with validated options (unknown options are rejected by name)."""
    cls = method_class(name)
    allowed = [f.name for f in __import__("dataclasses").fields(cls.Options)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r} for method {name!r}; allowed: {', '.join(allowed) or 'none'}")
    return cls(cls.Options(**options))


# Registration order is the order of `list_methods()` and of every table.
# isort: off
from . import full, lora, lora_parametrize, hf  # noqa: E402,F401
# isort: on

__all__ = ["Method", "MethodOptions", "get_method", "list_methods", "method_class", "register"]
