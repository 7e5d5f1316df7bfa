"""checkov (a maintained IaC scanner, its own venv .venv-tools from deploy/checkov.lock, built by `make test`) passes on
both overlays as built and on deploy/Dockerfile, with every skip listed in deploy/README.md ("Scanner skips").

checkov cannot read pods out of the RayService CRD, so each Ray group is also handed to it as the pod KubeRay will
create: a Pod with the Ray container plus what KubeRay injects (its probes, the wait-gcs-ready init
container on workers, the autoscaler sidecar from ``autoscalerOptions`` on the head). Skips are scoped: an
annotation on the pods they concern (:data:`POD_SKIPS`) or a ``checkov:skip`` comment in the Dockerfile; the README
table must list exactly those, and each must still be needed. Without .venv-tools the tests skip locally and FAIL in
CI (env CI set).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess

import pytest
import yaml

from tests.fixtures.deploy import DEPLOY, OVERLAYS, ROOT, built_overlays, one, ray_groups

CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
# check -> (the scanned Ray pods it is skipped on, why); deploy/README.md lists the same with its reasons
POD_SKIPS = {
    "CKV_K8S_40": ("ray", "the rayproject/ray image's user is uid 1000 and owns its files"),
    "CKV_K8S_8": ("head", "KubeRay's autoscaler sidecar has no liveness probe and autoscalerOptions cannot add one"),
    "CKV_K8S_9": ("head", "KubeRay's autoscaler sidecar has no readiness probe and autoscalerOptions cannot add one"),
    "CKV_K8S_38": ("head", "the autoscaler sidecar calls the Kubernetes API with the service account KubeRay binds"),
}


def checkov() -> list[str]:
    if not CHECKOV.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHECKOV} is missing: `make test` builds it (make tools)")
        pytest.skip("checkov not installed: run `make tools`")
    return [str(CHECKOV), "--config-file", str(DEPLOY / "checkov.yaml")]


def kuberay_pods(rayservice: dict) -> list[dict]:
    """Each Ray group as the pod KubeRay creates from it (what checkov checks; CRDs are opaque to it)."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = []
    for group in ray_groups(rayservice):
        head = group is cluster["headGroupSpec"]
        spec = copy.deepcopy(group["template"]["spec"])
        ray = spec["containers"][0]
        # KubeRay's probes (Ray >= 2.53: the dashboard agent's /api/healthz; workers add the Serve proxy check)
        ray["livenessProbe"] = {"httpGet": {"path": "/api/healthz", "port": 52365}, "periodSeconds": 5}
        ray["readinessProbe"] = {"httpGet": {"path": "/api/healthz", "port": 52365}, "periodSeconds": 5}
        if head and cluster.get("enableInTreeAutoscaling"):
            options = cluster.get("autoscalerOptions", {})
            spec["containers"].append(
                {
                    "name": "autoscaler",
                    "image": options.get("image", ray["image"]),
                    "imagePullPolicy": "IfNotPresent",
                    "resources": options["resources"],
                    "securityContext": options.get("securityContext", {}),
                    "volumeMounts": options.get("volumeMounts", []),
                }
            )
        if not head:  # wait-gcs-ready: the Ray container's image and securityContext, fixed resources
            limits = {"cpu": "200m", "memory": "256Mi"}
            init = {"name": "wait-gcs-ready", "image": ray["image"], "securityContext": ray["securityContext"]}
            spec["initContainers"] = [{**init, "resources": {"requests": limits, "limits": limits}}]
        name = "head" if head else group["groupName"]
        annotations = {
            f"checkov.io/skip{i}": f"{check}={why}"
            for i, (check, (scope, why)) in enumerate(POD_SKIPS.items(), 1)
            if scope == "ray" or scope == name
        }
        metadata = {
            "name": f"{rayservice['metadata']['name']}-{name}",
            "namespace": rayservice["metadata"]["namespace"],
        }
        labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "head" if head else "worker"}
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {**metadata, "labels": labels, "annotations": annotations},
                "spec": spec,
            }
        )
    return out


def scan(folder, files: dict[str, list[dict] | str]) -> dict[str, dict]:
    """Run checkov on ``files`` (YAML documents or text) in ``folder``: {file: {passed, failed, skipped}} + details."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else yaml.safe_dump_all(content))
    out = subprocess.run([*checkov(), "-d", str(folder), "-o", "json"], capture_output=True, text=True)
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    result: dict[str, dict] = {name: {"passed": 0, "failed": [], "skipped": []} for name in files}
    for report in reports:
        if isinstance(report.get("results"), dict):
            for kind, items in report["results"].items():
                for item in items:
                    entry = result[item["file_path"].lstrip("/")]
                    if kind == "passed_checks":
                        entry["passed"] += 1
                    else:
                        entry[kind.split("_")[0]].append((item["check_id"], item["resource"]))
    return result


def readme_skips() -> set[tuple[str, str]]:
    """deploy/README.md "Scanner skips": | `CHECK` | where | why |."""
    section = (DEPLOY / "README.md").read_text().split("## Scanner skips", 1)[1].split("\n## ", 1)[0]
    rows = [r.strip().strip("|").split("|") for r in section.splitlines() if r.startswith("| `CKV")]
    return {(check.strip(" `"), where.strip()) for check, where, *_ in rows}


def dockerfile_skips() -> set[str]:
    return set(re.findall(r"checkov:skip=(CKV\w+):", (DEPLOY / "Dockerfile").read_text()))


def expected_skips() -> set[tuple[str, str]]:
    where = {"ray": "Ray pods", "head": "Ray head pod"}
    return {(c, where[scope]) for c, (scope, _) in POD_SKIPS.items()} | {(c, "Dockerfile") for c in dockerfile_skips()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    files: dict[str, list[dict] | str] = {"Dockerfile": (DEPLOY / "Dockerfile").read_text()}
    for overlay, docs in built_overlays().items():
        files[f"{overlay}.yaml"] = [*docs, *kuberay_pods(one(docs, "RayService"))]
    return scan(tmp_path_factory.mktemp("checkov"), files)


@pytest.mark.parametrize("name", [*(f"{o}.yaml" for o in OVERLAYS), "Dockerfile"])
def test_checkov_passes(results, name):
    got = results[name]
    print(f"checkov {name}: passed {got['passed']}, failed {len(got['failed'])}, skipped {len(got['skipped'])}")
    assert got["failed"] == []
    assert got["passed"] > (50 if name == "Dockerfile" else 300)


def test_every_skip_is_listed_and_needed(results):
    assert readme_skips() == expected_skips(), "deploy/README.md 'Scanner skips' != the skips in force"
    used = {check for r in results.values() for check, _ in r["skipped"]}
    assert used == {check for check, _ in expected_skips()}, "a listed skip no longer suppresses anything"
    for overlay in OVERLAYS:  # pod skips stay on the pods they name
        for check, resource in results[f"{overlay}.yaml"]["skipped"]:
            scope = POD_SKIPS[check][0]
            assert resource.startswith("Pod.") and (scope == "ray" or resource.endswith(f"-{scope}")), resource


def test_checkov_fails_on_a_broken_manifest(tmp_path):
    docs = copy.deepcopy(built_overlays()["gpu-prod"])
    redis = one(docs, "StatefulSet", "prefixserve-redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["privileged"] = True
    container["env"].append({"name": "P", "valueFrom": {"secretKeyRef": {"name": "prefixserve-secrets", "key": "k"}}})
    container["image"] = "redis:latest"
    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("USER 1000:100\n", "USER root\n")
    got = scan(tmp_path, {"broken.yaml": [redis], "Dockerfile": dockerfile})
    assert {check for check, _ in got["broken.yaml"]["failed"]} >= {"CKV_K8S_16", "CKV_K8S_35", "CKV_K8S_43"}
    assert "CKV_DOCKER_8" in {check for check, _ in got["Dockerfile"]["failed"]}  # last USER is root


def test_missing_scanner_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(f"{__name__}.CHECKOV", tmp_path / "nothing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="make test"):
        checkov()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        checkov()


def test_readme_table_check_negative(monkeypatch):
    monkeypatch.setitem(POD_SKIPS, "CKV_K8S_99", ("ray", "made up"))
    assert readme_skips() != expected_skips()
