"""Errors a user can cause and fix: a wrong path, no network, a file of another model.

They carry a message that says what to do. The scripts print an uncaught one as that message alone, not a
traceback (finetune/signals.py: install_error_handling): a traceback tells a user that the program is broken, when
it is their input that needs changing.
"""


class UserError(Exception):
    """An error caused by the user's input or environment; its message says how to fix it."""
