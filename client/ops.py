"""Every API call, written once as a generator: it yields :class:`~.core.Call` values, receives each
``httpx.Response`` (already checked: an error status was raised as :class:`PrefixServeError` by the
driver unless the call lists it in ``ok``) and returns the typed result. :mod:`.http` drives them.

Decisions:
* Ids in paths are percent-encoded (``safe=""``): an id can never add a path segment, whatever it holds.
* ``classify`` splits inputs into requests of at most the server's ``max_inputs`` (``GET /info``, asked
  once per client; when the server does not say, the client's ``max_inputs``). Chunks go one after the
  other: the first answer's version is pinned in every later chunk (``"version": n``), so the joined
  result comes from one adapter version even if the tenant uploads meanwhile, and a tenant's
  concurrency limit is never the client's own doing. A chunk answered by another version is an error.
* A PEFT folder is uploaded as it is (multipart ``adapter_config`` + ``adapter_model`` [+ ``labels``]):
  the server packs it against its own backbone. Labels: the argument, else the folder's
  ``prefixserve.json`` sidecar (written by ``prefixserve unpack``), which may also name the backbone
  fingerprint the folder was made for (sent as ``fingerprint``, so a mismatch is refused).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from prefixserve.adapters.errors import BadRequestError, ConflictError, PrefixServeError

from .core import Call, json_body
from .models import Classification, Limits, PrefixMeta, PrefixVersions, ServerInfo, TenantKey, TrainingLimits

T = TypeVar("T")
Op = Generator[Call, httpx.Response, T]
SIDECAR = "prefixserve.json"  # adapters.peft_io.SIDECAR (not imported: that module pulls in torch)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _seg(value: str) -> str:
    return quote(value, safe="")


class Session:
    """Per-client state the operations share: the discovered ``max_inputs``."""

    def __init__(self, max_inputs: int):
        if max_inputs < 1:
            raise ValueError("max_inputs must be >= 1")
        self.fallback_max_inputs = max_inputs
        self.info: ServerInfo | None = None

    def server_info(self) -> Op[ServerInfo]:
        """``GET /info``, once; a server without the route (404) or that refuses it counts as 'says nothing'."""
        if self.info is None:
            r = yield Call("GET", "/info", ok=(401, 403, 404))
            self.info = ServerInfo.from_json(json_body(r)) if r.is_success else ServerInfo(max_inputs=None)
        return self.info

    def max_inputs(self) -> Op[int]:
        info = yield from self.server_info()
        return info.max_inputs or self.fallback_max_inputs

    # ---- admin ------------------------------------------------------------------------------------
    @staticmethod
    def create_tenant(tenant: str) -> Op[TenantKey]:
        r = yield Call("POST", "/v1/tenants", json={"tenant": tenant}, idempotent=False)
        return TenantKey.from_json(json_body(r))

    @staticmethod
    def delete_tenant(tenant: str) -> Op[None]:
        yield Call("DELETE", f"/v1/tenants/{_seg(tenant)}")

    @staticmethod
    def rotate_key(tenant: str) -> Op[TenantKey]:
        r = yield Call("POST", f"/v1/tenants/{_seg(tenant)}/keys", idempotent=False)
        return TenantKey.from_json(json_body(r))

    @staticmethod
    def get_limits(tenant: str) -> Op[Limits]:
        r = yield Call("GET", f"/v1/tenants/{_seg(tenant)}/limits")
        return Limits.from_json(json_body(r))

    @staticmethod
    def set_limits(tenant: str, limits: dict[str, Any]) -> Op[Limits]:
        r = yield Call("PUT", f"/v1/tenants/{_seg(tenant)}/limits", json=limits)
        return Limits.from_json(json_body(r))

    @staticmethod
    def get_training_limits(tenant: str) -> Op[TrainingLimits]:
        r = yield Call("GET", f"/v1/tenants/{_seg(tenant)}/training-limits")
        return TrainingLimits.from_json(json_body(r))

    @staticmethod
    def set_training_limits(tenant: str, limits: dict[str, Any]) -> Op[TrainingLimits]:
        # a PUT of a whole set: sending it twice leaves the same state, so it may be retried
        r = yield Call("PUT", f"/v1/tenants/{_seg(tenant)}/training-limits", json=limits)
        return TrainingLimits.from_json(json_body(r))

    # ---- adapters (tenant) -----------------------------------------------------------------------
    @staticmethod
    def upload(prefix_id: str, source: str | Path | bytes, labels: Sequence[str] | None = None) -> Op[PrefixMeta]:
        path = f"/v1/prefixes/{_seg(prefix_id)}"
        if isinstance(source, bytes | bytearray):
            call = Call("PUT", path, content=bytes(source), idempotent=False)
        elif Path(source).is_dir():
            call = Call("PUT", path, files=peft_parts(Path(source), labels), idempotent=False)
        else:
            call = Call("PUT", path, content=Path(source).read_bytes(), idempotent=False)
        if labels is not None and call.files is None:
            raise BadRequestError("labels apply to a PEFT folder; a packed file carries its own", code="bad_args")
        r = yield call
        return PrefixMeta.from_json(json_body(r))

    @staticmethod
    def list(kind: str | None = None) -> Op[builtins.list[PrefixMeta]]:
        r = yield Call("GET", "/v1/prefixes", params={"kind": kind} if kind else None)
        body = json_body(r)
        return [PrefixMeta.from_json(p) for p in (body.get("prefixes", []) if isinstance(body, dict) else [])]

    @staticmethod
    def get(prefix_id: str) -> Op[PrefixMeta]:
        r = yield Call("GET", f"/v1/prefixes/{_seg(prefix_id)}")
        return PrefixMeta.from_json(json_body(r))

    @staticmethod
    def delete(prefix_id: str) -> Op[None]:
        yield Call("DELETE", f"/v1/prefixes/{_seg(prefix_id)}")

    @staticmethod
    def versions(prefix_id: str) -> Op[PrefixVersions]:
        r = yield Call("GET", f"/v1/prefixes/{_seg(prefix_id)}/versions")
        return PrefixVersions.from_json(json_body(r))

    @staticmethod
    def rollback(prefix_id: str, version: int) -> Op[PrefixMeta]:
        # a pin to one version: sending it twice leaves the same state, so it may be retried
        r = yield Call("POST", f"/v1/prefixes/{_seg(prefix_id)}/rollback", json={"version": version})
        return PrefixMeta.from_json(json_body(r))

    @staticmethod
    def unpin(prefix_id: str) -> Op[PrefixMeta]:
        r = yield Call("DELETE", f"/v1/prefixes/{_seg(prefix_id)}/pin")
        return PrefixMeta.from_json(json_body(r))

    # ---- inference --------------------------------------------------------------------------------
    def classify(
        self,
        prefix_id: str,
        texts: Sequence[str],
        text_pairs: Sequence[str | None] | None = None,
        version: int | None = None,
    ) -> Op[Classification]:
        if isinstance(texts, str):  # a lone string would be split into characters
            raise BadRequestError("texts must be a list of strings, not one string", code="bad_args")
        texts = list(texts)
        pairs = list(text_pairs) if text_pairs is not None else None
        if pairs is not None and len(pairs) != len(texts):
            raise BadRequestError(f"text_pairs has {len(pairs)} items but texts has {len(texts)}", code="bad_args")
        size = yield from self.max_inputs()
        parts: builtins.list[Classification] = []
        for start in range(0, max(len(texts), 1), size):  # an empty list still asks: the server says why not
            body: dict[str, Any] = {"prefix_id": prefix_id, "inputs": texts[start : start + size]}
            if pairs is not None:
                body["text_pairs"] = pairs[start : start + size]
            if version is not None:
                body["version"] = version
            part = Classification.from_json(json_body((yield Call("POST", "/v1/classify", json=body))))
            if version is None:
                version = part.version  # pin it: every later chunk must use the same adapter version
            elif part.version != version:
                raise ConflictError(f"asked for version {version} of {prefix_id!r}, the server used {part.version}")
            parts.append(part)
        return Classification(
            prefix_id=prefix_id,
            version=parts[0].version,
            predictions=tuple(p for part in parts for p in part.predictions),
            truncated=tuple(t for part in parts for t in part.truncated),
        )


def peft_parts(folder: Path, labels: Sequence[str] | None) -> dict[str, tuple[str, bytes, str]]:
    """A PEFT folder's multipart parts: the two files PEFT writes, plus labels and fingerprint if known."""
    missing = [name for name in PEFT_FILES if not (folder / name).is_file()]
    if missing:
        raise BadRequestError(
            f"{folder} is not a PEFT folder (missing {', '.join(missing)}); pack an AdapterHub folder first "
            "with `prefixserve pack`",
            code="bad_args",
        )
    parts = {
        "adapter_config": (PEFT_FILES[0], (folder / PEFT_FILES[0]).read_bytes(), "application/json"),
        "adapter_model": (PEFT_FILES[1], (folder / PEFT_FILES[1]).read_bytes(), "application/octet-stream"),
    }
    sidecar: dict[str, Any] = {}
    if (folder / SIDECAR).is_file():
        try:
            sidecar = json.loads((folder / SIDECAR).read_text("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise PrefixServeError(f"{folder / SIDECAR}: not JSON: {exc}", code="bad_sidecar", status=400) from None
        sidecar = sidecar if isinstance(sidecar, dict) else {}
    names = list(labels) if labels is not None else sidecar.get("labels")
    if names:
        parts["labels"] = ("labels", json.dumps(list(names)).encode(), "application/json")
    if isinstance(sidecar.get("backbone"), str) and sidecar["backbone"]:
        parts["fingerprint"] = ("fingerprint", sidecar["backbone"].encode(), "text/plain")
    return parts
