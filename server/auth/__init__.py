"""API-key authentication: the key format, the key store (SQLite or PostgreSQL), the verifying cache and
per-key usage counters."""
