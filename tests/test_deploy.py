"""The deployment examples (deploy/kubernetes, docs/autoscaling.md) parse, name only settings
that exist, and agree with the worker: probes on its endpoints, a grace period longer
than its own, a scaler on the metric it exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import ENV_PREFIX, Settings
from worker.metrics import Metrics

ROOT = Path(__file__).parent.parent
KUBE = ROOT / "deploy" / "kubernetes"


def load(name: str) -> dict[str, Any]:
    document = yaml.safe_load((KUBE / name).read_text())
    assert isinstance(document, dict)
    return document


@pytest.mark.parametrize("path", sorted(KUBE.glob("*.yaml")), ids=lambda p: p.name)
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
