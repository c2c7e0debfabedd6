"""gRPC interceptors, one concern each; they run in list order, the first outermost."""
