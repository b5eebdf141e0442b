"""peft-bench: full fine-tuning, LoRA (hand-written, parametrize, peft), prefix tuning and P-tuning
behind one interface, measured side by side."""

from .errors import UnsupportedError, UserError
from .methods import get_method, list_methods

__version__ = "0.1.0"
__all__ = ["UnsupportedError", "UserError", "get_method", "list_methods", "__version__"]
