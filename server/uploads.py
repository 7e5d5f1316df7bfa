"""Decoding an adapter upload body into packed bytes (the Ingress's ``decode`` step for ``PUT``).

A body is either a packed ``.safetensors`` (``application/octet-stream``) or a PEFT folder's two files
as multipart (``adapter_config`` + ``adapter_model``, optional ``labels`` and ``fingerprint``). Either
way the result is packed bytes that the store's validator then checks against the served backbone.
"""

from __future__ import annotations

import asyncio
import json
import tempfile

from fastapi import Request

from prefixserve.adapters.errors import BadRequestError, InvalidAdapterError

SPOOL_MEMORY_BYTES = 2**20  # an upload's first MiB stays in memory, the rest goes to a temporary file
PARTS = ("adapter_config", "adapter_model", "labels", "fingerprint")
REQUIRED_PARTS = ("adapter_config", "adapter_model")
OPENAPI_BODY = {
    "requestBody": {
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "adapter_config": {"type": "string", "format": "binary"},
                        "adapter_model": {"type": "string", "format": "binary"},
                        "labels": {"type": "string", "description": "JSON list or comma-separated"},
                        "fingerprint": {"type": "string"},
                    },
                    "required": list(REQUIRED_PARTS),
                }
            },
        }
    }
}


async def read_upload(request: Request, *, fingerprint: str, max_bytes: int) -> bytes:
    """Packed adapter bytes from the request body (``fingerprint``: the served backbone's, for PEFT parts).

    The body streams into a spool (memory up to :data:`SPOOL_MEMORY_BYTES`, then a temporary file), and is
    read back once for validation: one copy of the upload in memory at a time, never a list of chunks plus
    their join. The Gate middleware has already authenticated the caller and caps the streamed size.
    """
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        data = await _pack_multipart(request, fingerprint, max_bytes)
    else:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as spool:
            async for chunk in request.stream():
                spool.write(chunk)
            spool.seek(0)
            data = spool.read()
    if not data:
        raise BadRequestError(
            "empty body: send a packed adapter or multipart adapter_config + adapter_model", code="empty_body"
        )
    return data


async def _pack_multipart(request: Request, fingerprint: str, max_bytes: int) -> bytes:
    from prefixserve.adapters.peft_io import pack_parts

    try:
        form = await request.form(max_files=4, max_fields=8, max_part_size=max_bytes)
    except Exception as exc:
        raise BadRequestError(f"unreadable multipart body: {exc}", code="bad_multipart") from None
    parts: dict[str, bytes] = {}
    for name in PARTS:
        value = form.get(name)
        if value is None:
            continue
        parts[name] = await value.read() if not isinstance(value, str) else value.encode()
    missing = [n for n in REQUIRED_PARTS if n not in parts]
    if missing:
        raise InvalidAdapterError(
            f"multipart upload is missing {missing} (adapter_config.json and "
            "adapter_model.safetensors from PeftModel.save_pretrained)",
            code="bad_multipart",
        )
    labels = parse_labels(parts.get("labels"))
    try:
        fp = parts.get("fingerprint", b"").decode("utf-8").strip() or fingerprint
    except UnicodeDecodeError:
        raise InvalidAdapterError("fingerprint is not UTF-8 text", code="bad_fingerprint") from None
    return await asyncio.to_thread(
        pack_parts, parts["adapter_config"], parts["adapter_model"], labels=labels, fingerprint=fp
    )


def parse_labels(raw: bytes | None) -> list[str] | None:
    """A JSON list of strings, or comma-separated names; None when absent."""
    if not raw:
        return None
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidAdapterError(f"labels is not a JSON list: {exc}", code="bad_labels") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InvalidAdapterError("labels must be a JSON list of strings", code="bad_labels")
        return labels
    return [x.strip() for x in text.split(",") if x.strip()]
