"""Token-bucket rate limiting: bucket stores (Redis shared by replicas; a host-local shared-memory table
exact across the workers of one host), the Redis→local failover, and the per-tier limiter."""
