"""``file:///path``: the embedded default store (one machine; many processes may share it).

Layout under the root (every name passed ``check_id``; every path re-checked with ``safe_join``)::

    tenants/<T>/tenant.json                    quota, rate limits, key ids, created, version base
    tenants/<T>/adapters/<I>/current.json      the pointer: VersionInfo of the newest version, plus
                                               ``pinned``: the record of a pinned version (if any)
    tenants/<T>/adapters/<I>/seq               last version number (kept after a delete)
    tenants/<T>/adapters/<I>/v/<n>.bin|.json   immutable blobs and their records
    tenants/<T>/adapters/<I>/v/<n>.gone.<ms>   empty marker: retention dropped <n> at <ms> (unix)
    keys/<key id>.json                         salted + peppered key hash -> tenant
    version_floor                              highest version a deleted tenant used
    locks/<T>.lock, locks/_global.lock         ``fcntl.flock`` (outside the tenant dir, so a
                                               deleted and recreated tenant shares its lock)

Publish = counter, blob, record (temp file, fsync, ``os.replace`` each), then the pointer the same
way: a reader sees the old or the new ``current.json``, and blobs never change once named. The pin
lives inside ``current.json`` so that one read gives the served version, and ``pin``/``unpin``/``put``
replace the whole file under the tenant's lock: a pin and the pointer can never disagree. Writers
of one tenant serialise on its lock file, so the quota check and the publish are one atomic step.
A put that fails part-way removes what it wrote; whatever it could not remove (a disk that just
turned read-only) stays invisible -- ``get``/``versions`` never show a version above the current
one -- and the next put of that id deletes it. Retention marks old versions ``gone`` (one listdir
reads every marker) and the next puts delete them once ``retain_grace_s`` has passed. The change
feed polls ``current.json`` inode/mtime every ``poll_interval`` seconds (no inotify). Tenants and
keys: :mod:`.file_tenants`; training datasets and jobs (``tenants/<T>/datasets/``, ``jobs/``): :mod:`.file_jobs`.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from ..errors import NotFoundError
from .base import ChangeEvent, Quota, VersionHistory, VersionInfo
from .file_base import info_of, read_json, remove_quietly, served_of, write_atomic, writes
from .file_jobs import FileJobs
from .file_tenants import FileTenants
from .ids import check_version

_MISSING = "adapter {!r} not found"
_NO_VERSION = "version {} of adapter {!r} not found"
_log = logging.getLogger(__name__)


class FileStore(FileJobs, FileTenants):
    def __init__(self, root: str | os.PathLike, **opts):
        super().__init__(root, **opts)
        self._feed_thread: threading.Thread | None = None

    # adapters
    @writes
    def put(self, tenant: str, prefix_id: str, data: bytes) -> VersionInfo:
        adir = self._adapter_dir(tenant, prefix_id)
        meta = self._validate(data)  # before anything is written
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock(tenant):
            rec = self._tenant_record(tenant)
            quota = Quota(**rec["quota"])
            count, used = self._usage(tenant)
            old = read_json(adir / "current.json")
            old_size = int(old["size"]) if old else 0
            quota.check(tenant, count + (0 if old else 1), used - old_size + len(data))
            (adir / "v").mkdir(parents=True, exist_ok=True)
            versions = self._scan(adir)  # what v/ holds before this put (read once)
            version = self._next_version(adir, int(rec.get("version_base", 0)), versions)
            write_atomic(adir / "seq", str(version).encode())  # first: a number is never handed out twice
            info = VersionInfo(tenant, prefix_id, version, digest, len(data), meta, time.time())
            blob, record = adir / "v" / f"{version}.bin", adir / "v" / f"{version}.json"
            try:
                write_atomic(blob, data)
                write_atomic(record, info.to_json().encode())
                write_atomic(adir / "current.json", info.to_json().encode())  # the publish
            except BaseException:
                now = read_json(adir / "current.json")
                if not (now and int(now["version"]) == version):  # published after all (a late fsync failed)
                    remove_quietly(record, blob)  # record first: nothing lists a blob-less version
                    raise
            try:  # the version pinned until now survives this put's retention (roll back to it again)
                protect = int(old["pinned"]["version"]) if old and old.get("pinned") else 0
                self._collect(adir, int(old["version"]) if old else 0, versions, protect)
            except (OSError, ValueError) as exc:  # published: the next put collects again
                _log.warning("file store: collecting old versions of %s/%s failed: %r", tenant, prefix_id, exc)
        return info

    @staticmethod
    def _next_version(adir: Path, base: int, versions: dict[int, float | None]) -> int:
        """Above the counter, above any blob on disk, above the tenant's base (a deleted namesake's numbers)."""
        try:
            seq = int((adir / "seq").read_text())
        except (FileNotFoundError, ValueError):
            seq = 0
        return max([seq, base, *versions]) + 1

    def _collect(self, adir: Path, previous: int, versions: dict[int, float | None], protect: int = 0) -> None:
        """Under the tenant lock, after a put replaced ``previous`` (0: none); ``versions``: ``_scan``
        from before the put (so without the new current version).

        Versions between the two never became current (failed puts): deleted. Of the published
        ones the newest ``keep_versions`` are kept (and ``protect``, the pin this put cleared); older
        ones get a ``gone`` marker and are deleted once ``retain_grace_s`` has passed since.
        """
        now = time.time()
        kept: list[int] = []
        for v, gone in versions.items():
            if v > previous or not previous:  # no previous: the id was new or deleted, nothing is published
                self._remove_version(adir, v)
            elif gone is None:
                kept.append(v)
            elif now - gone >= self.retain_grace_s:
                self._remove_version(adir, v)
        for v in sorted(kept)[: max(0, len(kept) + 1 - self.keep_versions)]:  # + 1: the current one
            if v == protect:
                continue
            if self.retain_grace_s <= 0:
                self._remove_version(adir, v)
            else:  # not fsynced: a marker lost in a crash only re-marks the version on the next put
                os.close(os.open(adir / "v" / f"{v}.gone.{int(now * 1000)}", os.O_WRONLY | os.O_CREAT, 0o600))

    @staticmethod
    def _remove_version(adir: Path, v: int) -> None:
        """The record first (versions() never lists a blob-less version), then the blob, then markers."""
        markers = [p.name for p in (adir / "v").glob(f"{v}.gone.*")]
        for name in [f"{v}.json", f"{v}.bin", *markers]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(adir / "v" / name)

    @staticmethod
    def _scan(adir: Path) -> dict[int, float | None]:
        """Every version with a file in ``v/`` -> when retention dropped it (None: kept), from one listdir."""
        try:
            names = os.listdir(adir / "v")
        except FileNotFoundError:
            return {}
        out: dict[int, float | None] = {}
        for name in names:
            number, _, rest = name.partition(".")
            if not number.isdigit():
                continue  # temp files: ".<name>.<hex>.tmp"
            v = int(number)
            out.setdefault(v, None)
            if rest.startswith("gone.") and rest[5:].isdigit():
                out[v] = int(rest[5:]) / 1000
        return out

    def _pointer(self, adir: Path, prefix_id: str) -> dict:
        rec = read_json(adir / "current.json")
        if rec is None:
            raise NotFoundError(_MISSING.format(prefix_id))
        return rec

    def _kept_record(self, adir: Path, prefix_id: str, newest: int, version: int) -> dict:
        """The record of a kept version (published, not dropped by retention), else ``NotFoundError``."""
        rec = None
        # > newest: unpublished; _scan maps a kept version to None, one in its grace window to a time
        if version <= newest and version in (scan := self._scan(adir)) and scan[version] is None:
            rec = read_json(adir / "v" / f"{version}.json")
        if rec is None:
            raise NotFoundError(_NO_VERSION.format(version, prefix_id))
        return rec

    def head(self, tenant: str, prefix_id: str, version: int | None = None) -> VersionInfo:
        adir = self._adapter_dir(tenant, prefix_id)
        rec = self._pointer(adir, prefix_id)
        if version is None:
            return served_of(rec)
        return info_of(self._kept_record(adir, prefix_id, int(rec["version"]), check_version(version)))

    def get(self, tenant: str, prefix_id: str, version: int | None = None) -> tuple[VersionInfo, bytes]:
        """The served version, or ``version`` if it is kept or within its grace window.

        The returned ``VersionInfo`` describes the returned bytes: a blob whose sha256 does not match
        its record is reported as ``NotFoundError`` (and logged), never served.
        """
        adir = self._adapter_dir(tenant, prefix_id)
        v = None if version is None else check_version(version)
        missing = _MISSING.format(prefix_id) if v is None else _NO_VERSION.format(v, prefix_id)
        for _ in range(8):  # the pointer may move on and its old blob be collected between two reads
            pointer = self._pointer(adir, prefix_id)
            if v is None:
                info = served_of(pointer)
            else:  # > newest: unpublished
                rec = read_json(adir / "v" / f"{v}.json") if v <= int(pointer["version"]) else None
                if rec is None:
                    raise NotFoundError(missing)
                info = info_of(rec)
            try:
                data = (adir / "v" / f"{info.version}.bin").read_bytes()
            except FileNotFoundError:
                if v is not None:
                    raise NotFoundError(missing) from None
                continue
            if info.matches(data):
                return info, data
            _log.error("file store: blob of %s/%s v%d does not match its record", tenant, prefix_id, info.version)
            if v is not None:
                raise NotFoundError(missing)
        raise NotFoundError(missing)

    def list(self, tenant: str) -> list[VersionInfo]:
        self._tenant_record(tenant)
        return self._current_infos(tenant, served=True)

    # builtins.list: in this class body ``list`` names the method above
    def versions(self, tenant: str, prefix_id: str) -> builtins.list[VersionInfo]:
        """The kept versions (not those in their grace window, not unpublished leftovers), oldest first."""
        return builtins.list(self.history(tenant, prefix_id).versions)

    def history(self, tenant: str, prefix_id: str) -> VersionHistory:
        adir = self._adapter_dir(tenant, prefix_id)
        rec = self._pointer(adir, prefix_id)
        newest = int(rec["version"])
        out = []
        for v, gone in sorted(self._scan(adir).items()):
            found = read_json(adir / "v" / f"{v}.json") if v <= newest and gone is None else None
            if found is not None:
                out.append(info_of(found))
        return VersionHistory(info_of(rec), info_of(rec["pinned"]) if rec.get("pinned") else None, tuple(out))

    @writes
    def pin(self, tenant: str, prefix_id: str, version: int) -> VersionInfo:
        """Serve kept ``version`` instead of the newest until ``unpin`` or the next put."""
        adir = self._adapter_dir(tenant, prefix_id)
        v = check_version(version)
        with self._lock(tenant):
            rec = self._pointer(adir, prefix_id)
            rec["pinned"] = self._kept_record(adir, prefix_id, int(rec["version"]), v)
            write_atomic(adir / "current.json", json.dumps(rec).encode())
        return info_of(rec["pinned"])

    @writes
    def unpin(self, tenant: str, prefix_id: str) -> VersionInfo:
        """Serve the newest version again (no pin: nothing changes); returns it."""
        adir = self._adapter_dir(tenant, prefix_id)
        with self._lock(tenant):
            rec = self._pointer(adir, prefix_id)
            if rec.pop("pinned", None) is not None:
                write_atomic(adir / "current.json", json.dumps(rec).encode())
        return info_of(rec)

    @writes
    def delete(self, tenant: str, prefix_id: str) -> None:
        adir = self._adapter_dir(tenant, prefix_id)
        with self._lock(tenant):
            try:
                os.remove(adir / "current.json")  # unpublish first: readers now get NotFound
            except FileNotFoundError:
                raise NotFoundError(_MISSING.format(prefix_id)) from None
            shutil.rmtree(adir / "v", ignore_errors=True)  # no grace: a deleted id answers 404 anyway

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
                    rec = read_json(self.root / "tenants" / key[0] / "adapters" / key[1] / "current.json")
                    self._emit(ChangeEvent(key[0], key[1], served_of(rec).version if rec else None))
            for key in before.keys() - now.keys():
                self._emit(ChangeEvent(key[0], key[1], None))
            before = now
