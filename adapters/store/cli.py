"""Operator sub-commands ``prefixserve store ...`` (adapters) and ``prefixserve tenant ...`` (tenants, keys;
the ``limits`` and ``training-limits`` commands live in :mod:`.limits_cli`).

Both take ``--store URL`` (or env ``PREFIXSERVE_STORE``): ``file:///var/lib/prefixserve``,
``redis://host:6379/0?prefix=ps:``. Output is a table for people, ``--json`` for scripts.
Errors print ``{"error": {"code", "message"}}`` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

_EPILOG = (
    "store URLs: file:///path (one machine), redis://[:password@]host:port/db?prefix=ps: or rediss:// "
    "(shared; password also from PREFIXSERVE_REDIS_PASSWORD). Default: env PREFIXSERVE_STORE."
)


def _open(args):
    from . import open_store

    return open_store(args.store)


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _print(args, data, rows: list[dict], columns: list[str]) -> None:
    """``data`` as JSON with ``--json``, else ``rows`` as a table of ``columns``."""
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(_table(rows, columns) if rows else "(none)")


def _version_row(info) -> dict:
    m = info.meta
    return {
        "id": info.prefix_id,
        "version": info.version,
        "size": info.size,
        "kind": m.get("kind", ""),
        "p": m.get("num_virtual_tokens", ""),
        "labels": ",".join(map(str, m.get("labels", []))),
        "sha256": info.sha256[:12],
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created)),
    }


_VERSION_COLUMNS = ["id", "version", "size", "kind", "p", "labels", "sha256", "created"]


def _store_ls(args) -> int:
    infos = _open(args).list(args.tenant)
    _print(args, [i.to_dict() for i in infos], [_version_row(i) for i in infos], _VERSION_COLUMNS)
    return 0


def _store_versions(args) -> int:
    infos = _open(args).versions(args.tenant, args.id)
    _print(args, [i.to_dict() for i in infos], [_version_row(i) for i in infos], _VERSION_COLUMNS)
    return 0


def _store_push(args) -> int:
    with open(args.file, "rb") as f:
        info = _open(args).put(args.tenant, args.id, f.read())
    _print(args, info.to_dict(), [_version_row(info)], _VERSION_COLUMNS)
    return 0


def _store_pull(args) -> int:
    info, data = _open(args).get(args.tenant, args.id, args.version)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with open(args.output or f"{args.id}.v{info.version}.safetensors", "wb") as f:
            f.write(data)
        print(f"wrote {f.name} ({info.size} bytes, version {info.version}, sha256 {info.sha256})", file=sys.stderr)
    return 0


def _store_rm(args) -> int:
    _open(args).delete(args.tenant, args.id)
    print(f"deleted {args.tenant}/{args.id}", file=sys.stderr)
    return 0


def _quota(args):
    from .base import Quota

    return Quota(args.max_adapters, args.max_bytes)


def _tenant_row(t) -> dict:
    return {
        "tenant": t.name,
        "adapters": t.adapters,
        "bytes": t.bytes,
        "max_adapters": t.quota.max_adapters or "-",
        "max_bytes": t.quota.max_bytes or "-",
        "keys": ",".join(t.key_ids),
    }


def _admin_client(args):
    """``--server URL``: the command goes through the server's admin API (:mod:`prefixserve.client`) instead of
    opening the store. Admin key: env PREFIXSERVE_ADMIN_KEY, else PREFIXSERVE_API_KEY (never a flag: shell
    history and ``ps`` would show it)."""
    import os

    from prefixserve.client import Client

    return Client(args.server, api_key=os.environ.get("PREFIXSERVE_ADMIN_KEY", "").strip() or None)


def _tenant_create(args) -> int:
    if args.server:
        from prefixserve.adapters.errors import BadRequestError

        from .base import Quota

        if _quota(args) != Quota():
            raise BadRequestError(
                "the HTTP API sets no quota: use --store for --max-adapters/--max-bytes", code="bad_args"
            )
        with _admin_client(args) as client:
            key = client.create_tenant(args.name).api_key
    else:
        key = _open(args).create_tenant(args.name, _quota(args))
    print(json.dumps({"tenant": args.name, "api_key": key}) if args.json else key)
    print("this API key is shown once; store it safely", file=sys.stderr)
    return 0


def _tenant_list(args) -> int:
    tenants = _open(args).list_tenants()
    _print(
        args,
        [t.to_dict() for t in tenants],
        [_tenant_row(t) for t in tenants],
        ["tenant", "adapters", "bytes", "max_adapters", "max_bytes", "keys"],
    )
    return 0


def _tenant_rotate(args) -> int:
    if args.server:
        from prefixserve.adapters.errors import BadRequestError

        if args.keep_old:
            raise BadRequestError(
                "the HTTP API always revokes the old keys: use --store for --keep-old", code="bad_args"
            )
        with _admin_client(args) as client:
            key = client.rotate_key(args.name).api_key
    else:
        key = _open(args).rotate_key(args.name, revoke_old=not args.keep_old)
    print(json.dumps({"tenant": args.name, "api_key": key}) if args.json else key)
    print("this API key is shown once" + ("" if args.keep_old else "; the old keys no longer work"), file=sys.stderr)
    return 0


def _tenant_revoke(args) -> int:
    n = _open(args).revoke_key(args.name, args.key_id)
    print(json.dumps({"tenant": args.name, "revoked": n}))
    return 0


def _tenant_quota(args) -> int:
    store = _open(args)
    store.set_quota(args.name, _quota(args))
    t = store.tenant_info(args.name)
    _print(args, t.to_dict(), [_tenant_row(t)], ["tenant", "adapters", "bytes", "max_adapters", "max_bytes"])
    return 0


def _tenant_delete(args) -> int:
    if not args.yes:
        print(f"refusing to delete tenant {args.name!r} and all its adapters without --yes", file=sys.stderr)
        return 2
    if args.server:
        with _admin_client(args) as client:
            client.delete_tenant(args.name)
    else:
        _open(args).delete_tenant(args.name)
    print(f"deleted tenant {args.name}", file=sys.stderr)
    return 0


def _common(tenant: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--store", metavar="URL", help="store URL (default: env PREFIXSERVE_STORE)")
    if tenant:
        p.add_argument("--tenant", "-t", required=True, help="tenant that owns the adapters")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _server_arg(p) -> None:
    p.add_argument(
        "--server",
        metavar="URL",
        help="go through this server's admin API instead of the store (key: env PREFIXSERVE_ADMIN_KEY)",
    )


def _add(sub, name, func, parent, help_text, description=None):
    p = sub.add_parser(name, parents=[parent], help=help_text, description=description or help_text, epilog=_EPILOG)
    p.set_defaults(func=func)
    return p


def _quota_args(p, defaults: bool) -> None:
    from .base import Quota

    d = Quota()
    p.add_argument(
        "--max-adapters",
        type=int,
        default=d.max_adapters if defaults else None,
        required=not defaults,
        help="adapters the tenant may own (0 = unlimited)" + (", default %(default)s" if defaults else ""),
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=d.max_bytes if defaults else None,
        required=not defaults,
        help="total bytes of current versions (0 = unlimited)" + (", default %(default)s" if defaults else ""),
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    store = subparsers.add_parser(
        "store",
        help="list, push, pull and delete tenants' adapters in a store",
        description="Manage adapters in the adapter store. Every push is validated, gets a new immutable "
        "version and becomes current atomically; the last few versions are kept for pull --version.",
        epilog=_EPILOG,
    )
    ssub = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    with_tenant = _common(tenant=True)
    _add(ssub, "ls", _store_ls, with_tenant, "list a tenant's adapters (current versions)")
    p = _add(ssub, "push", _store_push, with_tenant, "validate and publish a packed adapter as a new version")
    p.add_argument("id", help="prefix id, [A-Za-z0-9][A-Za-z0-9._-]{0,127}")
    p.add_argument("file", help="packed .safetensors adapter (see `prefixserve pack`)")
    p = _add(ssub, "pull", _store_pull, with_tenant, "download an adapter (current or --version)")
    p.add_argument("id")
    p.add_argument("-o", "--output", help="file to write, '-' for stdout (default: ID.vN.safetensors)")
    p.add_argument("--version", type=int, help="a kept version instead of the current one")
    p = _add(ssub, "rm", _store_rm, with_tenant, "delete an adapter and all its versions")
    p.add_argument("id")
    p = _add(ssub, "versions", _store_versions, with_tenant, "list the kept versions of an adapter")
    p.add_argument("id")

    tenant = subparsers.add_parser(
        "tenant",
        help="create, list and delete tenants; rotate or revoke their API keys; quotas, rate and training limits",
        description="Manage tenants. API keys (psk_...) are printed once and stored only as a salted "
        "HMAC-SHA256 peppered with PREFIXSERVE_KEY_PEPPER (use the same pepper on every server).",
        epilog=_EPILOG,
    )
    tsub = tenant.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)
    plain = _common(tenant=False)
    p = _add(tsub, "create", _tenant_create, plain, "create a tenant and print its first API key")
    p.add_argument("name", help="tenant name, [A-Za-z0-9][A-Za-z0-9._-]{0,127}")
    _quota_args(p, defaults=True)
    _server_arg(p)
    _add(tsub, "list", _tenant_list, plain, "list tenants with usage, quota and key ids")
    p = _add(tsub, "rotate-key", _tenant_rotate, plain, "issue a new API key (old ones stop working)")
    p.add_argument("name")
    p.add_argument("--keep-old", action="store_true", help="keep the old keys valid (revoke them later)")
    _server_arg(p)
    p = _add(tsub, "revoke-key", _tenant_revoke, plain, "revoke one key (--key-id) or all of a tenant's keys")
    p.add_argument("name")
    p.add_argument("--key-id", help="the 16-hex id after psk_ (default: all keys)")
    p = _add(tsub, "quota", _tenant_quota, plain, "change a tenant's quota")
    p.add_argument("name")
    _quota_args(p, defaults=False)
    from . import limits_cli  # limits, training-limits

    limits_cli.register(tsub, plain)
    p = _add(tsub, "delete", _tenant_delete, plain, "delete a tenant, its keys and all its adapters")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    _server_arg(p)
