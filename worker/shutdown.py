"""Graceful shutdown: the first SIGTERM/SIGINT asks the loop to stop; a second one, or the
end of the grace period, ends the process at once (ExitCode.FORCED).

Stopping at once is safe by design: whatever was in hand stays pending and is claimed by
another replica; locks expire by TTL; marked entries are skipped on redelivery.
The handler itself only sets a flag (no logging: the main thread may be mid-write).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

from worker.errors import ExitCode


class Shutdown:
    def __init__(self, grace_ms: int, hard_exit: Callable[[int], object] = os._exit) -> None:
        self.grace_s = grace_ms / 1000
        self._hard_exit = hard_exit
        self._requested = False
        self.signal_name = ""

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def requested(self) -> bool:
        return self._requested

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self._requested:
            self._force(f"second signal ({signal.Signals(signum).name}): exiting now\n")
            return
        self._requested = True
        self.signal_name = signal.Signals(signum).name
        timer = threading.Timer(
            self.grace_s, self._force, args=("grace period over: exiting now\n",)
        )
        timer.daemon = True
        timer.start()

    def _force(self, message: str) -> None:
        os.write(2, f"stream-counter: {message}".encode())
        self._hard_exit(ExitCode.FORCED)
