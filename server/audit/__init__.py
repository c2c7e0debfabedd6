"""The audit trail: records (what is kept), stores (SQLite embedded, PostgreSQL networked), the spool
(where batches wait while the database is down) and the per-worker writer that ties them together."""
