"""Stopping a run without losing it: Ctrl-C (SIGINT) or a cluster's SIGTERM before it kills the job.

The first signal asks the loop to finish the current step, save a checkpoint and exit. A second one exits at
once, without saving and without a traceback: the last checkpoint on disk is still whole (writes are atomic).
"""
import signal
import sys

EXIT_CODE = 130  # the shell's code for "ended by Ctrl-C"


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
