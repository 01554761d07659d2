"""How a script's process ends: errors a user can fix, Ctrl-C, and a cluster's SIGTERM.

`install_error_handling()` is the first line of every script. From then on an uncaught `gpt2.UserError`,
`lora.LoRAError` or `tensorio.FileError` prints as one line, `error: <message>`, and exits 1: its message says
what to change, and a traceback would say the program is broken. Ctrl-C before training starts (imports, loading
the model and the data) prints one line too, since there is nothing to save yet. Importing a library never does
this: a module that changed `sys.excepthook` as a side effect would change every program that imports it.

Once the training loop starts, `StopRequest` takes over SIGINT and SIGTERM: the first signal asks the loop to
finish the current step, save a checkpoint and exit. A second one exits at once, without saving and without a
traceback: the last checkpoint on disk is still whole (writes are atomic). Leaving the `with` block puts the
previous handlers back, so a process that trains (a test, a notebook) is left as it was found.
"""
import signal
import sys

EXIT_CODE = 130  # the shell's code for "ended by Ctrl-C"
# The packages' own "your input needs changing" errors, by module and class name. The hook looks them up only when
# an exception arrives: an error of one of these kinds implies its module was imported, and installing the hook imports
# nothing, so it can run before `import torch` (Ctrl-C during that slow import is caught too).
USER_ERRORS = (("gpt2.errors", "UserError"), ("lora.errors", "LoRAError"), ("tensorio.files", "FileError"))


def _is_user_error(exc_type: type) -> bool:
    kinds = tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)
    return issubclass(exc_type, kinds)


def install_error_handling() -> None:
    """Print UserError / LoRAError / FileError as `error: <message>` and Ctrl-C as one line, instead of a traceback."""
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        if _is_user_error(exc_type):
            print(f"error: {exc}", file=sys.stderr)
        elif issubclass(exc_type, KeyboardInterrupt):
            print("\ninterrupted (Ctrl-C): stopped before anything was written", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)
    sys.excepthook = excepthook


class StopRequest:
    """`with StopRequest() as stop:` ... `if stop.requested:` save and leave."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            print(f"\n{name} again: quitting without saving", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODE)
        self.requested = True
        print(f"\n{name}: stopping after this step to save a checkpoint (send it again to quit without saving)",
              file=sys.stderr, flush=True)
