"""The file store's tenants, API keys, quotas, rate and training limits (:mod:`.file` adds the adapters).

Every change rewrites ``tenant.json`` atomically under the tenant's lock. Key files are written
before the record that lists them and removed only after the record stops listing them, so a
failed write (full or read-only disk) can leave an unused key file but never lock a tenant out.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from ..errors import ConflictError, NotFoundError, PrefixServeError
from .base import (
    Quota,
    TenantInfo,
    check_limits,
    check_training_limits,
    limits_from_dict,
    training_limits_from_dict,
)
from .file_base import FileBase, read_json, remove_quietly, write_atomic, writes
from .ids import check_tenant, safe_join
from .keys import new_key, parse_api_key, verify

if TYPE_CHECKING:
    from ..ratelimit import RateLimits
    from .jobs import TrainingLimits

_log = logging.getLogger(__name__)
_R = TypeVar("_R")


class FileTenants(FileBase):
    @writes
    def create_tenant(self, name: str, quota: Quota | None = None) -> str:
        tdir = self._tenant_dir(name)
        quota = quota or Quota()
        with self._lock("_global"), self._lock(name):
            if (tdir / "tenant.json").exists():
                raise ConflictError(f"tenant {name!r} already exists")
            api_key, record = new_key(name, self._pepper)
            key_path = self._key_path(record["key_id"])
            fresh_dir = not tdir.exists()
            rec = {
                "name": name,
                "quota": quota.__dict__,
                "limits": None,
                "training_limits": None,
                "key_ids": [record["key_id"]],
                "created": time.time(),
                "version_base": self._floor(),  # numbers above any a deleted namesake used
            }
            try:
                (tdir / "adapters").mkdir(parents=True, exist_ok=True)
                write_atomic(key_path, json.dumps(record).encode())
                write_atomic(tdir / "tenant.json", json.dumps(rec).encode())  # the tenant exists from here
            except BaseException:
                remove_quietly(key_path)
                if fresh_dir:
                    shutil.rmtree(tdir, ignore_errors=True)
                raise
        return api_key

    def _tenant_info(self, name: str, rec: dict) -> TenantInfo:
        count, used = self._usage(name)
        return TenantInfo(
            name,
            Quota(**rec["quota"]),
            count,
            used,
            tuple(rec["key_ids"]),
            rec["created"],
            limits_from_dict(rec.get("limits")),
            training_limits_from_dict(rec.get("training_limits")),  # absent in records older than the field
        )

    def tenant_info(self, name: str) -> TenantInfo:
        return self._tenant_info(name, self._tenant_record(name))

    def list_tenants(self) -> builtins.list[TenantInfo]:
        out = []
        for name in sorted(os.listdir(self.root / "tenants")):
            with contextlib.suppress(NotFoundError, PrefixServeError):
                out.append(self.tenant_info(name))
        return out

    def _update_tenant(self, name: str, change: Callable[[dict], _R]) -> _R:
        """Apply ``change`` to the tenant record under its lock and write it back; return its result."""
        with self._lock(name):
            rec = self._tenant_record(name)
            result = change(rec)
            write_atomic(self._tenant_dir(name) / "tenant.json", json.dumps(rec).encode())
        return result

    @writes
    def set_quota(self, name: str, quota: Quota) -> None:
        self._update_tenant(name, lambda rec: rec.update(quota=quota.__dict__))

    @writes
    def set_limits(self, name: str, limits: RateLimits | None) -> None:
        limits = check_limits(limits)
        stored = None if limits is None else limits.to_dict()
        self._update_tenant(name, lambda rec: rec.update(limits=stored))

    @writes
    def set_training_limits(self, name: str, limits: TrainingLimits | None) -> None:
        limits = check_training_limits(limits)
        stored = None if limits is None else limits.to_dict()
        self._update_tenant(name, lambda rec: rec.update(training_limits=stored))

    def _remove_keys(self, key_ids: Iterable[str]) -> None:
        """Best effort: the tenant record no longer lists these ids, so a leftover file grants nothing."""
        remove_quietly(*(self._key_path(k) for k in key_ids))

    @writes
    def rotate_key(self, name: str, *, revoke_old: bool = True) -> str:
        api_key, record = new_key(check_tenant(name), self._pepper)
        key_path = self._key_path(record["key_id"])

        def change(rec: dict) -> list[str]:
            old = list(rec["key_ids"])
            write_atomic(key_path, json.dumps(record).encode())
            rec["key_ids"] = [record["key_id"]] + ([] if revoke_old else old)
            return old if revoke_old else []

        try:
            revoked = self._update_tenant(name, change)
        except BaseException:
            remove_quietly(key_path)
            raise
        self._remove_keys(revoked)
        return api_key

    @writes
    def revoke_key(self, name: str, key_id: str | None = None) -> int:
        def change(rec: dict) -> list[str]:
            gone = [k for k in rec["key_ids"] if key_id is None or k == key_id]
            rec["key_ids"] = [k for k in rec["key_ids"] if k not in gone]
            return gone

        gone = self._update_tenant(name, change)
        self._remove_keys(gone)
        return len(gone)

    def _top_version(self, name: str, rec: dict) -> int:
        """The highest version number the tenant has used (counters, blobs on disk, its base)."""
        top = int(rec.get("version_base", 0))
        adapters = self._tenant_dir(name) / "adapters"
        for prefix_id in os.listdir(adapters) if adapters.is_dir() else []:
            adir = adapters / prefix_id
            with contextlib.suppress(FileNotFoundError, ValueError):
                top = max(top, int((adir / "seq").read_text()))
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                top = max([top] + [int(n.split(".")[0]) for n in os.listdir(adir / "v") if n.split(".")[0].isdigit()])
        return top

    @writes
    def delete_tenant(self, name: str) -> None:
        tdir = self._tenant_dir(name)
        with self._lock("_global"), self._lock(name):
            rec = self._tenant_record(name)
            self._raise_floor(self._top_version(name, rec))  # a recreated namesake numbers above these
            trash = safe_join(self.root, "trash", f"{name}.{secrets.token_hex(6)}")
            os.replace(tdir, trash)  # one rename: the tenant and all its adapters vanish together
            self._remove_keys(rec["key_ids"])  # keys of a missing tenant authenticate nobody anyway
        shutil.rmtree(trash, ignore_errors=True)

    def authenticate(self, api_key: str) -> str | None:
        parsed = parse_api_key(api_key)
        if parsed is None:
            return None
        key_id, secret = parsed
        tenant = verify(secret, read_json(safe_join(self.root, "keys", f"{key_id}.json")), self._pepper)
        if tenant is None:
            return None
        rec = read_json(self._tenant_dir(tenant) / "tenant.json")
        return tenant if rec and key_id in rec["key_ids"] else None
