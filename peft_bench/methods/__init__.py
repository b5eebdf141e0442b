"""The methods, each registered by name (`registry`): importing this package registers every one, in the order of
every table (`list_methods()`)."""

from __future__ import annotations

from .base import Method, MethodOptions
from .registry import get_method, list_methods, method_class, register

# Registration order is the order of `list_methods()` and of every table.
# isort: off
from . import full, lora, lora_parametrize, hf, dora, bitfit, tuners  # noqa: E402,F401
# isort: on

__all__ = ["Method", "MethodOptions", "get_method", "list_methods", "method_class", "register"]
