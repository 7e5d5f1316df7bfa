"""Offline validation of deploy/ (no cluster, no Docker): builds and schemas. Every check here must FAIL on a
broken document, and each has a negative test below.

  * YAML          -- every file under deploy/ parses with yaml.safe_load_all.
  * kustomize     -- the REAL kustomize inside `kubectl kustomize` builds both overlays; gpu-prod refuses to
                     build without its git-ignored inputs (secrets.env, the Redis TLS files).
  * Kubernetes    -- built-in kinds (and the RayService's pod templates / serveService) against the
                     Kubernetes OpenAPI schemas shipped by `kubernetes-validate`, strict (unknown fields fail).
  * KubeRay       -- the RayService against KubeRay's own CRDs (deploy/schemas/, v1.7.0 and v1.6.0, their
                     provenance re-checked), closed like the API server's strict field validation.
  * Prometheus    -- PodMonitors against deploy/schemas/podmonitor.schema.yaml.
  * Ray Serve     -- serveConfigV2 with ray.serve.schema.ServeDeploySchema, unknown keys rejected by walking
                     Ray's own pydantic models (Ray ignores extras), autoscaling_config with AutoscalingConfig,
                     and the import path really imports and builds the app.
  * Dockerfile    -- static checks (no Docker engine here); deploy/image_check.py and deploy/bake_backbone.py,
                     which the image build runs, run here too.
Security, availability and the IaC scanner: test_deploy_security.py, test_deploy_availability.py,
test_deploy_checkov.py.
"""

from __future__ import annotations

import base64
import copy
import gzip
import re
import shutil
import subprocess
import sys
import typing

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.fixtures.deploy import (
    DEPLOY,
    OVERLAYS,
    ROOT,
    SCHEMAS,
    copy_deploy,
    crd_bytes,
    crd_sources,
    deployments,
    git_blob_id,
    k8s_validate,
    kustomize_build,
    one,
    serve_config,
    validate_any,
    validate_podmonitor,
    validate_rayservice,
    walk,
)

PLACEHOLDER_SECRETS = {"INSECURE-DEV-ADMIN-KEY-CHANGE-ME", "INSECUREDEVREDISPASSWORDCHANGEME"}


# ------------------------------------------------------------------------------------- Ray Serve helpers
def _pydantic_model_in(annotation):
    """The pydantic model class inside Optional[...] / Union[...] / List[...], if any."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _pydantic_model_in(arg)
        if found is not None:
            return found
    return None


def unknown_serve_keys(model, data: dict, path: str = "") -> list[str]:
    """Keys that Ray's pydantic models do not declare (Ray silently IGNORES them, so a typo is lost)."""
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    bad = []
    for key, value in data.items():
        if key not in known:
            bad.append(path + key)
            continue
        sub = _pydantic_model_in(fields[key].annotation)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if sub is not None and isinstance(item, dict):
                where = f"{path}{key}[{i}]." if isinstance(value, list) else f"{path}{key}."
                bad += unknown_serve_keys(sub, item, where)
    return bad


def validate_serve_config(cfg: dict) -> None:
    """ServeDeploySchema + strict keys + AutoscalingConfig + AppSettings + prefixserve's own invariants."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from prefixserve.server.schemas import AppSettings

    ServeDeploySchema.model_validate(cfg)
    unknown = unknown_serve_keys(ServeDeploySchema, cfg)
    assert not unknown, f"fields Ray Serve does not know (would be ignored): {unknown}"
    for app in cfg["applications"]:
        assert app["import_path"] == "prefixserve.server.app:build_app"
        AppSettings.without_env(**app["args"])  # unknown args, wrong types, bad fingerprint format
        deps = {d["name"]: d for d in app["deployments"]}
        assert set(deps) == {"Ingress", "Worker"}, set(deps)
        for d in deps.values():
            if "autoscaling_config" in d:
                AutoscalingConfig.model_validate(d["autoscaling_config"])  # min<=max, ranges
        worker = deps["Worker"]
        assert "autoscaling_config" in worker and "num_replicas" not in worker
        assert set(worker["user_config"]) == {"max_batch_size", "batch_wait_timeout_s"}
        assert worker["max_ongoing_requests"] >= worker["user_config"]["max_batch_size"], (
            "max_ongoing_requests < max_batch_size: a full batch can never form"
        )
        assert deps["Ingress"].get("ray_actor_options", {}).get("num_gpus", 0) == 0, "Ingress is CPU only"


# ------------------------------------------------------------------------------------------------- tests
def test_every_yaml_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})
    assert len(files) >= 15, files
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(d is not None for d in docs), f"{path} has an empty document"


def test_yaml_negative():
    with pytest.raises(yaml.YAMLError):
        list(yaml.safe_load_all("a: [1, 2\nb: c\n"))


EXPECTED_KINDS = {
    "Namespace": 1,
    "ConfigMap": 3,  # the two redis.conf and the Redis scripts (the Serve config is build input only)
    "Secret": 1,
    "Service": 2,
    "StatefulSet": 2,
    "RayService": 1,
    "NetworkPolicy": 7,
    "PodDisruptionBudget": 3,
    "PodMonitor": 4,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_expected_objects(built, overlay):
    docs = built[overlay]
    kinds: dict[str, int] = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    expected = dict(EXPECTED_KINDS)
    if overlay == "gpu-prod":  # + the Redis TLS Secret, + PDBs of the two worker groups
        expected.update(Secret=2, PodDisruptionBudget=5)
    assert kinds == expected
    for d in docs:  # local-config Serve ConfigMap is a build input only; everything lands in one namespace
        assert "serve-config" not in d["metadata"]["name"]
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == OVERLAYS[overlay]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "prefixserve"


def test_kustomize_negative(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap}\n"
        "  patch: '[{op: replace, path: /data/missing, value: x}]'\n"
    )
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n")
    with pytest.raises(RuntimeError, match="failed"):
        kustomize_build(tmp_path)


@pytest.mark.parametrize("missing", ["secrets.env", "tls/ca.crt"])
def test_gpu_prod_refuses_to_build_without_its_inputs(tmp_path, missing):
    deploy = copy_deploy(tmp_path / "deploy")
    kustomize_build(deploy / "overlays" / "gpu-prod")  # builds with them...
    (deploy / "overlays" / "gpu-prod" / missing).unlink()
    with pytest.raises(RuntimeError, match=re.escape(missing.split("/")[-1])):  # ...and not without
        kustomize_build(deploy / "overlays" / "gpu-prod")


def test_secrets_wiring(built):
    prod_secret = one(built["gpu-prod"], "Secret", "prefixserve-secrets")
    values = {base64.b64decode(v).decode() for v in prod_secret["data"].values()}
    assert not values & PLACEHOLDER_SECRETS, "gpu-prod ships the base's placeholder secrets"
    for docs in built.values():  # every secret a pod or KubeRay reads exists, with that key
        secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
        refs = [n["secretKeyRef"] for n in walk(docs) if isinstance(n, dict) and "secretKeyRef" in n]
        refs += [n["credentials"] for n in walk(docs) if isinstance(n, dict) and "credentials" in n]  # PodMonitor
        for volume in (n["secret"] for n in walk(docs) if isinstance(n, dict) and isinstance(n.get("secret"), dict)):
            name = volume.get("secretName") or volume["name"]  # a secret volume or a projected volume's source
            refs += [{"name": name, "key": item["key"]} for item in volume.get("items", [{"key": None}])]
        assert len(refs) >= 8
        for ref in refs:
            assert ref["name"] in secrets, ref
            assert ref["key"] is None or ref["key"] in secrets[ref["name"]]["data"], ref


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_all_objects_match_their_schemas(built, overlay):
    for doc in built[overlay]:
        validate_any(doc)


def test_kubernetes_schema_negative(built):
    sts = copy.deepcopy(one(built["cpu-dev"], "StatefulSet", "prefixserve-redis"))
    sts["spec"]["replica"] = sts["spec"].pop("replicas")  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(sts)
    sts = one(built["cpu-dev"], "StatefulSet", "prefixserve-redis")
    sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "6379"  # wrong type
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(sts)


def test_kuberay_crds_are_verbatim_upstream():
    """The committed CRDs are KubeRay's files at the recorded tags (git blob ids), for the versions README names."""
    sources = crd_sources()
    assert {c["tag"] for c in sources["crds"]} == {sources["target"], sources["oldest"]}
    for entry in sources["crds"]:
        assert git_blob_id(crd_bytes(entry["file"])) == entry["blob"], entry["file"]
    readme = (DEPLOY / "README.md").read_text()
    assert f"KubeRay {sources['target'][1:]}" in readme and f"KubeRay {sources['oldest'][1:]}" in readme
    # negative: one changed byte changes the id
    data = bytearray(gzip.decompress((SCHEMAS / sources["crds"][0]["file"]).read_bytes()))
    data[-2] ^= 1
    assert git_blob_id(bytes(data)) != sources["crds"][0]["blob"]


RAYSERVICE_BREAKS = {
    "misspelt field": lambda rs: rs["spec"]["rayClusterConfig"].__setitem__(
        "enableInTreeAutoscalling", rs["spec"]["rayClusterConfig"].pop("enableInTreeAutoscaling")
    ),
    "unknown field in authOptions": lambda rs: rs["spec"]["rayClusterConfig"]["authOptions"].__setitem__("tokn", 1),
    "bad enum": lambda rs: rs["spec"]["rayClusterConfig"]["authOptions"].__setitem__("mode", "password"),
    "rayStartParams value not a string": lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"][
        "rayStartParams"
    ].__setitem__("num-cpus", 0),
    "int32 as string": lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "8"),
    "missing required": lambda rs: rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"].pop("redisAddress"),
    "unknown field in a container": lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"][
        "spec"
    ]["containers"][0].__setitem__("imagePullPolicyy", "Always"),
    "wrong type in a pod template": lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "securityContext"
    ].__setitem__("runAsUser", "1000"),
}


@pytest.mark.parametrize("case", RAYSERVICE_BREAKS)
def test_rayservice_crd_negative(built, case):
    rs = one(built["gpu-prod"], "RayService")
    RAYSERVICE_BREAKS[case](rs)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_rayservice(rs)


def test_podmonitor_schema_negative(built):
    pm = one(built["gpu-prod"], "PodMonitor", "prefixserve-app")
    pm["spec"]["podMetricEndpoints"] = pm["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        validate_podmonitor(pm)
    pm = one(built["cpu-dev"], "PodMonitor", "prefixserve-app")
    pm["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate_podmonitor(pm)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_validates_with_ray(built, overlay):
    rs = one(built[overlay], "RayService")
    cfg = serve_config(rs)
    validate_serve_config(cfg)
    # the overlay's own serve_config.yaml is what reached the RayService (replacements ran last)
    source = DEPLOY / ("base" if overlay == "cpu-dev" else f"overlays/{overlay}") / "serve_config.yaml"
    assert cfg == yaml.safe_load(source.read_text())
    redis_host = cfg["applications"][0]["args"]["store"].split("//")[1].split(":")[0]
    assert redis_host == one(built[overlay], "Service", "prefixserve-redis")["metadata"]["name"]


def test_serve_config_negative(built):
    from pydantic import ValidationError

    good = serve_config(one(built["gpu-prod"], "RayService"))

    def broken(edit):
        cfg = copy.deepcopy(good)
        app = cfg["applications"][0]
        edit({d["name"]: d for d in app["deployments"]} | {"args": app["args"]})
        return cfg

    cases = {
        "typo in deployment": (lambda d: d["Worker"].__setitem__("max_ongoing_request", 64), AssertionError),
        "typo in autoscaling": (
            lambda d: d["Worker"]["autoscaling_config"].__setitem__("target_ongoing_request", 4),
            AssertionError,
        ),
        "typo in actor options": (lambda d: d["Worker"]["ray_actor_options"].__setitem__("num_gpu", 1), AssertionError),
        "wrong type": (lambda d: d["Ingress"].__setitem__("num_replicas", "many"), ValidationError),
        "min > max": (lambda d: d["Worker"]["autoscaling_config"].__setitem__("min_replicas", 9), ValidationError),
        "batch cannot form": (lambda d: d["Worker"].__setitem__("max_ongoing_requests", 8), AssertionError),
        "unknown app arg": (lambda d: d["args"].__setitem__("backbone_revision", "main"), ValidationError),
        "fingerprint not a sha256": (lambda d: d["args"].__setitem__("backbone_fingerprint", "main"), ValidationError),
    }
    for name, (edit, error) in cases.items():
        with pytest.raises(error):
            validate_serve_config(broken(edit))
            pytest.fail(f"{name} not caught")


def test_import_path_builds_the_app(built, tmp_path):
    """Ray's own `serve build` path: import_attr + builder args -> Application -> BuiltApplication."""
    import ray
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    from prefixserve.adapters.synthetic import make_backbone

    backbone = make_backbone(tmp_path / "backbone", "roberta")
    ray_was_up = ray.is_initialized()  # the session's shared cluster may already run (server tests)
    for overlay in OVERLAYS:
        app_cfg = serve_config(one(built[overlay], "RayService"))["applications"][0]
        local = {"backbone": str(backbone), "store": (tmp_path / "store").as_uri(), "device": "cpu"}
        args = {**app_cfg["args"], **local, "dtype": "float32", "admin_key_file": str(tmp_path / "admin")}
        app = call_user_app_builder_with_args_if_necessary(import_attr(app_cfg["import_path"]), args)
        assert isinstance(app, serve.Application), type(app)
        built_app = build_app(app, name=app_cfg["name"])
        # every deployment named in serveConfigV2 exists in the code (Serve rejects unknown names)
        assert set(deployments(one(built[overlay], "RayService"))) <= {d.name for d in built_app.deployments}
        assert built_app.ingress_deployment_name == "Ingress"
    assert ray.is_initialized() == ray_was_up, "building the app must not start Ray"


# ---------------------------------------------------------------------------------------------- Dockerfile
def dockerfile_problems(text: str, ray_version: str) -> list[str]:
    """Static checks of deploy/Dockerfile (no Docker engine here)."""
    import tomllib

    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    problems = []
    if f"rayproject/ray:{ray_version}-" not in text or "-gpu" not in text:
        problems.append(f"base image is not rayproject/ray:{ray_version}-...-gpu (rayVersion {ray_version})")
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append("final USER is root")
    torch_at = next((i for i, ln in enumerate(lines) if "TORCH_SPEC=torch==" in ln), None)
    # the project install, with or without pip options (e.g. `-c requirements.lock`)
    pip_at = next((i for i, ln in enumerate(lines) if re.search(r"\bpip install\b.*\s\.(\[[^]]*\])?(\s|$)", ln)), None)
    if torch_at is None or pip_at is None or torch_at > pip_at:
        problems.append("torch must be pinned and installed before `pip install .`")
    installs = [ln for ln in lines if re.search(r"\bpip install\b", ln)]
    if not installs or any("-c requirements.lock" not in ln for ln in installs):
        problems.append("every pip install must be constrained by the lock (-c requirements.lock)")
    if not any("image_check.py requirements.lock" in ln for ln in lines):
        problems.append("the build does not check installed versions against the lock")
    if "VOLUME" in " ".join(lines) or not any("bake_backbone.py" in ln and "BACKBONE_REVISION" in ln for ln in lines):
        problems.append("the backbone must be baked in at BACKBONE_REVISION, with no VOLUME over it")
    for needed in ("requirements.lock", "deploy/image_check.py", "deploy/bake_backbone.py"):
        if not any(ln.startswith("COPY") and needed in ln for ln in lines) or f"!{needed}" not in ignore:
            problems.append(f"{needed} is not copied into the image")
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in package_dirs.values():
        if not any(ln.startswith("COPY") and f" {folder} " in f"{ln} " for ln in lines):
            problems.append(f"package folder {folder}/ is not copied into the image")
        if f"!{folder}/" not in ignore:
            problems.append(f"{folder}/ is excluded by Dockerfile.dockerignore")
    return problems


def test_dockerfile(built):
    import ray

    ray_version = one(built["gpu-prod"], "RayService")["spec"]["rayClusterConfig"]["rayVersion"]
    assert ray_version == ray.__version__, "image/rayVersion must match the Ray the project resolves"
    text = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile_problems(text, ray_version) == []
    broken = text.replace("USER 1000:100\nWORKDIR", "WORKDIR").replace("COPY --chown=1000:100 server ./server\n", "")
    assert len(dockerfile_problems(broken, ray_version)) == 2  # runs as root; server/ not copied
    unlocked = text.replace("pip install -c requirements.lock .", "pip install .")
    assert dockerfile_problems(unlocked, ray_version) == [
        "every pip install must be constrained by the lock (-c requirements.lock)"
    ]
    volume = text.replace("EXPOSE", 'VOLUME ["/models"]\nEXPOSE')
    assert dockerfile_problems(volume, ray_version) == [
        "the backbone must be baked in at BACKBONE_REVISION, with no VOLUME over it"
    ]


def test_image_check_compares_installed_versions_with_the_lock(tmp_path):
    """deploy/image_check.py (run by the image build) on this venv, which `make` installed from the lock."""
    lock = (ROOT / "requirements.lock").read_text()
    check = [sys.executable, str(DEPLOY / "image_check.py"), str(tmp_path / "lock")]
    (tmp_path / "lock").write_text(lock)
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    import pydantic

    (tmp_path / "lock").write_text(lock.replace(f"pydantic=={pydantic.VERSION}\n", "pydantic==1.0.0\n"))
    out = subprocess.run(check, capture_output=True, text=True)
    assert out.returncode == 1 and f"pydantic: installed {pydantic.VERSION}, locked ==1.0.0" in out.stderr


def test_bake_backbone_writes_the_fingerprint_the_worker_checks(tiny_backbones, tmp_path):
    from prefixserve.adapters.backbone import load_backbone

    bake = [sys.executable, str(DEPLOY / "bake_backbone.py")]
    out = subprocess.run([*bake, tiny_backbones["roberta"], "-", str(tmp_path / "bb")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    fingerprint = load_backbone(tiny_backbones["roberta"], device="cpu").fingerprint
    assert out.stdout.strip() == f"backbone_fingerprint: {fingerprint}"
    assert (tmp_path / "bb" / "FINGERPRINT").read_text().strip() == fingerprint
    shutil.rmtree(tmp_path / "bb")  # a hub id needs a commit id, never a branch (refused before any download)
    out = subprocess.run([*bake, "klue/roberta-base", "main", str(tmp_path / "bb")], capture_output=True, text=True)
    assert out.returncode != 0 and "40-hex commit" in out.stderr
