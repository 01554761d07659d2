"""What lora/ raises when a setting or an adapter cannot work, and how the scripts show it.

lora/ depends on torch and the standard library only, so it has its own error type rather than the model
package's (gpt2.UserError). Both kinds mean "your input needs changing", and both print as one line:
an uncaught LoRAError shows its message alone, because a traceback would say the program is broken.
"""
import sys


class LoRAError(ValueError):
    """A LoRA setting or adapter file that cannot work here; the message says what to change."""


def _print_lora_errors_without_traceback(exc_type, exc, tb):
    if issubclass(exc_type, LoRAError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        _previous_excepthook(exc_type, exc, tb)


_previous_excepthook = sys.excepthook  # gpt2/errors.py's hook, if it came first: each handles its own kind
sys.excepthook = _print_lora_errors_without_traceback
