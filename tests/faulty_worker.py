"""``stream-counter`` with a fault injected at one stage of the protocol (tests only).

FAULT_STAGE   the round trip that carries this stage (worker/batch.py): take_lanes | write |
              finish (batches back to back: a finish round also carries the next batch's
              take_lanes and a read)
FAULT_WHEN    before (it is sent) | after (its replies are read)
FAULT_NTH     on the n-th round trip carrying that stage (default 1)
FAULT_ACTION  kill (SIGKILL self) | stop (SIGSTOP self: the test resumes us with SIGCONT)
              | cut (FAULT_WHEN=before only: send the round trip up to its stage's first
              call, a finish round's XACK, then lose the connection: Redis runs
              what it read, and the process goes on, as after a network failure)

Only this process's own code is patched, at the one place every round trip goes through
(``worker.scripts.Pipe``); Redis is real and decides everything.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError

from worker import cli
from worker.scripts import Pipe, Round


def inject() -> None:
    stage = os.environ["FAULT_STAGE"]
    when = os.environ.get("FAULT_WHEN", "before")
    nth = int(os.environ.get("FAULT_NTH", "1"))
    action = os.environ.get("FAULT_ACTION", "kill")
    sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
    send, recv = Pipe.send, Pipe.recv
    seen = 0
    armed: deque[bool] = deque()  # per unanswered send: fault after its replies?

    def fault() -> None:
        sys.stdout.write(f'{{"event": "fault injected", "stage": "{stage}", "when": "{when}"}}\n')
        sys.stdout.flush()
        os.kill(os.getpid(), sig)

    def patched_send(self: Pipe, rounds: Sequence[Round]) -> None:
        nonlocal seen
        hit = False
        if any(r.stage == stage for r in rounds):
            seen += 1
            hit = seen == nth
        if hit and when == "before" and action == "cut":
            cut_after_first_call(self, rounds)
        if hit and when == "before":
            fault()
        send(self, rounds)
        armed.append(hit and when == "after")

    def patched_recv(self: Pipe) -> Any:
        hit = armed.popleft()
        replies = recv(self)
        if hit:
            fault()
        return replies

    def cut_after_first_call(self: Pipe, rounds: Sequence[Round]) -> None:
        at = next(i for i, r in enumerate(rounds) if r.stage == stage)
        part = [*rounds[:at], rounds[at]._replace(calls=rounds[at].calls[:1])]
        send(self, part)
        sys.stdout.write(f'{{"event": "fault injected", "stage": "{stage}", "when": "cut"}}\n')
        sys.stdout.flush()
        self._drop()  # the connection is lost: what the rounds acknowledged is kept
        raise ConnectionError("fault injected: connection lost after the first call")

    drop = Pipe._drop

    def patched_drop(self: Pipe) -> None:
        armed.clear()  # the pipe forgot its unanswered sends: so do we
        drop(self)

    Pipe.send = patched_send  # type: ignore[method-assign]
    Pipe.recv = patched_recv  # type: ignore[method-assign]
    Pipe._drop = patched_drop  # type: ignore[method-assign]


if __name__ == "__main__":
    inject()
    sys.exit(cli.main())
