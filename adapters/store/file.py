"""``file:///path``: the embedded default store (one machine; many processes may share it).

Layout under the root (every name passed ``check_id``; every path re-checked with ``safe_join``)::

    tenants/<T>/tenant.json                    quota, key ids, created
    tenants/<T>/adapters/<I>/current.json      the pointer: VersionInfo of the current version
    tenants/<T>/adapters/<I>/seq               last version number (kept after a delete)
    tenants/<T>/adapters/<I>/v/<n>.bin|.json   immutable blobs and their metadata
    keys/<key id>.json                         salted + peppered key hash -> tenant
    locks/<T>.lock, locks/_global.lock         ``fcntl.flock`` (outside the tenant dir, so a
                                               deleted and recreated tenant shares its lock)

Publish = blob (temp file, fsync, ``os.replace``) then the pointer the same way: a reader sees the
old or the new ``current.json``, and blobs never change once named. Writers of one tenant
serialise on its lock file, so the quota check and the publish are one atomic step. The change
feed polls ``current.json`` inode/mtime every ``poll_interval`` seconds (no inotify).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import ConflictError, NotFoundError, PrefixServeError
from .base import DEFAULT_KEEP_VERSIONS, ChangeEvent, Quota, StoreBase, TenantInfo, VersionInfo
from .ids import check_id, check_tenant, check_version, safe_join
from .keys import new_key, parse_api_key, resolve_pepper, verify

_MISSING = "adapter {!r} not found"
_R = TypeVar("_R")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself must survive a crash
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


class FileStore(StoreBase):
    def __init__(
        self,
        root: str | os.PathLike,
        *,
        validator=None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        poll_interval: float = 0.2,
        pepper: str | None = None,
        url: str | None = None,
    ):
        super().__init__(validator=validator, keep_versions=keep_versions)
        self.root = Path(os.path.realpath(os.path.expanduser(str(root))))
        for sub in ("tenants", "keys", "locks", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.url = url or f"file://{self.root}"
        self.poll_interval = float(poll_interval)
        self._pepper = resolve_pepper(pepper)
        self._feed_thread: threading.Thread | None = None

    # paths
    def _tenant_dir(self, tenant: str) -> Path:
        return safe_join(self.root, "tenants", check_tenant(tenant))

    def _adapter_dir(self, tenant: str, prefix_id: str) -> Path:
        return safe_join(self.root, "tenants", check_tenant(tenant), "adapters", check_id(prefix_id))

    @contextlib.contextmanager
    def _lock(self, name: str):
        fd = os.open(safe_join(self.root, "locks", f"{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _tenant_record(self, tenant: str) -> dict:
        rec = _read_json(self._tenant_dir(tenant) / "tenant.json")
        if rec is None:
            raise NotFoundError(f"tenant {tenant!r} not found")
        return rec

    def _usage(self, tenant: str) -> tuple[int, int]:
        infos = self.list(tenant)
        return len(infos), sum(i.size for i in infos)

    # adapters
    def put(self, tenant: str, prefix_id: str, data: bytes) -> VersionInfo:
        adir = self._adapter_dir(tenant, prefix_id)
        meta = self._validate(data)  # before anything is written
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock(tenant):
            quota = Quota(**self._tenant_record(tenant)["quota"])
            count, used = self._usage(tenant)
            old = _read_json(adir / "current.json")
            old_size = int(old["size"]) if old else 0
            quota.check(tenant, count + (0 if old else 1), used - old_size + len(data))
            (adir / "v").mkdir(parents=True, exist_ok=True)
            seq_file = adir / "seq"
            version = (int(seq_file.read_text()) if seq_file.exists() else 0) + 1
            info = VersionInfo(tenant, prefix_id, version, digest, len(data), meta, time.time())
            _write_atomic(adir / "v" / f"{version}.bin", data)
            _write_atomic(adir / "v" / f"{version}.json", info.to_json().encode())
            _write_atomic(seq_file, str(version).encode())
            _write_atomic(adir / "current.json", info.to_json().encode())  # the publish
            self._collect(adir, version)
        return info

    def _collect(self, adir: Path, current: int) -> None:
        """Keep the newest ``keep_versions``; the current one is always the newest."""
        for v in self._version_numbers(adir)[: -self.keep_versions]:
            if v != current:
                for ext in ("json", "bin"):  # metadata first: versions() never lists a blob-less version
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(adir / "v" / f"{v}.{ext}")

    @staticmethod
    def _version_numbers(adir: Path) -> list[int]:
        try:
            names = os.listdir(adir / "v")
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def head(self, tenant: str, prefix_id: str) -> VersionInfo:
        rec = _read_json(self._adapter_dir(tenant, prefix_id) / "current.json")
        if rec is None:
            raise NotFoundError(_MISSING.format(prefix_id))
        return VersionInfo.from_json(json.dumps(rec))

    def get(self, tenant: str, prefix_id: str, version: int | None = None) -> tuple[VersionInfo, bytes]:
        adir = self._adapter_dir(tenant, prefix_id)
        if version is not None:
            version = check_version(version)
        for _ in range(8):  # the pointer may move on and its old blob be collected between two reads
            if version is None:
                info = self.head(tenant, prefix_id)
            else:
                if not (adir / "current.json").exists():
                    raise NotFoundError(_MISSING.format(prefix_id))
                rec = _read_json(adir / "v" / f"{version}.json")
                if rec is None:
                    raise NotFoundError(f"version {version} of adapter {prefix_id!r} not found")
                info = VersionInfo.from_json(json.dumps(rec))
            try:
                data = (adir / "v" / f"{info.version}.bin").read_bytes()
            except FileNotFoundError:
                if version is not None:
                    raise NotFoundError(f"version {version} of adapter {prefix_id!r} not found") from None
                continue
            if len(data) != info.size or hashlib.sha256(data).hexdigest() != info.sha256:
                raise PrefixServeError(f"stored blob of {prefix_id!r} v{info.version} is corrupt", code="corrupt")
            return info, data
        raise NotFoundError(_MISSING.format(prefix_id))

    def list(self, tenant: str) -> list[VersionInfo]:
        self._tenant_record(tenant)
        root = self._tenant_dir(tenant) / "adapters"
        out = []
        for name in sorted(os.listdir(root)) if root.exists() else []:
            rec = _read_json(root / name / "current.json")
            if rec is not None:
                out.append(VersionInfo.from_json(json.dumps(rec)))
        return out

    # builtins.list: in this class body ``list`` names the method above
    def versions(self, tenant: str, prefix_id: str) -> builtins.list[VersionInfo]:
        adir = self._adapter_dir(tenant, prefix_id)
        self.head(tenant, prefix_id)
        out = []
        for v in self._version_numbers(adir):
            rec = _read_json(adir / "v" / f"{v}.json")
            if rec is not None:
                out.append(VersionInfo.from_json(json.dumps(rec)))
        return out

    def delete(self, tenant: str, prefix_id: str) -> None:
        adir = self._adapter_dir(tenant, prefix_id)
        with self._lock(tenant):
            try:
                os.remove(adir / "current.json")  # unpublish first: readers now get NotFound
            except FileNotFoundError:
                raise NotFoundError(_MISSING.format(prefix_id)) from None
            shutil.rmtree(adir / "v", ignore_errors=True)

    # tenants and keys
    def create_tenant(self, name: str, quota: Quota | None = None) -> str:
        tdir = self._tenant_dir(name)
        quota = quota or Quota()
        with self._lock("_global"), self._lock(name):
            if (tdir / "tenant.json").exists():
                raise ConflictError(f"tenant {name!r} already exists")
            (tdir / "adapters").mkdir(parents=True, exist_ok=True)
            api_key, record = new_key(name, self._pepper)
            _write_atomic(safe_join(self.root, "keys", f"{record['key_id']}.json"), json.dumps(record).encode())
            rec = {"name": name, "quota": quota.__dict__, "key_ids": [record["key_id"]], "created": time.time()}
            _write_atomic(tdir / "tenant.json", json.dumps(rec).encode())
        return api_key

    def tenant_info(self, name: str) -> TenantInfo:
        rec = self._tenant_record(name)
        count, used = self._usage(name)
        return TenantInfo(name, Quota(**rec["quota"]), count, used, tuple(rec["key_ids"]), rec["created"])

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
            _write_atomic(self._tenant_dir(name) / "tenant.json", json.dumps(rec).encode())
        return result

    def set_quota(self, name: str, quota: Quota) -> None:
        self._update_tenant(name, lambda rec: rec.update(quota=quota.__dict__))

    def _remove_keys(self, key_ids) -> None:
        for key_id in key_ids:
            with contextlib.suppress(FileNotFoundError):
                os.remove(safe_join(self.root, "keys", f"{check_id(key_id, 'key id')}.json"))

    def rotate_key(self, name: str, *, revoke_old: bool = True) -> str:
        api_key, record = new_key(check_tenant(name), self._pepper)

        def change(rec):
            old = list(rec["key_ids"])
            _write_atomic(safe_join(self.root, "keys", f"{record['key_id']}.json"), json.dumps(record).encode())
            rec["key_ids"] = [record["key_id"]] + ([] if revoke_old else old)
            if revoke_old:
                self._remove_keys(old)

        self._update_tenant(name, change)
        return api_key

    def revoke_key(self, name: str, key_id: str | None = None) -> int:
        def change(rec):
            gone = [k for k in rec["key_ids"] if key_id is None or k == key_id]
            rec["key_ids"] = [k for k in rec["key_ids"] if k not in gone]
            self._remove_keys(gone)
            return len(gone)

        return self._update_tenant(name, change)

    def delete_tenant(self, name: str) -> None:
        tdir = self._tenant_dir(name)
        with self._lock("_global"), self._lock(name):
            rec = self._tenant_record(name)
            self._remove_keys(rec["key_ids"])
            trash = safe_join(self.root, "trash", f"{name}.{secrets.token_hex(6)}")
            os.replace(tdir, trash)  # one rename: the tenant and all its adapters vanish together
        shutil.rmtree(trash, ignore_errors=True)

    def authenticate(self, api_key: str) -> str | None:
        parsed = parse_api_key(api_key)
        if parsed is None:
            return None
        key_id, secret = parsed
        tenant = verify(secret, _read_json(safe_join(self.root, "keys", f"{key_id}.json")), self._pepper)
        if tenant is None:
            return None
        rec = _read_json(self._tenant_dir(tenant) / "tenant.json")
        return tenant if rec and key_id in rec["key_ids"] else None

    def ping(self) -> None:
        if not (self.root / "tenants").is_dir():
            raise PrefixServeError(f"store root {self.root} is missing", code="store_unavailable", status=503)

    # change feed: poll the pointers
    def _snapshot(self) -> dict[tuple[str, str], tuple[int, int]]:
        snap = {}
        tenants = self.root / "tenants"
        for t in os.listdir(tenants):
            adapters = tenants / t / "adapters"
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for i in os.listdir(adapters):
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        st = os.stat(adapters / i / "current.json")
                        snap[(t, i)] = (st.st_ino, st.st_mtime_ns)
        return snap

    def _start_feed(self) -> None:
        with self._subs_lock:
            if self._feed_thread is not None:
                return
            first = self._snapshot()  # events from now on are delivered
            self._feed_thread = threading.Thread(target=self._poll, args=(first,), name="filestore-feed", daemon=True)
            self._feed_thread.start()

    def _poll(self, before) -> None:
        while not self._closed.wait(self.poll_interval):
            try:
                now = self._snapshot()
            except OSError:
                continue
            for key, stamp in now.items():
                if before.get(key) != stamp:
                    rec = _read_json(self.root / "tenants" / key[0] / "adapters" / key[1] / "current.json")
                    self._emit(ChangeEvent(key[0], key[1], int(rec["version"]) if rec else None))
            for key in before.keys() - now.keys():
                self._emit(ChangeEvent(key[0], key[1], None))
            before = now
