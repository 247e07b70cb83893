"""The deployment files (Dockerfile, compose.yaml, deploy/kubernetes, docs/autoscaling.md)
parse, name only settings and commands that exist, and agree with the worker: probes on its
endpoints, a grace period longer than its own, a scaler on the metric it exports, an image
built from a locked dependency set. No Docker engine runs here: these tests read the files."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from config import ENV_PREFIX, Settings
from worker.cli import build_parser
from worker.metrics import Metrics

ROOT = Path(__file__).parent.parent
KUBE = ROOT / "deploy" / "kubernetes"


def load(name: str) -> dict[str, Any]:
    document = yaml.safe_load((KUBE / name).read_text())
    assert isinstance(document, dict)
    return document


DEPLOYMENT_FILES = [*sorted(KUBE.glob("*.yaml")), ROOT / "compose.yaml", ROOT / "Dockerfile"]


@pytest.mark.parametrize("path", DEPLOYMENT_FILES, ids=lambda p: p.name)
def test_every_setting_a_deployment_file_names_exists(path: Path) -> None:
    named = set(re.findall(rf"{ENV_PREFIX}([A-Z_]+)", path.read_text()))
    known = {field.upper() for field in Settings.model_fields}
    assert named <= known, named - known


def test_the_deployment_probes_the_worker_and_outlasts_its_grace() -> None:
    spec = load("deployment.yaml")["spec"]["template"]["spec"]
    (worker,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    port = int(env[ENV_PREFIX + "METRICS_PORT"])
    assert worker["ports"] == [{"name": "metrics", "containerPort": port}]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    grace_ms = int(env[ENV_PREFIX + "SHUTDOWN_GRACE_MS"])
    assert spec["terminationGracePeriodSeconds"] * 1000 > grace_ms
    Settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items() if v})


def test_the_scalers_read_the_lag_of_the_deployments_group() -> None:
    env = {
        e["name"]: e.get("value")
        for e in load("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    (trigger,) = load("keda-scaledobject.yaml")["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert (meta["stream"], meta["consumerGroup"]) == (
        env[ENV_PREFIX + "STREAM"],
        env[ENV_PREFIX + "GROUP"],
    )
    assert int(meta["lagCount"]) > 0
    (metric,) = load("hpa.yaml")["spec"]["metrics"]
    exported = {family.name for family in Metrics().registry.collect()}
    assert metric["external"]["metric"]["name"] in exported


def test_the_hpa_sees_one_lag_per_group_not_the_sum_over_replicas() -> None:
    """Every replica exports the same group lag: the adapter rule must take their max."""
    (metric,) = load("hpa.yaml")["spec"]["metrics"]
    (rule,) = load("prometheus-adapter.yaml")["rules"]["external"]
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    exported = {family.name for family in Metrics().registry.collect()}
    assert rule["seriesQuery"].split("{")[0] in exported
    query = rule["metricsQuery"].replace(" ", "")
    assert query.startswith("max(<<.Series>>{<<.LabelMatchers>>})"), query
    assert "sum" not in query


# -- the image -----------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined
    and comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, " ".join(rest.split())))
    return stages


def test_the_image_is_built_in_stages_and_runs_as_a_non_root_user_in_exec_form() -> None:
    build, final = dockerfile_stages()
    assert build[0] == ("FROM", "python:3.11-slim AS build")
    assert final[0][0] == "FROM"
    assert ("COPY", "--from=build /venv /venv") in final  # the environment, no build tools
    (user,) = [args for name, args in final if name == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    for name, args in final:
        if name in ("ENTRYPOINT", "CMD"):
            assert isinstance(json.loads(args), list), (name, args)  # exec form: PID 1
    (health,) = [args for name, args in final if name == "HEALTHCHECK"]
    assert health.endswith('CMD ["stream-counter", "check"]')
    entry = next(json.loads(a) for n, a in final if n == "ENTRYPOINT")
    command = next(json.loads(a) for n, a in final if n == "CMD")
    assert entry == ["stream-counter"]
    build_parser().parse_args(command)  # `run`, a command that exists


def test_the_image_installs_the_locked_dependencies_checked_against_their_hashes() -> None:
    (build, _final) = dockerfile_stages()
    runs = " ".join(args for name, args in build if name == "RUN")
    assert "pip install --require-hashes --no-deps -r requirements.lock" in runs
    assert "pip install --no-deps --no-build-isolation ." in runs  # the locked backend only
    for name, args in build:
        if name == "COPY":
            *sources, _target = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"requirements.lock", "pyproject.toml", "worker", "config"} & set(ignored)


def test_the_lock_pins_every_dependency_within_pyproject_and_hashes_each() -> None:
    text = (ROOT / "requirements.lock").read_text()
    pinned: dict[str, str] = {}
    hashed: set[str] = set()
    for line in text.splitlines():
        if found := re.match(r"([A-Za-z0-9._-]+)==(\S+)", line):
            name = canonicalize_name(found.group(1))
            pinned[name] = found.group(2)
        elif line.strip().startswith("--hash=sha256:"):
            hashed.add(name)
    assert pinned
    assert hashed == set(pinned)
    with (ROOT / "pyproject.toml").open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    with (ROOT / "pyproject.toml").open("rb") as f:
        backend = tomllib.load(f)["build-system"]["requires"]
    for dependency in map(Requirement, [*dependencies, *backend]):
        version = pinned[canonicalize_name(dependency.name)]
        assert dependency.specifier.contains(version), (dependency, version)


# -- compose -------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def test_compose_runs_redis_with_aof_three_replicas_and_a_producer() -> None:
    services = compose()["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert "--maxmemory-policy noeviction" in redis_command
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    worker, producer = services["worker"], services["producer"]
    assert worker["deploy"]["replicas"] == 3
    assert producer["profiles"] == ["load"]  # run on demand: `up` never pushes again
    for service in (worker, producer):
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}
        env = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in service["environment"].items()}
        assert Settings(**env).redis_url.get_secret_value() == "redis://redis:6379/0"
    env = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in worker["environment"].items()}
    grace_s = int(worker["stop_grace_period"].removesuffix("s"))
    assert grace_s * 1000 > Settings(**env).shutdown_grace_ms
    args = build_parser().parse_args(producer["command"])
    assert (args.command, args.events is not None) == ("produce", True)


def test_the_commands_to_scale_and_watch_compose_are_in_the_readme_and_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    header = (ROOT / "compose.yaml").read_text()
    for command in (
        "docker compose up -d --build",
        "docker compose up -d --scale worker=5",
        "docker compose run --rm producer",
        "docker compose run --rm worker status",
    ):
        assert command in readme, command
        assert command in header, command
    for used in re.findall(r"docker compose run --rm worker ([^`#\n]+)", readme + header):
        build_parser().parse_args(shlex.split(used))  # a command that exists, as written
