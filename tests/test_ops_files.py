"""The deployment files agree with the code: Dockerfile (hadolint), Kubernetes manifests
(kubernetes-validate; KEDA's ScaledObject against ops/k8s/keda-scaledobject.schema.json), lock files,
the Grafana dashboard. Offline: nothing here needs Docker, a cluster or the network."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ops.grafana import dashboard
from ops.grafana.plot import _quantile, parse_query
from worker import pool
from worker.config import Settings
from worker.metrics import METRICS

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "ops" / "k8s"
yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (dev extra)")


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(path).exists():
        pytest.skip(f"{name} is not installed (dev extra: pip install -e '.[dev]')")
    return path


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), str(ROOT / "ops" / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_worker_is_the_default_target_and_runs_as_non_root() -> None:
    text = (ROOT / "ops" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)", text, re.M)
    assert stages[-1] == "worker" and "emulator" in stages  # compose builds the last stage
    for stage in ("worker", "emulator"):
        body = text.split(f"AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER 10001", body, re.M), f"stage {stage} runs as root"
    assert "--require-hashes" in text


def test_lock_files_pin_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[\s<>=!;\[~]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    for lock, reqs in (
        ("worker.lock", project["dependencies"]),
        ("emulator.lock", project["dependencies"] + project["optional-dependencies"]["speech"]),
    ):
        text = (ROOT / "ops" / "requirements" / lock).read_text()
        pinned = {m.lower() for m in re.findall(r"^([A-Za-z0-9_.-]+)==", text, re.M)}
        assert names(reqs) <= pinned, f"{lock} misses {names(reqs) - pinned}: run make lock"
        assert text.count("==") <= text.count("--hash=sha256:"), f"{lock} has pins without hashes"
    worker_lock = (ROOT / "ops" / "requirements" / "worker.lock").read_text()
    assert "pocketsphinx" not in worker_lock  # the worker image stays small


def test_manifests_pass_kubernetes_validate_strict() -> None:
    files = [str(K8S / name) for name in ("redis.yaml", "worker.yaml")]
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """The CI step above would notice a typo: the validator really checks fields."""
    broken = (
        (K8S / "worker.yaml").read_text().replace("terminationGracePeriodSeconds", "terminationGraceSeconds")
    )
    (tmp_path / "broken.yaml").write_text(broken)
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(tmp_path / "broken.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0


def test_keda_scaled_object_matches_its_schema_and_targets_the_worker() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="comes with kubernetes-validate (dev extra)")
    schema = json.loads((K8S / "keda-scaledobject.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    (scaled,) = docs("keda-scaledobject.yaml")
    validator.validate(scaled)
    typo = json.loads(json.dumps(scaled))
    typo["spec"]["triggers"][0]["metadata"]["pendingEntriesCont"] = "1"
    assert not validator.is_valid(typo)
    deployment = next(d for d in docs("worker.yaml") if d["kind"] == "Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    config = next(d for d in docs("worker.yaml") if d["kind"] == "ConfigMap")["data"]
    target = int(scaled["spec"]["triggers"][0]["metadata"]["pendingEntriesCount"])
    assert target < int(config["VOXQUEUE_CONCURRENCY"])  # room for a drained worker's sessions
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["metadata"]["stream"] == "vq:{p0}:sessions"


def test_termination_grace_exceeds_the_longest_drain() -> None:
    """SIGKILL must never cut a drain short: the grace period covers every bound the drain and
    teardown wait on (worker/pool.py)."""
    worker = docs("worker.yaml")
    config = next(d for d in worker if d["kind"] == "ConfigMap")["data"]
    spec = next(d for d in worker if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    drain = float(config.get("VOXQUEUE_DRAIN_SECONDS", Settings.model_fields["drain_seconds"].default))
    longest = (
        drain
        + pool.SESSION_STOP_SECONDS
        + pool.RELEASE_SECONDS
        + pool.TEARDOWN_SECONDS
        + pool.SESSION_STOP_SECONDS
        + pool.CLIENT_CLOSE_SECONDS
    )
    assert spec["terminationGracePeriodSeconds"] > longest
    probes = spec["containers"][0]
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert config["VOXQUEUE_METRICS_PORT"] == str(probes["ports"][0]["containerPort"])


def test_redis_statefulset_has_aof_and_noeviction() -> None:
    conf = next(d for d in docs("redis.yaml") if d["kind"] == "ConfigMap")["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line.strip())
    assert settings["appendonly"] == "yes" and settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"


def test_dashboard_json_is_current_and_queries_exported_metrics() -> None:
    assert (ROOT / "ops" / "grafana" / "voxqueue.json").read_text() == dashboard.render(), (
        "ops/grafana/voxqueue.json is stale: python -m ops.grafana.dashboard"
    )
    families = {family.name for family in METRICS.registry.collect()}  # counters without _total
    for panel in dashboard.PANELS:
        for _, expr in panel.targets:
            _, metric, _, _ = parse_query(expr)
            assert metric.removesuffix("_total") in families, f"{panel.title}: {metric} is not exported"


def test_plot_quantile_interpolates_like_prometheus() -> None:
    # 10 observations: 4 in (0, 0.1], 6 in (0.1, 1]: the median lies 1/6 into the second bucket.
    buckets = {0.1: 4.0, 1.0: 10.0, float("inf"): 10.0}
    assert _quantile(0.5, buckets) == pytest.approx(0.1 + 0.9 * (1 / 6))
    assert _quantile(0.2, buckets) == pytest.approx(0.05)
