"""deploy/ keeps serving (offline, on the built overlays): each property has a negative test.

* GCS FT          -- on, on its own Redis (not the adapter store: another Service, PVC and password).
* disruptions     -- PodDisruptionBudgets for the head, both Redis and every worker group kept at >= 2 pods;
                     topology spread for the Ray pods and Redis; Ingress replicas one per node.
* drain           -- worker preStop tells Ray to drain, then outlasts Serve's proxy drain; the grace period
                     covers it plus the replicas' graceful shutdown (Ray's own constants, read here).
* weights         -- the backbone comes from the image (no volume over /models, hub offline) and is pinned by
                     fingerprint.
* capacity        -- Serve's replica bounds fit the worker groups; GPU pods fit the nodes deploy/README.md
                     recommends, on the GPU types it names.
* Redis, metrics  -- AOF + noeviction + password; every metrics target is a pod, with KubeRay's labels.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.fixtures.deploy import DEPLOY, OVERLAYS, deployments, one, pods, ray_groups, selects, serve_config


# ------------------------------------------------------------------------------------------------- GCS FT
def gcs_ft_problems(docs: list[dict]) -> list[str]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    ft = cluster.get("gcsFaultToleranceOptions")
    if not ft:
        return ["GCS fault tolerance is off"]
    problems = []
    host = ft["redisAddress"].split("://")[-1].rsplit(":", 1)[0]
    store_url = serve_config(one(docs, "RayService"))["applications"][0]["args"]["store"]
    store_host = store_url.split("://")[1].split("/")[0].rsplit(":", 1)[0]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    statefulsets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    if host == store_host:
        problems.append("GCS FT uses the adapter store's Redis")
    if host not in services or host not in statefulsets:
        problems.append(f"no Redis Service/StatefulSet named {host}")
    elif not statefulsets[host]["spec"].get("volumeClaimTemplates"):
        problems.append("the GCS Redis has no persistent volume")
    key = ft.get("redisPassword", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("key")
    if key is None or key == "redis-password":
        problems.append("the GCS Redis has no password of its own")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gcs_fault_tolerance_on_its_own_redis(built, overlay):
    assert gcs_ft_problems(built[overlay]) == []


def test_gcs_ft_check_negative(built):
    docs = built["gpu-prod"]
    ft = one(docs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    ft["redisAddress"] = "prefixserve-redis:6379"
    ft["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] = "redis-password"
    assert gcs_ft_problems(docs) == [
        "GCS FT uses the adapter store's Redis",
        "the GCS Redis has no password of its own",
    ]
    one(docs, "RayService")["spec"]["rayClusterConfig"].pop("gcsFaultToleranceOptions")
    assert gcs_ft_problems(docs) == ["GCS fault tolerance is off"]


# -------------------------------------------------------------------------------------------- disruptions
def disruption_problems(docs: list[dict]) -> list[str]:
    """Every singleton and every group kept at >= 2 pods has a PDB that leaves it a pod; Ray pods and Redis spread."""
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    problems = []
    for pod in pods(docs):
        chosen = [p for p in pdbs if selects(p["spec"]["selector"], pod.labels)]
        group = next((g for g in ray_groups(one(docs, "RayService")) if g.get("groupName") == pod.name), None)
        kept = group["minReplicas"] if group else 1
        if group is not None and kept < 2:
            continue  # an optional worker group (cpu-dev): nothing to keep
        if len(chosen) != 1:
            problems.append(f"{pod.name}: {len(chosen)} PodDisruptionBudgets")
            continue
        spec = chosen[0]["spec"]
        if "maxUnavailable" in spec or not isinstance(spec.get("minAvailable"), int):
            problems.append(f"{pod.name}: Ray/Redis pods need an integer minAvailable")
        elif not 1 <= spec["minAvailable"] <= max(kept - 1, 1):
            problems.append(f"{pod.name}: minAvailable {spec['minAvailable']} for {kept} pods")
        spread = {c["topologyKey"] for c in pod.spec.get("topologySpreadConstraints", [])}
        if pod.name != "head" and "kubernetes.io/hostname" not in spread:
            problems.append(f"{pod.name}: not spread over nodes")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_and_spread(built, overlay):
    assert disruption_problems(built[overlay]) == []


def test_disruption_check_negative(built):
    docs = built["gpu-prod"]
    docs.remove(one(docs, "PodDisruptionBudget", "prefixserve-gcs-redis"))
    one(docs, "PodDisruptionBudget", "prefixserve-gpu-workers")["spec"]["minAvailable"] = 2  # of 2: drains hang
    one(docs, "PodDisruptionBudget", "prefixserve-ray-head")["spec"] = {
        "maxUnavailable": 0,  # not computable for pods of a RayCluster (no scale subresource)
        "selector": {"matchLabels": {"ray.io/node-type": "head"}},
    }
    sts = one(docs, "StatefulSet", "prefixserve-redis")["spec"]["template"]["spec"]
    sts.pop("topologySpreadConstraints")
    assert disruption_problems(docs) == [
        "prefixserve-gcs-redis: 0 PodDisruptionBudgets",
        "prefixserve-redis: not spread over nodes",
        "head: Ray/Redis pods need an integer minAvailable",
        "gpu-workers: minAvailable 2 for 2 pods",
    ]


def ingress_spread_problems(docs: list[dict]) -> list[str]:
    """Ingress replicas on distinct nodes: Serve puts one per Ray node, Ray nodes of its group on distinct hosts."""
    rs = one(docs, "RayService")
    ingress = deployments(rs)["Ingress"]
    problems = []
    if ingress.get("max_replicas_per_node") != 1:
        problems.append("Ingress replicas may share a node")
    custom = set(ingress.get("ray_actor_options", {}).get("resources", {}))
    hosts = [g for g in ray_groups(rs) if custom and custom <= set(g.get("resources", {}))]
    for group in hosts:
        hard = [
            c
            for c in group["template"]["spec"].get("topologySpreadConstraints", [])
            if c["topologyKey"] == "kubernetes.io/hostname" and c["whenUnsatisfiable"] == "DoNotSchedule"
        ]
        if not hard:
            problems.append(f"{group['groupName']}: Ingress pods may share a Kubernetes node")
        if group["minReplicas"] < ingress["num_replicas"]:
            problems.append(f"{group['groupName']}: fewer pods than Ingress replicas")
    if custom and not hosts:
        problems.append(f"no worker group offers {sorted(custom)}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_replicas_spread_over_nodes(built, overlay):
    assert ingress_spread_problems(built[overlay]) == []
    if overlay == "gpu-prod":
        assert deployments(one(built[overlay], "RayService"))["Ingress"]["num_replicas"] >= 2


def test_ingress_spread_check_negative(built):
    rs = one(built["gpu-prod"], "RayService")
    cfg = serve_config(rs)
    cfg["applications"][0]["deployments"][0].pop("max_replicas_per_node")
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    group = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    group["template"]["spec"]["topologySpreadConstraints"][0]["whenUnsatisfiable"] = "ScheduleAnyway"
    group["minReplicas"] = 1
    assert ingress_spread_problems(built["gpu-prod"]) == [
        "Ingress replicas may share a node",
        "ingress-workers: Ingress pods may share a Kubernetes node",
        "ingress-workers: fewer pods than Ingress replicas",
    ]


# --------------------------------------------------------------------------------------------------- drain
def drain_problems(rayservice: dict) -> list[str]:
    """preStop: `ray drain-node` (Serve moves replicas off, the proxy fails /-/healthz), then wait out the proxy's
    drain period; terminationGracePeriodSeconds covers that plus the replicas' graceful shutdown."""
    from ray.serve._private.constants import DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S, PROXY_MIN_DRAINING_PERIOD_S

    readiness_lag = 5  # KubeRay's worker readiness: period 5 s, failureThreshold 1 on the proxy check
    shutdown = max(
        d.get("graceful_shutdown_timeout_s", DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S)
        for d in deployments(rayservice).values()
    )
    problems = []
    for group in rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        spec = group["template"]["spec"]
        command = " ".join(
            spec["containers"][0].get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        )
        sleep = re.search(r"\bsleep (\d+)", command)
        deadline = re.search(r"--deadline-remaining-seconds (\d+)", command)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        name = group["groupName"]
        if "ray drain-node" not in command or not sleep or not deadline:
            problems.append(f"{name}: preStop does not drain the Ray node and wait")
            continue
        if int(sleep.group(1)) < PROXY_MIN_DRAINING_PERIOD_S + readiness_lag:
            problems.append(f"{name}: preStop ends before Serve's proxy drain ({PROXY_MIN_DRAINING_PERIOD_S} s)")
        if grace < int(sleep.group(1)) + shutdown + 10:
            problems.append(f"{name}: grace {grace} s < preStop + graceful shutdown ({shutdown} s)")
        if not int(sleep.group(1)) <= int(deadline.group(1)) <= grace:
            problems.append(f"{name}: drain deadline outside [preStop, grace]")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_timings_match_serve(built, overlay):
    assert drain_problems(one(built[overlay], "RayService")) == []


def test_drain_check_negative(built):
    rs = one(built["gpu-prod"], "RayService")
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    groups[0]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    groups[1]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] = ["sh", "-c", "ray stop"]
    assert drain_problems(rs) == [
        "gpu-workers: grace 30 s < preStop + graceful shutdown (30 s)",
        "gpu-workers: drain deadline outside [preStop, grace]",
        "ingress-workers: preStop does not drain the Ray node and wait",
    ]
    command = groups[1]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]
    command["command"] = ["sh", "-c", "ray drain-node --deadline-remaining-seconds 60; sleep 10"]
    assert "ingress-workers: preStop ends before Serve's proxy drain (30.0 s)" in drain_problems(rs)


# ------------------------------------------------------------------------------------------------- weights
def weight_problems(rayservice: dict) -> list[str]:
    args = serve_config(rayservice)["applications"][0]["args"]
    problems = []
    if not args["backbone"].startswith("/models/"):
        problems.append(f"backbone {args['backbone']!r} is not the copy baked into the image")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", str(args.get("backbone_fingerprint"))):
        problems.append("backbone_fingerprint is not pinned")
    for group in ray_groups(rayservice):
        container = group["template"]["spec"]["containers"][0]
        if any("/models".startswith(m["mountPath"].rstrip("/") or "/") for m in container.get("volumeMounts", [])):
            problems.append(f"{group.get('groupName', 'head')}: a volume hides the baked weights")
        if {"name": "HF_HUB_OFFLINE", "value": "1"} not in container.get("env", []):
            problems.append(f"{group.get('groupName', 'head')}: may download from the hub")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_backbone_baked_and_pinned(built, overlay):
    assert weight_problems(one(built[overlay], "RayService")) == []


def test_weights_check_negative(built):
    rs = one(built["cpu-dev"], "RayService")
    cfg = serve_config(rs)
    cfg["applications"][0]["args"]["backbone"] = "klue/roberta-base"
    cfg["applications"][0]["args"].pop("backbone_fingerprint")
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["volumeMounts"].append({"name": "tmp", "mountPath": "/models"})
    assert weight_problems(rs) == [
        "backbone 'klue/roberta-base' is not the copy baked into the image",
        "backbone_fingerprint is not pinned",
        "head: a volume hides the baked weights",
    ]


# ------------------------------------------------------------------------------------------------ capacity
def readme_gpu_nodes() -> list[dict]:
    """deploy/README.md "GPU nodes": | node | GPU | product label | allocatable CPU | allocatable memory |."""
    text = (DEPLOY / "README.md").read_text()
    section = text.split("## GPU nodes", 1)[1].split("\n## ", 1)[0]
    rows = [r.strip().strip("|").split("|") for r in section.splitlines() if r.startswith("| `")]
    return [
        {"node": n.strip(" `"), "product": p.strip(" `"), "cpu": float(c), "memory_gi": float(m.split()[0])}
        for n, _gpu, p, c, m in rows
    ]


def quantity(value: str) -> float:
    """CPU cores or GiB from a Kubernetes quantity (the forms deploy/ uses)."""
    value = str(value)
    for suffix, scale in (("m", 1e-3), ("Gi", 1.0), ("Mi", 1 / 1024)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def capacity_problems(rayservice: dict, nodes: list[dict]) -> list[str]:
    """Serve's replicas fit the worker groups; GPU pods fit every node type README recommends, and only go there."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    worker = deployments(rayservice)["Worker"]
    problems = []
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append("enableInTreeAutoscaling is off: Serve replicas would not get new pods")
    gpus_per_replica = worker["ray_actor_options"].get("num_gpus", 0)
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    if gpus_per_replica:
        gpus_max = sum(
            int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["maxReplicas"]
            for g in gpu_groups
        )
        gpus_min = sum(
            int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["minReplicas"]
            for g in gpu_groups
        )
        autoscaling = worker["autoscaling_config"]
        if gpus_max < autoscaling["max_replicas"] * gpus_per_replica:
            problems.append(
                f"Worker can want {autoscaling['max_replicas']} GPUs, worker groups give at most {gpus_max}"
            )
        if gpus_min < autoscaling["min_replicas"] * gpus_per_replica:
            problems.append("fewer GPU pods kept than Worker min_replicas")
    for group in gpu_groups:
        spec, name = group["template"]["spec"], group["groupName"]
        requests = spec["containers"][0]["resources"]["requests"]
        for node in nodes:
            if quantity(requests["cpu"]) > node["cpu"] or quantity(requests["memory"]) > node["memory_gi"]:
                problems.append(f"{name}: {requests['cpu']} CPU / {requests['memory']} does not fit {node['node']}")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
            problems.append(f"{name}: GPU pods without a nvidia.com/gpu toleration")
        terms = (
            spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
        )
        products = {
            v
            for t in terms.get("nodeSelectorTerms", [])
            for e in t["matchExpressions"]
            if e["key"] == "nvidia.com/gpu.product"
            for v in e["values"]
        }
        if products != {n["product"] for n in nodes}:
            problems.append(
                f"{name}: GPU types {sorted(products)} are not README's {sorted(n['product'] for n in nodes)}"
            )
    for group in cluster["workerGroupSpecs"]:
        if not group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]:
            problems.append(f"{group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    return problems


def test_gpu_prod_capacity(built):
    rs = one(built["gpu-prod"], "RayService")
    nodes = readme_gpu_nodes()
    assert len(nodes) >= 2
    assert capacity_problems(rs, nodes) == []
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert deployments(rs)["Worker"]["ray_actor_options"]["num_gpus"] == 1


def test_capacity_check_negative(built):
    rs = one(built["gpu-prod"], "RayService")
    nodes = readme_gpu_nodes()
    gpu = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpu["maxReplicas"] = 2
    gpu["template"]["spec"].pop("tolerations")
    gpu["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] = "32Gi"
    gpu["template"]["spec"].pop("affinity")
    problems = capacity_problems(rs, nodes)
    assert "Worker can want 8 GPUs, worker groups give at most 2" in problems
    assert "gpu-workers: GPU pods without a nvidia.com/gpu toleration" in problems
    assert sum("32Gi does not fit" in p for p in problems) == len(nodes)
    assert any("GPU types [] are not README's" in p for p in problems)


# -------------------------------------------------------------------------------------------- Redis, metrics
def test_redis_is_durable_and_authenticated(built):
    for docs in built.values():
        configs = [d for d in docs if d["kind"] == "ConfigMap" and "redis.conf" in d["data"]]
        assert len(configs) == 2
        for cm in configs:
            conf = set(cm["data"]["redis.conf"].splitlines())
            assert {"appendonly yes", "maxmemory-policy noeviction", "include /run/redis/runtime.conf"} <= conf
        script = next(d for d in docs if d["kind"] == "ConfigMap" and "redis-start.sh" in d["data"])
        assert (
            "requirepass" in script["data"]["redis-start.sh"]
            and "REDIS_PASSWORD_FILE" in script["data"]["redis-start.sh"]
        )
        for sts in (d for d in docs if d["kind"] == "StatefulSet"):
            assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
            service = one(docs, "Service", sts["metadata"]["name"])
            assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]


def metrics_problems(docs: list[dict]) -> list[str]:
    """Every PodMonitor scrapes pods (never a Service), carries KubeRay's `release` label and `ray_io_cluster`
    relabeling for Ray pods, and some monitor covers each pod that exports metrics."""
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    problems = []
    for pm in monitors:
        if pm["metadata"]["labels"].get("release") != "prometheus":
            problems.append(f"{pm['metadata']['name']}: no `release: prometheus` label")
        ray = pm["spec"]["selector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "prefixserve"
        for endpoint in pm["spec"]["podMetricsEndpoints"]:
            labels = {r.get("targetLabel") for r in endpoint.get("relabelings", [])}
            if ray and "ray_io_cluster" not in labels:
                problems.append(f"{pm['metadata']['name']}/{endpoint['port']}: no ray_io_cluster label")
    for pod in pods(docs):
        ports = {p["name"] for c in pod.containers for p in c.get("ports", []) if "metrics" in p["name"]}
        scraped = {
            e["port"]
            for pm in monitors
            if selects(pm["spec"]["selector"], pod.labels)
            for e in pm["spec"]["podMetricsEndpoints"]
        }
        if ports - scraped:
            problems.append(f"{pod.name}: {sorted(ports - scraped)} not scraped")
        if pod.labels.get("prefixserve.io/ingress") == "true" and "serve" not in scraped:
            problems.append(f"{pod.name}: runs an Ingress replica whose /metrics nobody scrapes")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_scraped_per_pod(built, overlay):
    assert metrics_problems(built[overlay]) == []
    ingress_pods = [p.name for p in pods(built[overlay]) if p.labels.get("prefixserve.io/ingress") == "true"]
    assert ingress_pods == (["head"] if overlay == "cpu-dev" else ["ingress-workers"])


def test_metrics_check_negative(built):
    docs = built["gpu-prod"]
    docs.remove(one(docs, "PodMonitor", "prefixserve-redis"))
    one(docs, "PodMonitor", "prefixserve-ray-workers")["spec"]["podMetricsEndpoints"][0].pop("relabelings")
    one(docs, "PodMonitor", "prefixserve-app")["metadata"]["labels"].pop("release")
    assert metrics_problems(docs) == [
        "prefixserve-app: no `release: prometheus` label",
        "prefixserve-ray-workers/metrics: no ray_io_cluster label",
        "prefixserve-gcs-redis: ['redis-metrics'] not scraped",
        "prefixserve-redis: ['redis-metrics'] not scraped",
    ]
