"""AdminService's API-key RPCs: CreateApiKey, RevokeApiKey, ListApiKeys, GetApiKeyStats.

The auth interceptor has already checked the admin flag. The clear key appears only in the
CreateApiKey response; logs name keys by their public id.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from credscope.v1 import admin_pb2
from server import context as rc
from server.auth import keys
from server.auth.store import DuplicateKey, KeyStoreError
from server.auth.verifier import KeyStoreUnavailable
from server.errors import InvalidArgument, NotFound, Violation
from server.security import Security

log = logging.getLogger("credscope.auth")

TIER_TO_PROTO = {"free": admin_pb2.TIER_FREE, "pro": admin_pb2.TIER_PRO, "enterprise": admin_pb2.TIER_ENTERPRISE}
PROTO_TO_TIER: dict[int, keys.Tier] = {v: k for k, v in TIER_TO_PROTO.items()}  # type: ignore[misc]


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value.astimezone(UTC))
    return t


def to_proto(record: keys.ApiKeyRecord) -> admin_pb2.ApiKey:
    msg = admin_pb2.ApiKey(key_id=record.key_id, name=record.name, tier=TIER_TO_PROTO[record.tier],
                           admin=record.admin, created_at=_ts(record.created_at))
    if record.revoked_at is not None:
        msg.revoked_at.CopyFrom(_ts(record.revoked_at))
    return msg


def _caller() -> str:
    ctx = rc.current()
    return ctx.principal.key_id if ctx is not None and ctx.principal is not None else "?"


class ApiKeyAdmin:
    def __init__(self, security: Security) -> None:
        self.security = security

    async def create(self, request: admin_pb2.CreateApiKeyRequest) -> admin_pb2.CreateApiKeyResponse:
        violations = []
        problem = keys.check_name(request.name)
        if problem:
            violations.append(Violation("name", problem))
        if request.tier not in PROTO_TO_TIER:
            violations.append(Violation("tier", "set TIER_FREE, TIER_PRO or TIER_ENTERPRISE"))
        if violations:
            raise InvalidArgument(f"CreateApiKeyRequest has {len(violations)} invalid field(s)", violations)
        for _ in range(3):  # a key id collision (2^-64) gets a new id
            record, api_key = keys.generate(request.name, PROTO_TO_TIER[request.tier], request.admin)
            try:
                await self.security.store.create(record)
                break
            except DuplicateKey:
                continue
            except KeyStoreError as e:
                raise KeyStoreUnavailable("the key store is unavailable; retry shortly") from e
        else:
            raise KeyStoreUnavailable("could not store a new key; retry")
        log.info("API key %s created (name %r, tier %s, admin %s) by %s", record.key_id, record.name, record.tier,
                 record.admin, _caller())
        return admin_pb2.CreateApiKeyResponse(key=to_proto(record), api_key=api_key)

    async def revoke(self, request: admin_pb2.RevokeApiKeyRequest) -> admin_pb2.RevokeApiKeyResponse:
        if not request.key_id:
            raise InvalidArgument("key_id is required", [Violation("key_id", "the id of the key to revoke")])
        try:
            record = await self.security.store.revoke(request.key_id, datetime.now(UTC))
        except KeyStoreError as e:
            raise KeyStoreUnavailable("the key store is unavailable; retry shortly") from e
        if record is None:
            raise NotFound(f"no API key with id {request.key_id!r}")
        self.security.verifier.forget(record.key_id)
        log.info("API key %s revoked by %s", record.key_id, _caller())
        return admin_pb2.RevokeApiKeyResponse(key=to_proto(record))

    async def list(self, request: admin_pb2.ListApiKeysRequest) -> admin_pb2.ListApiKeysResponse:
        try:
            records = await self.security.store.list_keys(include_revoked=request.include_revoked)
        except KeyStoreError as e:
            raise KeyStoreUnavailable("the key store is unavailable; retry shortly") from e
        return admin_pb2.ListApiKeysResponse(keys=[to_proto(r) for r in records])

    async def stats(self, request: admin_pb2.GetApiKeyStatsRequest) -> admin_pb2.GetApiKeyStatsResponse:
        try:
            records = await self.security.store.list_keys(include_revoked=True)
            usage = await self.security.usage.usage_24h()
        except KeyStoreError as e:
            raise KeyStoreUnavailable("the key store is unavailable; retry shortly") from e
        rl = self.security.settings.rate_limit
        limits = {"free": rl.free_per_hour, "pro": rl.pro_per_hour, "enterprise": rl.enterprise_per_hour}
        out = {t: admin_pb2.TierStats(tier=TIER_TO_PROTO[t], limit_per_hour=limits[t]) for t in keys.TIERS}
        for r in records:
            if r.active:
                out[r.tier].active_keys += 1
            else:
                out[r.tier].revoked_keys += 1
        for u in usage:
            if u.tier in out:
                out[u.tier].calls_24h += u.calls
                out[u.tier].rate_limited_24h += u.rate_limited
        return admin_pb2.GetApiKeyStatsResponse(tiers=[out[t] for t in keys.TIERS])
