"""The telemetry sidecar: metrics, traces, drift, performance, alerts."""
