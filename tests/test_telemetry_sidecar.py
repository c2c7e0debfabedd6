"""The sidecar end to end: two server workers record into one metrics directory, credscope-telemetry
serves them summed on /metrics (scraped while the workers handle traffic), with drift and performance
gauges from an audit trail, /healthz, and promtool-clean output."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.applicants import applicant_from_mapping
from credscope.v1 import scoring_pb2, scoring_pb2_grpc
from tests.helpers import make_api_key, start_server
from tests.telemetry_data import SHIFTED, audited, population, promtool, sqlite_audit, start_sidecar

GOOD = {
    "name_contract_type": "Cash loans", "amt_income_total": 202500, "amt_credit": 406597.5, "amt_annuity": 24700.5,
    "amt_goods_price": 351000, "name_income_type": "Working", "name_education_type": "Higher education",
    "days_birth": -12000, "days_employed": -2000, "ext_source_2": 0.6, "ext_source_3": 0.5, "cnt_fam_members": 2,
}
SCORE = 'service="credscope.v1.ScoringService",method="Score"'
MAX_CALLS_PER_WORKER = 3000
INVALID_PER_WORKER = 3


def samples(text: str) -> dict[str, float]:
    """``name{label="v",...}`` (labels sorted) -> value, for every sample of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items()
               if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


@pytest.fixture(scope="module")
def stack(model, model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Two server workers sharing a metrics directory, and the sidecar over it and an audit trail that
    holds a shifted population with outcomes."""
    work = tmp_path_factory.mktemp("stack")
    metrics_dir = work / "metrics"
    now = datetime.now(UTC)
    x, y = population(800, seed=301, shift=True)
    audit_url = sqlite_audit(work / "audit.db", audited(model, x, y, now - timedelta(hours=3), timedelta(seconds=5)))
    env = {"CREDSCOPE_AUTH__ALLOW_ANONYMOUS": "true", "CREDSCOPE_TELEMETRY__METRICS_DIR": str(metrics_dir),
           "CREDSCOPE_TELEMETRY__PROCESS_SAMPLE_SECONDS": "0.5", "CREDSCOPE_RATE_LIMIT__FREE_PER_HOUR": "10000000",
           "CREDSCOPE_RATE_LIMIT__PRO_PER_HOUR": "2"}
    workers = [start_server(model_dir, cwd=work, env=env, args=["--workers", "1"]) for _ in range(2)]
    sidecar = start_sidecar(["--metrics-dir", str(metrics_dir), "--audit-url", audit_url, "--model-dir",
                             str(model_dir), "--out", str(work / "reports")],
                            env={"CREDSCOPE_TELEMETRY__PERFORMANCE_MIN_OUTCOMES": "50"})
    yield workers, sidecar, work
    sidecar.stop()
    for w in workers:
        w.stop()


def traffic(target: str, stop: threading.Event, done: list[int], errors: list[BaseException]) -> None:
    """Good Score calls until ``stop`` (at most MAX_CALLS_PER_WORKER; their count goes to ``done``),
    INVALID_PER_WORKER invalid ones, then one BatchScore of 5 (2 invalid)."""
    try:
        with grpc.insecure_channel(target) as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            good = scoring_pb2.ScoreRequest(applicant=applicant_from_mapping(GOOD))
            bad = scoring_pb2.ScoreRequest(applicant=applicant_from_mapping(GOOD))
            bad.applicant.amt_credit = -1
            calls = 0
            for i in range(MAX_CALLS_PER_WORKER):
                stub.Score(good, timeout=10)
                calls += 1
                if i < INVALID_PER_WORKER:
                    try:
                        stub.Score(bad, timeout=10)
                        raise AssertionError("an invalid applicant was scored")
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
                if stop.is_set() and i >= INVALID_PER_WORKER:
                    break
            done.append(calls)
            batch = [applicant_from_mapping(GOOD) for _ in range(5)]
            batch[1].amt_credit = -1
            batch[3].amt_annuity = -1
            stub.BatchScore(scoring_pb2.BatchScoreRequest(applicants=batch), timeout=10)
    except BaseException as e:  # noqa: BLE001 - reported to the test thread
        errors.append(e)


def test_sidecar_sums_the_workers_while_they_serve(stack, model) -> None:  # type: ignore[no-untyped-def]
    workers, sidecar, _ = stack
    stop, done, errors = threading.Event(), [], []
    threads = [threading.Thread(target=traffic, args=(w.target, stop, done, errors)) for w in workers]
    for t in threads:
        t.start()
    scrapes = []
    deadline = time.monotonic() + 60
    try:  # scrape while both workers serve: five scrapes, or as many as the bounded traffic allows
        while len(scrapes) < 5 and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            status, text = sidecar.get("/metrics")
            assert status == 200
            scrapes.append(samples(text))  # every scrape during traffic parses
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert len(scrapes) >= 2 and len(done) == 2
    ok_counts = [total(m, "credscope_grpc_requests_total", method="Score", code="OK") for m in scrapes]
    assert ok_counts == sorted(ok_counts) and ok_counts[-1] > 0  # counters only grow while the workers serve

    n_ok = sum(done)
    scored = n_ok + 2 * 3
    # Workers write their buffered metrics every 0.25 s, series by series (a scrape can land between a
    # worker's counters and its histograms): wait (bounded) until every final figure is in, then check them.
    def figures(m: dict[str, float]) -> dict[str, float]:
        return {
            "Score OK": total(m, "credscope_grpc_requests_total", method="Score", code="OK"),
            "Score INVALID_ARGUMENT": total(m, "credscope_grpc_requests_total", method="Score",
                                            code="INVALID_ARGUMENT"),
            "BatchScore OK": total(m, "credscope_grpc_requests_total", method="BatchScore", code="OK"),
            "Score durations": total(m, "credscope_grpc_request_duration_seconds_count", method="Score"),
            "Score OK durations": total(m, "credscope_grpc_request_duration_seconds_bucket", method="Score",
                                        code="OK", le="+Inf"),
            "predictions": total(m, "credscope_predictions_total"),
            "probabilities": total(m, "credscope_default_probability_count"),
            "invalid-argument errors": total(m, "credscope_prediction_errors_total", type="invalid_argument"),
            # Every scored row went through the prediction cache: a hit, or a miss that the model scored.
            "cache lookups": total(m, "credscope_cache_hits_total", cache="prediction")
            + total(m, "credscope_cache_misses_total", cache="prediction"),
            "rows inferred - cache misses": total(m, "credscope_inference_rows_total")
            - total(m, "credscope_cache_misses_total", cache="prediction"),
        }

    expected = {"Score OK": n_ok, "Score INVALID_ARGUMENT": 2 * INVALID_PER_WORKER, "BatchScore OK": 2,
                "Score durations": n_ok + 2 * INVALID_PER_WORKER, "Score OK durations": n_ok,
                "predictions": scored, "probabilities": scored,
                "invalid-argument errors": 2 * (INVALID_PER_WORKER + 2), "cache lookups": scored,
                "rows inferred - cache misses": 0}
    deadline = time.monotonic() + 15
    while True:
        m = samples(sidecar.get("/metrics")[1])
        if figures(m) == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert figures(m) == expected
    assert total(m, "credscope_cache_hits_total", cache="prediction") > 0
    assert 0 < total(m, "credscope_inference_duration_seconds_count") <= n_ok + 2
    assert total(m, "credscope_server_workers") == 2
    assert len([k for k in m if k.startswith("credscope_process_resident_memory_bytes{")]) == 2
    assert total(m, "credscope_process_cpu_seconds_total") > 0
    loaded = {k: v for k, v in m.items() if k.startswith("credscope_model_loaded{")}
    assert loaded == {f'credscope_model_loaded{{version="{model.version}"}}': 1.0}
    # Health checks are left out of the request metrics.
    assert total(m, "credscope_grpc_requests_total", service="grpc.health.v1.Health") == 0


def test_metrics_pass_promtool(stack) -> None:  # type: ignore[no-untyped-def]
    tool = promtool()
    _, sidecar, _ = stack
    _, text = sidecar.get("/metrics")
    proc = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == ""  # not even a lint warning


def test_drift_and_performance_gauges_and_reports(stack, model) -> None:  # type: ignore[no-untyped-def]
    _, sidecar, work = stack
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = samples(sidecar.get("/metrics")[1])
        if total(m, "credscope_telemetry_job_runs_total", job="drift") and \
                total(m, "credscope_telemetry_job_runs_total", job="performance"):
            break
        time.sleep(0.2)
    assert total(m, "credscope_telemetry_job_failures_total") == 0, sidecar.log()
    for name in SHIFTED:
        assert m[f'credscope_drift_psi{{feature="{name}"}}'] >= 0.2
        assert m[f'credscope_drift_ks_pvalue{{feature="{name}"}}'] < 1e-6
    assert m['credscope_drift_psi{feature="DAYS_BIRTH"}'] < 0.1
    assert m["credscope_drift_window_rows"] == 800
    assert m['credscope_drift_features{severity="significant"}'] >= 2
    label = f'{{model_version="{model.version}"}}'
    assert 0.5 < m[f"credscope_model_auc{label}"] <= 1.0
    assert m[f"credscope_model_holdout_auc{label}"] == pytest.approx(model.metadata["metrics"]["roc_auc"])
    assert m[f"credscope_model_outcomes{label}"] == 800
    assert f"credscope_model_auc_degradation_ratio{label}" in m
    for f in ("drift.json", "drift.png", "performance.json", "performance.png"):
        assert (work / "reports" / f).stat().st_size > 0


def test_rate_limit_rejections_and_key_usage_by_tier(stack) -> None:  # type: ignore[no-untyped-def]
    workers, sidecar, work = stack
    key = make_api_key(work, tier="pro", admin=False, name="metrics-test")  # pro: 2 calls an hour here
    refused = 0
    with grpc.insecure_channel(workers[0].target) as ch:
        stub = scoring_pb2_grpc.ScoringServiceStub(ch)
        for _ in range(4):
            try:
                stub.Score(scoring_pb2.ScoreRequest(applicant=applicant_from_mapping(GOOD)), timeout=10,
                           metadata=[("x-api-key", key)])
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1
    assert refused == 2
    deadline = time.monotonic() + 15
    while True:
        m = samples(sidecar.get("/metrics")[1])
        if total(m, "credscope_ratelimit_rejections_total") >= refused or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert total(m, "credscope_ratelimit_rejections_total", tier="pro") == refused
    assert total(m, "credscope_api_key_requests_total", tier="pro") == 4
    assert total(m, "credscope_grpc_requests_total", code="RESOURCE_EXHAUSTED") == refused
    assert total(m, "credscope_prediction_errors_total", type="resource_exhausted") == 0  # not a prediction error


def test_healthz_and_dead_workers(stack) -> None:  # type: ignore[no-untyped-def]
    workers, sidecar, _ = stack
    status, body = sidecar.get("/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["live_workers"] == 2
    assert sidecar.get("/nothing")[0] == 404
    before = samples(sidecar.get("/metrics")[1])
    calls = total(before, "credscope_grpc_requests_total")

    workers[0].stop()  # SIGTERM: the worker marks itself dead on the way out
    after = samples(sidecar.get("/metrics")[1])
    assert total(after, "credscope_server_workers") == 1
    assert total(after, "credscope_grpc_requests_total") == calls  # its counts stay in the totals

    workers[1].stop(sig=signal.SIGKILL)  # no clean-up: the sidecar notices the pid is gone
    after = samples(sidecar.get("/metrics")[1])
    assert total(after, "credscope_server_workers") == 0
    assert not [k for k in after if k.startswith("credscope_process_resident_memory_bytes{")]
    assert total(after, "credscope_grpc_requests_total") == calls
    assert json.loads(sidecar.get("/healthz")[1])["live_workers"] == 0
