"""``stream-counter`` as a replica of another version would run it (tests only): the same
code, saying it speaks protocol ``WORKER_PROTOCOL`` (worker/replicas.py)."""

from __future__ import annotations

import os
import sys

from worker import cli, replicas

if __name__ == "__main__":
    replicas.PROTOCOL = int(os.environ["WORKER_PROTOCOL"])
    sys.exit(cli.main())
