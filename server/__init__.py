"""The CredScope gRPC server: settings, interceptors, services, model runtime and backends."""
