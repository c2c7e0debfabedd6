"""``credscope-keys``: create, list and revoke API keys and show their usage, directly on the key store.

Needs no running server: it applies the migrations and works on the store the servers use
(``--url``, default ``CREDSCOPE_AUTH__KEY_STORE_URL`` or ``sqlite:///credscope.db``). ``create`` prints the
new key once on stdout (so ``export CREDSCOPE_API_KEY=$(credscope-keys create …)`` works) and the record
and a warning on stderr; the store keeps only the key's SHA-256. Servers refuse a revoked key within
``auth.key_cache_seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from server.auth import keys
from server.auth.store import HOUR, KeyStore, KeyStoreError, hour_start, open_key_store
from server.db import redact
from server.settings import Settings


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


async def _create(store: KeyStore, args: argparse.Namespace) -> int:
    record, api_key = keys.generate(args.name, args.tier, args.admin)
    await store.create(record)
    print(api_key, flush=True)
    print(f"Created API key {record.key_id}: name {record.name!r}, tier {record.tier}"
          f"{', ADMIN' if record.admin else ''}.\n"
          "Store the key above now: it is shown only this once (the server keeps only its SHA-256 hash).\n"
          "Send it as x-api-key metadata, e.g.  export CREDSCOPE_API_KEY=<key>; credscope score --example",
          file=sys.stderr)
    return 0


async def _list(store: KeyStore, args: argparse.Namespace) -> int:
    records = await store.list_keys(include_revoked=args.all)
    rows = [(r.key_id, r.name, r.tier, "yes" if r.admin else "", _when(r.created_at), _when(r.revoked_at))
            for r in records]
    print(_table(rows, ("KEY ID", "NAME", "TIER", "ADMIN", "CREATED", "REVOKED")))
    if not records:
        print("(no keys; create one with: credscope-keys create --name NAME --tier free)", file=sys.stderr)
    return 0


async def _revoke(store: KeyStore, args: argparse.Namespace) -> int:
    key_id = keys.key_id_of(args.key_id) or args.key_id  # a whole key is accepted too
    record = await store.revoke(key_id, datetime.now(UTC))
    if record is None:
        print(f"credscope-keys: no API key with id {key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {record.key_id} ({record.name}, {record.tier}) at {_when(record.revoked_at)}; servers refuse "
          "it within seconds")
    return 0


async def _usage(store: KeyStore, args: argparse.Namespace) -> int:
    since = hour_start(datetime.now(UTC).timestamp()) - (args.hours - 1) * HOUR
    usage = await store.usage_since(since)
    names = {r.key_id: r for r in await store.list_keys(include_revoked=True)}
    rows = []
    by_tier: dict[str, list[int]] = {t: [0, 0] for t in keys.TIERS}
    for u in sorted(usage, key=lambda u: -u.calls):
        rec = names.get(u.key_id)
        rows.append((u.key_id, rec.name if rec else "(dev-mode calls without a key)" if u.key_id == "anonymous"
                     else "?", u.tier, u.calls, u.rate_limited))
        t = by_tier.setdefault(u.tier, [0, 0])
        t[0] += u.calls
        t[1] += u.rate_limited
    print(f"usage over the last {args.hours} hour(s) (whole hours, the current one included):")
    print(_table(rows, ("KEY ID", "NAME", "TIER", "CALLS", "RATE LIMITED")))
    print()
    print(_table([(t, c[0], c[1]) for t, c in by_tier.items()], ("TIER", "CALLS", "RATE LIMITED")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="credscope-keys", description="Create, list and revoke CredScope API keys and show their usage, "
                                "directly on the key store (no server needed).",
                                epilog="Keys look like csk_<key id>_<secret>; the key id is public.")
    p.add_argument("--url", help="key store: sqlite:///path.db or postgresql://user@host/db (default: "
                                 "CREDSCOPE_AUTH__KEY_STORE_URL, else sqlite:///credscope.db)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="create a key and print it once",
                       description="Create an API key; prints the key once on stdout.")
    c.add_argument("--name", required=True, help="who or what the key is for (1-100 characters)")
    c.add_argument("--tier", choices=keys.TIERS, default="free", help="service tier, sets the rate limit "
                                                                      "(default free)")
    c.add_argument("--admin", action="store_true", help="grant the admin flag (AdminService RPCs)")
    c.set_defaults(func=_create)
    ls = sub.add_parser("list", help="list keys (never the keys themselves)", description="List API keys.")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    ls.set_defaults(func=_list)
    r = sub.add_parser("revoke", help="revoke a key", description="Revoke an API key by its id.")
    r.add_argument("key_id", help="the key id (the part after csk_), or the whole key")
    r.set_defaults(func=_revoke)
    u = sub.add_parser("usage", help="calls and rate-limit refusals per key and tier",
                       description="Calls and rate-limit refusals per key and per tier, as counted by the servers "
                                   "(each worker adds its counts every auth.usage_flush_seconds).")
    u.add_argument("--hours", type=int, default=24, help="how many hours back (default 24)")
    u.set_defaults(func=_usage)
    return p


async def run(args: argparse.Namespace) -> int:
    store = await open_key_store(args.url)
    try:
        return int(await args.func(store, args))
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.url = args.url or Settings().auth.key_store_url
    if args.command == "create":
        problem = keys.check_name(args.name)
        if problem:
            print(f"credscope-keys: --name {problem}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(run(args))
    except KeyStoreError as e:
        print(f"credscope-keys: {redact(args.url)}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
