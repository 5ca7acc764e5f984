"""Ctrl-C during training: finish the step, save it, say how to resume.

The first SIGINT only sets `requested`; the training loop sees it once the current step's update
is done, saves a checkpoint of that step (model, optimizer, scheduler, RNG and data position: the
same state a scheduled checkpoint holds, so the resumed run is bitwise the uninterrupted one) and
raises `TrainingInterrupted`, which train_modular prints as one line, exiting 130. A second
SIGINT stops at once (KeyboardInterrupt); a checkpoint being written then is either complete or
only a temporary file (atomic writes), removed at the next start in the directory.

Only in a single process: under torchrun every rank would have to agree on the step to stop at
(a collective per step), so there Ctrl-C stops at once as before.
"""
from __future__ import annotations

import signal
import threading


class TrainingInterrupted(Exception):
    """The run stopped on Ctrl-C after saving a checkpoint; the message says where."""

    exit_code = 130


class GracefulInterrupt:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._before = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = True

    def __enter__(self) -> "GracefulInterrupt":
        if self.enabled:
            self._before = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self._before is not None:
            signal.signal(signal.SIGINT, self._before)
            self._before = None


__all__ = ["GracefulInterrupt", "TrainingInterrupted"]
