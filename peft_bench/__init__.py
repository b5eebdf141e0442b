"""peft-bench: full fine-tuning, LoRA (hand-written, parametrize, peft), prefix tuning and P-tuning
behind one interface, measured side by side.

`get_method` and `list_methods` are loaded on first use, so that importing the report side
(`peft_bench.report`, which reads rows) never imports torch."""

from .errors import UnsupportedError, UserError

__version__ = "0.1.0"
__all__ = ["UnsupportedError", "UserError", "get_method", "list_methods", "__version__"]


def __getattr__(name: str):
    if name in ("get_method", "list_methods"):
        from . import methods

        return getattr(methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
