"""The file store's plumbing (:mod:`.file`): atomic writes, paths, locks, the version floor, and
failed writes turned into 503s.

Decisions:

* Every write is temp file, fsync, ``os.replace``, fsync of the directory; a failed write removes
  its temp file, so a full or read-only disk leaves no debris behind.
* Any ``OSError`` while writing (EROFS, ENOSPC, EDQUOT, EIO, EACCES...) means the store cannot take
  writes right now: the public write methods raise ``StoreUnavailableError`` (503, ``retry_after``)
  instead of leaking a 500, and the message names the errno, not the path.
* ``version_floor`` (a file at the root, outside every tenant) holds the highest version number a
  deleted tenant used; a tenant created later numbers its versions from above it (see :mod:`.base`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from ..errors import NotFoundError
from .base import DEFAULT_KEEP_VERSIONS, DEFAULT_RETAIN_GRACE_S, StoreBase, VersionInfo, unavailable
from .ids import check_id, check_tenant, safe_join
from .keys import resolve_pepper

_log = logging.getLogger(__name__)
_S = TypeVar("_S", bound="FileBase")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once; on failure remove the temp file and raise."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself must survive a crash
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def info_of(rec: dict) -> VersionInfo:
    """A stored version record (extra keys such as ``superseded`` are ignored) as ``VersionInfo``."""
    return VersionInfo.from_json(json.dumps(rec))


def served_of(rec: dict) -> VersionInfo:
    """The version a pointer (``current.json``) serves: its pin, else the newest."""
    return info_of(rec["pinned"] if rec.get("pinned") else rec)


def remove_quietly(*paths: Path) -> None:
    """Best-effort cleanup: a path that is gone or cannot be removed (read-only disk) is left alone."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)


def os_reason(exc: OSError) -> str:
    """``EROFS: Read-only file system`` -- the errno, never the path (messages reach clients)."""
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return f"{name}: {exc.strerror or exc}"


def writes(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """A write method: an ``OSError`` (read-only or full disk...) becomes a 503 with a retry hint."""

    @functools.wraps(method)
    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            _log.warning("file store %s: %s failed: %r", self.root, method.__name__, exc)
            raise unavailable(f"the adapter store cannot be written ({os_reason(exc)}); retry later") from None

    return wrapper


class FileBase(StoreBase):
    """Root, paths, locks and tenant records; :class:`.file.FileStore` adds adapters and the feed."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        validator=None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        retain_grace_s: float = DEFAULT_RETAIN_GRACE_S,
        poll_interval: float = 0.2,
        pepper: str | None = None,
        url: str | None = None,
    ):
        super().__init__(validator=validator, keep_versions=keep_versions, retain_grace_s=retain_grace_s)
        self.root = Path(os.path.realpath(os.path.expanduser(str(root))))
        for sub in ("tenants", "keys", "locks", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.url = url or f"file://{self.root}"
        self.poll_interval = float(poll_interval)
        self._pepper = resolve_pepper(pepper)

    # paths
    def _tenant_dir(self, tenant: str) -> Path:
        return safe_join(self.root, "tenants", check_tenant(tenant))

    def _adapter_dir(self, tenant: str, prefix_id: str) -> Path:
        return safe_join(self.root, "tenants", check_tenant(tenant), "adapters", check_id(prefix_id))

    def _key_path(self, key_id: str) -> Path:
        return safe_join(self.root, "keys", f"{check_id(key_id, 'key id')}.json")

    @contextlib.contextmanager
    def _lock(self, name: str):
        fd = os.open(safe_join(self.root, "locks", f"{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _tenant_record(self, tenant: str) -> dict:
        rec = read_json(self._tenant_dir(tenant) / "tenant.json")
        if rec is None:
            raise NotFoundError(f"tenant {tenant!r} not found")
        return rec

    def _current_infos(self, tenant: str, *, served: bool = False) -> list[VersionInfo]:
        """The tenant's newest (``served``: served, i.e. pinned ones) versions, by prefix id (the tenant
        is not checked)."""
        root = self._tenant_dir(tenant) / "adapters"
        out = []
        for name in sorted(os.listdir(root)) if root.exists() else []:
            rec = read_json(root / name / "current.json")
            if rec is not None:
                out.append(served_of(rec) if served else info_of(rec))
        return out

    def _usage(self, tenant: str) -> tuple[int, int]:
        infos = self._current_infos(tenant)
        return len(infos), sum(i.size for i in infos)

    # the version floor (under the _global lock)
    def _floor(self) -> int:
        try:
            return int((self.root / "version_floor").read_text() or 0)
        except FileNotFoundError:
            return 0

    def _raise_floor(self, top: int) -> None:
        if top > self._floor():
            write_atomic(self.root / "version_floor", str(top).encode())

    # health
    def ping(self) -> None:
        if not (self.root / "tenants").is_dir():
            raise unavailable(f"store root {self.root} is missing")

    def check_writable(self) -> None:
        """Create, fsync and remove a small file at the root: raises a 503 when the disk takes no writes."""
        self.ping()
        probe = self.root / f".probe.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.remove(probe)
        except OSError as exc:
            remove_quietly(probe)
            raise unavailable(f"the adapter store cannot be written ({os_reason(exc)}); retry later") from None
