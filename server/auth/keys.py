"""API keys: format, generation and hashing. The clear key exists only in the caller's hands.

A key reads ``csk_<key_id>_<secret>``: ``csk_`` marks it as a CredScope key (so secret scanners and
people recognise it), ``key_id`` (16 hex digits) is public — the store's lookup key and the prefix shown in
listings — and ``secret`` is 32 random bytes from :mod:`secrets` (URL-safe base64). The store keeps the
SHA-256 of the whole key; verification compares digests with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

Tier = Literal["free", "pro", "enterprise"]
TIERS: tuple[Tier, ...] = ("free", "pro", "enterprise")
PREFIX = "csk_"
KEY_RE = re.compile(r"^csk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
NAME_MAX = 100


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """What the store keeps of a key: never the key itself."""

    key_id: str
    key_hash: str
    name: str
    tier: Tier
    admin: bool
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def display(self) -> str:
        """How listings show the key: its public prefix."""
        return f"{PREFIX}{self.key_id}_…"


def hash_key(api_key: str) -> str:
    """Hex SHA-256 of the whole key (what the store keeps)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def key_id_of(api_key: str) -> str | None:
    """The key id of a well-formed key, else None (the key is then not worth a store lookup)."""
    m = KEY_RE.match(api_key)
    return m.group(1) if m else None


def matches(api_key: str, record: ApiKeyRecord) -> bool:
    """Whether ``api_key`` is the key ``record`` was made from (constant-time digest comparison)."""
    return hmac.compare_digest(hash_key(api_key), record.key_hash)


def check_name(name: str) -> str | None:
    """What is wrong with a key name, or None."""
    if not name.strip():
        return "must not be empty"
    if len(name) > NAME_MAX:
        return f"must be at most {NAME_MAX} characters, got {len(name)}"
    if any(ord(c) < 32 for c in name):
        return "must not contain control characters"
    return None


def generate(name: str, tier: Tier, admin: bool = False, *, now: datetime | None = None
             ) -> tuple[ApiKeyRecord, str]:
    """A new key: its record (to store) and the clear key (to show once)."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    problem = check_name(name)
    if problem:
        raise ValueError(f"name {problem}")
    key_id = secrets.token_hex(8)
    api_key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKeyRecord(key_id=key_id, key_hash=hash_key(api_key), name=name.strip(), tier=tier, admin=admin,
                          created_at=(now or datetime.now(UTC)))
    return record, api_key
