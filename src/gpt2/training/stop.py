"""Ctrl-C and SIGTERM during training: the first saves after the current step, a second Ctrl-C
aborts at once (counted as the signals arrive, not as Python gets to them).

    with StopRequest() as stop:
        while not stop.requested: ...
"""

from __future__ import annotations

import os
import signal
import sys


class StopRequest:
    """Ctrl-C / SIGTERM once: finish the current step, save, exit 0. Ctrl-C twice: abort now.

    Signals are counted as they arrive, not as Python's handler runs: two Ctrl-Cs pressed while
    the main thread is inside one long kernel (a validation batch) reach the handler as one
    call, and would otherwise count once (the process's wakeup fd receives a byte for each).
    """

    def __init__(self) -> None:
        self.requested = False
        self._interrupts = 0
        self._old: dict[int, object] = {}
        self._wakeup: tuple[int, int] | None = None
        self._old_wakeup = -1

    def _arrived(self, signum: int) -> int:
        """How many SIGINTs arrived since the last call (at least this one, for ``signum``)."""
        count = 0
        if self._wakeup is not None:
            try:
                while chunk := os.read(self._wakeup[0], 512):
                    count += chunk.count(bytes([signal.SIGINT]))
            except BlockingIOError:
                pass
        return max(count, int(signum == signal.SIGINT))

    def _handle(self, signum, frame) -> None:
        self._interrupts += self._arrived(signum)
        if self._interrupts >= 2 or (self.requested and signum == signal.SIGINT):
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving after this step (Ctrl-C again to abort "
              "without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                return self
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup = (r, w)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
