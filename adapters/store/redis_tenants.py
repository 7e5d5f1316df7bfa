"""The Redis store's tenants, API keys, quotas, rate and training limits (:mod:`.redis_store` adds the adapters).

Rate limits live in the tenant's ``t:<T>`` hash as ``rl_requests_per_s``, ``rl_rows_per_s``,
``rl_burst_s`` and ``rl_max_concurrent``, training limits as ``tl_max_active_jobs``,
``tl_max_dataset_bytes``, ``tl_max_job_s`` and ``tl_max_datasets`` (each set: all four or none; none =
the server's default). One Lua script writes or clears a set, so a reader never sees half of one.
"""

from __future__ import annotations

import builtins
import json
import time
from typing import TYPE_CHECKING

from ..errors import ConflictError, NotFoundError
from .base import (
    Quota,
    TenantInfo,
    check_limits,
    check_training_limits,
    limits_from_dict,
    training_limits_from_dict,
)
from .ids import check_id, check_tenant
from .keys import new_key, parse_api_key, verify
from .redis_common import RedisBase, guard, text

if TYPE_CHECKING:
    from ..ratelimit import RateLimits
    from .jobs import TrainingLimits

_LIMIT_FIELDS = ("requests_per_s", "rows_per_s", "burst_s", "max_concurrent")
_TRAINING_FIELDS = ("max_active_jobs", "max_dataset_bytes", "max_job_s", "max_datasets")


def _limits_of(rec: dict[str, str]) -> RateLimits | None:
    if "rl_requests_per_s" not in rec:
        return None
    values: dict = {name: float(rec[f"rl_{name}"]) for name in _LIMIT_FIELDS[:3]}
    values["max_concurrent"] = int(rec["rl_max_concurrent"])
    return limits_from_dict(values)


def _training_limits_of(rec: dict[str, str]) -> TrainingLimits | None:
    if "tl_max_active_jobs" not in rec:
        return None
    values: dict = {name: int(rec[f"tl_{name}"]) for name in _TRAINING_FIELDS if name != "max_job_s"}
    values["max_job_s"] = float(rec["tl_max_job_s"])
    return training_limits_from_dict(values)


class RedisTenants(RedisBase):
    def _key_script(self, name: str, mode: str, quota: Quota | None = None) -> str | None:
        api_key, record = new_key(name, self._pepper)
        quota = quota or Quota()
        ok = self._scripts["issue_key"](
            keys=[
                self._k("tenants"),
                self._k("t", name),
                self._k("tk", name),
                self._k("k", record["key_id"]),
                self._k("vfloor"),
            ],
            args=[
                name,
                mode,
                json.dumps(record),
                record["key_id"],
                quota.max_adapters,
                quota.max_bytes,
                repr(time.time()),
                self.prefix,
            ],
        )
        return api_key if ok else None

    @guard
    def create_tenant(self, name: str, quota: Quota | None = None) -> str:
        api_key = self._key_script(check_tenant(name), "create", quota)
        if api_key is None:
            raise ConflictError(f"tenant {name!r} already exists")
        return api_key

    @guard
    def rotate_key(self, name: str, *, revoke_old: bool = True) -> str:
        api_key = self._key_script(check_tenant(name), "rotate" if revoke_old else "keep")
        if api_key is None:
            raise NotFoundError(f"tenant {name!r} not found")
        return api_key

    @guard
    def revoke_key(self, name: str, key_id: str | None = None) -> int:
        check_tenant(name)
        n = self._scripts["revoke_keys"](
            keys=[self._k("t", name), self._k("tk", name)],
            args=[self.prefix, "" if key_id is None else check_id(key_id, "key id")],
        )
        if n < 0:
            raise NotFoundError(f"tenant {name!r} not found")
        return int(n)

    @guard
    def set_quota(self, name: str, quota: Quota) -> None:
        done = self._scripts["set_quota"](
            keys=[self._k("t", check_tenant(name))], args=[quota.max_adapters, quota.max_bytes]
        )
        if not done:
            raise NotFoundError(f"tenant {name!r} not found")

    def _set_limit_fields(self, name: str, fields: builtins.list[str], values: builtins.list[str] | None) -> None:
        """Write (``values``) or clear (None) one group of the tenant's limit fields in one atomic step."""
        args = [str(len(fields)), *fields, *(values or [])]
        if not self._scripts["set_limit_fields"](keys=[self._k("t", check_tenant(name))], args=args):
            raise NotFoundError(f"tenant {name!r} not found")

    @guard
    def set_limits(self, name: str, limits: RateLimits | None) -> None:
        limits = check_limits(limits)
        values = None
        if limits is not None:
            values = [repr(float(getattr(limits, f))) for f in _LIMIT_FIELDS[:3]] + [str(int(limits.max_concurrent))]
        self._set_limit_fields(name, [f"rl_{f}" for f in _LIMIT_FIELDS], values)

    @guard
    def set_training_limits(self, name: str, limits: TrainingLimits | None) -> None:
        limits = check_training_limits(limits)
        values = None
        if limits is not None:  # in _TRAINING_FIELDS order
            values = [
                str(limits.max_active_jobs),
                str(limits.max_dataset_bytes),
                repr(float(limits.max_job_s)),
                str(limits.max_datasets),
            ]
        self._set_limit_fields(name, [f"tl_{f}" for f in _TRAINING_FIELDS], values)

    def _tenant_infos(self, names: builtins.list[str]) -> builtins.list[TenantInfo]:
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._k("t", name))
            pipe.hlen(self._k("a", name))
            pipe.smembers(self._k("tk", name))
        res = pipe.execute()
        out = []
        for i, name in enumerate(names):
            raw, count, keys = res[3 * i : 3 * i + 3]
            if not raw:
                continue
            rec = {text(k): text(v) for k, v in raw.items()}
            quota = Quota(int(rec.get("max_adapters", 0)), int(rec.get("max_bytes", 0)))
            out.append(
                TenantInfo(
                    name,
                    quota,
                    int(count),
                    int(rec.get("bytes", 0)),
                    tuple(sorted(text(k) for k in keys)),
                    float(rec.get("created", 0)),
                    _limits_of(rec),
                    _training_limits_of(rec),
                )
            )
        return out

    @guard
    def tenant_info(self, name: str) -> TenantInfo:
        infos = self._tenant_infos([check_tenant(name)])
        if not infos:
            raise NotFoundError(f"tenant {name!r} not found")
        return infos[0]

    @guard
    def list_tenants(self) -> builtins.list[TenantInfo]:
        names = sorted(text(n) for n in self._r.sscan_iter(self._k("tenants"), count=500))
        return self._tenant_infos(names)

    @guard
    def delete_tenant(self, name: str) -> None:
        check_tenant(name)
        # the script purges the tenant's training datasets and jobs too (registered by redis_jobs)
        done = self._scripts["delete_tenant"](
            keys=[
                self._k("tenants"),
                self._k("t", name),
                self._k("a", name),
                self._k("tk", name),
                self._k("seq", name),
                self._k("pend", name),
                self._k("vfloor"),
                self._k("pin", name),
            ],
            args=[name, self.prefix, self.channel],
        )
        if not done:
            raise NotFoundError(f"tenant {name!r} not found")

    @guard
    def authenticate(self, api_key: str) -> str | None:
        parsed = parse_api_key(api_key)
        if parsed is None:
            return None
        key_id, secret = parsed
        rec = self._r.hgetall(self._k("k", key_id))
        return verify(secret, {text(k): text(v) for k, v in rec.items()}, self._pepper)
