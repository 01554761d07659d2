"""Stopping a run without losing it: Ctrl-C (SIGINT) or a cluster's SIGTERM before it kills the job.

Once the training loop starts, the first signal asks it to finish the current step, save a checkpoint and exit.
A second one exits at once, without saving and without a traceback: the last checkpoint on disk is still whole
(writes are atomic). Before the loop (imports, loading the model and the data) there is nothing to save: Ctrl-C
quits with one line instead of a traceback (importing this module installs that), and SIGTERM ends the process
as usual.
"""
import signal
import sys

EXIT_CODE = 130  # the shell's code for "ended by Ctrl-C"


def _quit_quietly_on_ctrl_c(exc_type, exc, tb):
    if issubclass(exc_type, KeyboardInterrupt):
        print("\ninterrupted (Ctrl-C): stopped before anything was written", file=sys.stderr)
    else:
        _previous_excepthook(exc_type, exc, tb)


_previous_excepthook = sys.excepthook
sys.excepthook = _quit_quietly_on_ctrl_c


class StopRequest:
    def __init__(self):
        self.requested = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            print(f"\n{name} again: quitting without saving", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODE)
        self.requested = True
        print(f"\n{name}: stopping after this step to save a checkpoint (send it again to quit without saving)",
              file=sys.stderr, flush=True)
