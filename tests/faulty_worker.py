"""``stream-counter`` with a fault injected at one step of the protocol (tests only).

FAULT_STEP    which step: lock_and_apply | apply | ack_and_release | dead_letter
FAULT_WHEN    before | after (the step)
FAULT_NTH     on the n-th call of that step (default 1)
FAULT_ACTION  kill (SIGKILL self) | stop (SIGSTOP self: the test resumes us with SIGCONT)

Only this process's own code is patched; Redis is real and decides everything.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from worker import batch, cli, consumer

STEPS: dict[str, tuple[type, str]] = {
    "lock_and_apply": (batch.BatchApplier, "_lock_and_apply"),
    "apply": (batch.BatchApplier, "_apply"),
    "ack_and_release": (batch.BatchApplier, "_ack_and_release"),
    "dead_letter": (consumer.Consumer, "_dead_letter"),
}


def inject() -> None:
    step = os.environ["FAULT_STEP"]
    when = os.environ.get("FAULT_WHEN", "before")
    nth = int(os.environ.get("FAULT_NTH", "1"))
    sig = signal.SIGKILL if os.environ.get("FAULT_ACTION", "kill") == "kill" else signal.SIGSTOP
    owner, name = STEPS[step]
    original = getattr(owner, name)
    calls = 0

    def fault() -> None:
        sys.stdout.write(f'{{"event": "fault injected", "step": "{step}", "when": "{when}"}}\n')
        sys.stdout.flush()
        os.kill(os.getpid(), sig)

    def patched(self: Any, *args: Any) -> Any:
        nonlocal calls
        # dead_letter is called with an empty list on every batch: count real calls only
        if step == "dead_letter" and not args[0]:
            return original(self, *args)
        calls += 1
        if calls == nth and when == "before":
            fault()
        result = original(self, *args)
        if calls == nth and when == "after":
            fault()
        return result

    setattr(owner, name, patched)


if __name__ == "__main__":
    inject()
    sys.exit(cli.main())
