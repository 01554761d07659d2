"""What lora/ raises when a setting or an adapter cannot work.

lora/ depends on torch and the standard library only, so it has its own error type rather than the model
package's (gpt2.UserError). Both kinds mean "your input needs changing", and the scripts print both as one line
(finetune/signals.py: install_error_handling; python -m lora.anatomy catches its own), because a traceback would say the
program is broken.
"""


class LoRAError(ValueError):
    """A LoRA setting or adapter file that cannot work here; the message says what to change."""
