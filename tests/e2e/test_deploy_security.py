"""deploy/ is locked down (offline, on the built overlays): each property below has a negative test that mutates
the built manifests and shows the check fails.

  * probes          -- no probe of ours on the Ray containers (KubeRay injects its own); nothing probes the Serve
                       proxy or the app's /readyz on the head (KubeRay deploys Serve only once the head is Ready).
  * Ray auth        -- token auth on (authOptions.mode: token), no Ray port outside the Ray pods but what the
                       NetworkPolicies admit.
  * NetworkPolicy   -- the built policies admit exactly the table below, evaluated pod by pod and port by port.
  * Pod Security    -- namespaces enforce "restricted"; every container (autoscaler sidecar included) meets it and
                       has a read-only root.
  * secrets         -- mounted as files, never env values; only the keys each pod needs.
  * images          -- every image pinned by digest.
"""

from __future__ import annotations

import itertools

import pytest

from tests.fixtures.deploy import (
    DIGEST,
    OVERLAYS,
    RAY_LABELS,
    Peer,
    admits,
    one,
    pods,
    ray_groups,
    restricted_problems,
    serve_config,
)

APP_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080, "as-metrics": 44217}
APP_PORTS |= {"dash-metrics": 44227, "agent": 52365, "redis": 6379, "exporter": 9121}


# ------------------------------------------------------------------------------------------------- probes
def probe_problems(rayservice: dict) -> list[str]:
    """KubeRay's probes only: none of ours on a Ray container; nothing that ties pod readiness to Serve or the app."""
    problems = []
    for group in ray_groups(rayservice):
        ray = group["template"]["spec"]["containers"][0]
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            if kind in ray:
                problems.append(f"{group.get('groupName', 'head')}: {kind} replaces KubeRay's")
        text = str(
            [c.get(k) for c in group["template"]["spec"]["containers"] for k in ("readinessProbe", "startupProbe")]
        )
        if "/readyz" in text or "-/healthz" in text or "8000" in text:
            problems.append(f"{group.get('groupName', 'head')}: pod readiness depends on Serve or the app")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_use_kuberays_probes(built, overlay):
    assert probe_problems(one(built[overlay], "RayService")) == []


def test_probe_check_negative(built):
    rs = one(built["gpu-prod"], "RayService")
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["readinessProbe"] = {"exec": {"command": ["bash", "-c", "wget -q -O- http://localhost:8000/-/healthz"]}}
    assert probe_problems(rs) == [
        "head: readinessProbe replaces KubeRay's",
        "head: pod readiness depends on Serve or the app",
    ]


# ---------------------------------------------------------------------------------------------- Ray auth
def auth_problems(rayservice: dict) -> list[str]:
    """Ray token auth (KubeRay makes a token per RayCluster), and no Ray port published outside the pods."""
    cluster, problems = rayservice["spec"]["rayClusterConfig"], []
    if cluster.get("authOptions", {}).get("mode") != "token":
        problems.append("Ray token auth is off")
    head = cluster["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append("the head service is published outside the cluster")
    return problems


def test_ray_token_auth_on(built):
    for docs in built.values():
        rs = one(docs, "RayService")
        assert auth_problems(rs) == []
        rs["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "disabled"
        rs["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
        assert auth_problems(rs) == ["Ray token auth is off", "the head service is published outside the cluster"]


# ----------------------------------------------------------------------------------------- NetworkPolicy
def sample_pods(docs: list[dict], namespace: str) -> dict[str, Peer]:
    """The pods the overlay runs, plus the ones around it (KubeRay, Prometheus, ingress, strangers)."""
    sample = {p.name: Peer(namespace, p.labels) for p in pods(docs)}
    head = sample["head"].labels
    sample["redis-cleanup-job"] = Peer(namespace, {**head, "ray.io/node-type": "redis-cleanup"})
    sample["kuberay-operator"] = Peer("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
    sample["operator-lookalike"] = Peer("default", {"app.kubernetes.io/name": "kuberay-operator"})
    sample["prometheus"] = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
    sample["ingress-controller"] = Peer("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    sample["labelled-client"] = Peer(namespace, {"prefixserve.io/client": "true"})
    sample["same-namespace-pod"] = Peer(namespace, {"app": "debug"})
    sample["other-namespace-pod"] = Peer("default", {"prefixserve.io/client": "true", **RAY_LABELS})
    return sample


RAY_PODS = {"head", "workers", "gpu-workers", "ingress-workers", "redis-cleanup-job"}
SERVING_PORTS = {APP_PORTS["serve"]}
SCRAPED_PORTS = {APP_PORTS[p] for p in ("metrics", "as-metrics", "dash-metrics", "serve")}


def expected(target: str, source: str, port: int) -> bool:
    """The table in deploy/README.md ("Network policy"), as a function."""
    ray = target in RAY_PODS
    if ray and source in RAY_PODS:
        return True  # Ray pods of this RayService: every port
    if ray and port in SERVING_PORTS and source in {"ingress-controller", "labelled-client"}:
        return True
    if ray and port in SCRAPED_PORTS and source == "prometheus":
        return True
    if target == "head" and port in {APP_PORTS["dashboard"], APP_PORTS["serve"]} and source == "kuberay-operator":
        return True
    if target == "prefixserve-redis" and port == APP_PORTS["redis"]:
        return source in RAY_PODS
    if target == "prefixserve-gcs-redis" and port == APP_PORTS["redis"]:
        return source in {"head", "redis-cleanup-job"}
    if target in {"prefixserve-redis", "prefixserve-gcs-redis"} and port == APP_PORTS["exporter"]:
        return source == "prometheus"
    return False


def policy_matrix(docs: list[dict], namespace: str) -> dict[tuple[str, str, int], bool]:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    sample = sample_pods(docs, namespace)
    targets = [
        name
        for name in sample
        if sample[name].namespace == namespace and name in RAY_PODS | {"prefixserve-redis", "prefixserve-gcs-redis"}
    ]
    ports = sorted(set(APP_PORTS.values()) | {12345})  # + one of Ray's worker ports
    return {
        (t, s, port): admits(policies, sample[t], sample[s], port)
        for t, s, port in itertools.product(targets, sample, ports)
        if t != "redis-cleanup-job"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_exactly_the_table(built, overlay):
    matrix = policy_matrix(built[overlay], OVERLAYS[overlay])
    wrong = {key: got for key, got in matrix.items() if got != expected(*key)}
    assert wrong == {}, "admitted (True) or refused (False) against deploy/README.md's table"
    assert sum(matrix.values()) > 50 and not all(matrix.values())


def test_network_policy_check_negative(built):
    docs = built["gpu-prod"]
    one(docs, "NetworkPolicy", "prefixserve-redis")["spec"]["ingress"].append({})  # "allow from anywhere"
    one(docs, "NetworkPolicy", "prefixserve-ray-head-from-operator")["spec"]["ingress"][0]["from"][0].pop(
        "namespaceSelector"
    )  # the operator label alone, in our own namespace
    wrong = {k for k, got in policy_matrix(docs, "prefixserve").items() if got != expected(*k)}
    assert ("prefixserve-redis", "same-namespace-pod", 6379) in wrong
    assert ("head", "kuberay-operator", 8265) in wrong  # the real operator is now refused
    docs = built["cpu-dev"]
    docs.remove(one(docs, "NetworkPolicy", "prefixserve-default-deny"))
    one(docs, "NetworkPolicy", "prefixserve-gcs-redis")["spec"]["podSelector"] = {"matchLabels": {"nothing": "x"}}
    wrong = {k for k, got in policy_matrix(docs, "prefixserve-dev").items() if got != expected(*k)}
    assert ("prefixserve-gcs-redis", "other-namespace-pod", 6379) in wrong


# ------------------------------------------------------------------------------------------ Pod Security
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security_restricted(built, overlay):
    ns = one(built[overlay], "Namespace")["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"
    all_pods = pods(built[overlay])
    assert {c["name"] for p in all_pods for c in p.containers} >= {"ray-head", "ray-worker", "autoscaler", "redis"}
    assert [problem for p in all_pods for problem in restricted_problems(p)] == []


def test_pod_security_check_negative(built):
    docs = built["gpu-prod"]
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    cluster["autoscalerOptions"]["securityContext"].pop("capabilities")
    cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"][
        "allowPrivilegeEscalation"
    ] = True
    cluster["headGroupSpec"]["template"]["spec"]["securityContext"].pop("seccompProfile")
    redis = one(docs, "StatefulSet", "prefixserve-redis")["spec"]["template"]["spec"]
    redis["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    problems = [problem for p in pods(docs) for problem in restricted_problems(p)]
    assert "head/autoscaler: capabilities do not drop ALL" in problems
    assert "gpu-workers/ray-worker: allowPrivilegeEscalation is not false" in problems
    assert "head/ray-head: seccompProfile None" not in problems  # the container sets its own...
    assert "prefixserve-redis: volume host is ['hostPath']" in problems
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContext"].pop("seccompProfile")
    assert "head/ray-head: seccompProfile None" in [x for p in pods(docs) for x in restricted_problems(p)]  # ...now not


# ------------------------------------------------------------------------------------------------ secrets
def secret_problems(docs: list[dict]) -> list[str]:
    """Secrets reach pods as files: no env value from a Secret; *_FILE envs and admin_key_file name mounted files."""
    problems = []
    for pod in pods(docs):
        env = [e for c in pod.containers for e in c.get("env", [])]
        problems += [f"env {e['name']} from a Secret" for e in env if "secretKeyRef" in e.get("valueFrom", {})]
        problems += [f"envFrom {e}" for c in pod.containers for e in c.get("envFrom", []) if "secretRef" in e]
        mounts = {m["mountPath"] for c in pod.containers for m in c.get("volumeMounts", []) if m.get("readOnly")}
        files = [e["value"] for c in pod.containers for e in c.get("env", []) if e["name"].endswith("_FILE")]
        for path in files:
            if not any(path.startswith(m.rstrip("/") + "/") for m in mounts) and not path.startswith("/run/redis/"):
                problems.append(f"{pod.name}: {path} is not on a read-only mount")
    for rs in (d for d in docs if d["kind"] == "RayService"):
        args = serve_config(rs)["applications"][0]["args"]
        if not str(args.get("admin_key_file", "")).startswith("/var/run/secrets/"):
            problems.append("admin_key_file is not the mounted Secret")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_mounted_files(built, overlay):
    assert secret_problems(built[overlay]) == []
    ray = [p for p in pods(built[overlay]) if p.labels.get("app.kubernetes.io/component") == "ray"]
    env = {e["name"] for p in ray for c in p.containers for e in c.get("env", [])}
    assert {"PREFIXSERVE_REDIS_PASSWORD_FILE", "PREFIXSERVE_METRICS_TOKEN_FILE", "PREFIXSERVE_KEY_PEPPER_FILE"} <= env
    # each Redis mounts only its own password; the GCS one never reaches a Ray container's files
    for name, key in (("prefixserve-redis", "redis-password"), ("prefixserve-gcs-redis", "gcs-redis-password")):
        volumes = one(built[overlay], "StatefulSet", name)["spec"]["template"]["spec"]["volumes"]
        assert [
            i["key"] for v in volumes if "secret" in v and v["name"] == "secrets" for i in v["secret"]["items"]
        ] == [key]
    assert "gcs-redis-password" not in str([v for p in ray for v in p.spec["volumes"]])


def test_secret_check_negative(built):
    docs = built["cpu-dev"]
    worker = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["env"].append(
        {
            "name": "PREFIXSERVE_ADMIN_KEY",
            "valueFrom": {"secretKeyRef": {"name": "prefixserve-secrets", "key": "admin-key"}},
        }
    )
    worker["containers"][0]["env"].append({"name": "X_FILE", "value": "/etc/x"})
    assert secret_problems(docs) == [
        "env PREFIXSERVE_ADMIN_KEY from a Secret",
        "workers: /etc/x is not on a read-only mount",
    ]


# ------------------------------------------------------------------------------------------------- images
def unpinned_images(docs: list[dict]) -> list[str]:
    images = [c["image"] for p in pods(docs) for c in p.containers if "image" in c]
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    images.append(cluster.get("autoscalerOptions", {}).get("image", images[0]))  # default: the Ray image
    return [image for image in images if not DIGEST.search(image)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_pinned_by_digest(built, overlay):
    assert unpinned_images(built[overlay]) == []
    assert len({c["image"] for p in pods(built[overlay]) for c in p.containers if "image" in c}) == 3


def test_image_check_negative(built):
    docs = built["gpu-prod"]
    one(docs, "StatefulSet", "prefixserve-redis")["spec"]["template"]["spec"]["containers"][0]["image"] = "redis:7.4"
    one(docs, "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]["image"] = "rayproject/ray:2.60.0"
    assert unpinned_images(docs) == ["redis:7.4", "rayproject/ray:2.60.0"]
