"""Errors a user can cause and fix: a wrong path, no network, a file of another model.

They carry a message that says what to do. Uncaught, they print that message alone, not a traceback:
a traceback tells a user that the program is broken, when it is their input that needs changing.
"""
import sys


class UserError(Exception):
    """An error caused by the user's input or environment; its message says how to fix it."""


def _print_user_errors_without_traceback(exc_type, exc, tb):
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        _default_excepthook(exc_type, exc, tb)


_default_excepthook = sys.excepthook
sys.excepthook = _print_user_errors_without_traceback
