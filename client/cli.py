"""``credscope``: score applicants from JSON or CSV against a CredScope server, and inspect it."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.applicants import ApplicantFormatError, applicant_from_mapping
from client.client import DEFAULT_TARGET, CredScopeClient, CredScopeRpcError
from credscope.v1 import scoring_pb2

EXAMPLE = {
    "name_contract_type": "Cash loans", "amt_income_total": 202500, "amt_credit": 406597.5,
    "amt_annuity": 24700.5, "amt_goods_price": 351000, "name_income_type": "Working",
    "name_education_type": "Secondary / secondary special", "days_birth": -9461, "days_employed": -637,
    "ext_source_2": 0.2629, "ext_source_3": 0.1394,
}


def _open(path: str) -> TextIO:
    return sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115


def read_json(path: str) -> list[Mapping[str, Any]]:
    """A JSON object, a JSON array of objects, or JSON lines."""
    with _open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise SystemExit(f"credscope: {path} is neither JSON nor JSON lines: {e}") from None
    items = data if isinstance(data, list) else [data]
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise SystemExit(f"credscope: item {i} of {path} is not a JSON object")
    return items


def read_csv(path: str) -> Iterator[Mapping[str, Any]]:
    with _open(path) as f:
        yield from csv.DictReader(f)


def _chunks(items: list[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)


def format_score(r: Any) -> str:
    decision = _enum_name(scoring_pb2.Decision, r.decision, "DECISION_")
    risk = _enum_name(scoring_pb2.RiskLevel, r.risk_level, "RISK_LEVEL_")
    lines = [f"decision     {decision}", f"probability  {r.default_probability:.4f}", f"risk level   {risk}",
             f"confidence   {r.confidence:.2f}", f"model        {r.model_version}", f"request id   {r.request_id}",
             f"from cache   {'yes' if r.from_cache else 'no'}"]
    if hasattr(r, "processing_time_ms"):
        lines.append(f"server time  {r.processing_time_ms:.2f} ms")
    for reason in r.reasons:
        lines.append(f"reason       {reason.code}: {reason.text}")
    if r.HasField("explanation"):
        lines.append(f"explanation  base value {r.explanation.base_value:+.4f} (log-odds)")
        for c in r.explanation.contributions:
            value = f"{c.value:.4g}" if c.HasField("value") else "missing"
            arrow = "raises" if c.direction == scoring_pb2.DIRECTION_INCREASES_RISK else "lowers"
            lines.append(f"  {c.feature:<28} {value:>12}  {c.shap_value:+.4f}  {arrow} risk")
    return "\n".join(lines)


def merge_portfolios(parts: list[Any]) -> scoring_pb2.PortfolioMetrics:
    """The portfolio metrics of several BatchScore calls as one: counts, value and expected defaults add up,
    the rates are recomputed (the server's formulas); the loan parameters are the first call's."""
    total = scoring_pb2.PortfolioMetrics()
    for p in parts:
        total.total_applications += p.total_applications
        total.approved += p.approved
        total.review += p.review
        total.rejected += p.rejected
        total.expected_portfolio_value += p.expected_portfolio_value
        total.expected_defaults += p.expected_defaults
        for name in ("very_low", "low", "medium", "high", "very_high"):
            setattr(total.risk_distribution, name,
                    getattr(total.risk_distribution, name) + getattr(p.risk_distribution, name))
    if parts:
        total.loan_parameters.CopyFrom(parts[0].loan_parameters)
    if total.total_applications:
        total.approval_rate = total.approved / total.total_applications
    if total.approved:
        total.expected_default_rate = total.expected_defaults / total.approved
        total.expected_value_per_approval = total.expected_portfolio_value / total.approved
    return total


def format_portfolio(p: Any) -> str:
    r = p.risk_distribution
    return "\n".join([
        f"portfolio    {p.total_applications} scored: {p.approved} APPROVE, {p.review} REVIEW, {p.rejected} REJECT "
        f"(approval rate {p.approval_rate:.1%})",
        f"expected     value {p.expected_portfolio_value:,.0f} ({p.expected_value_per_approval:,.0f} per approval), "
        f"defaults {p.expected_defaults:.1f} ({p.expected_default_rate:.1%} of approvals)",
        f"risk levels  very low {r.very_low}, low {r.low}, medium {r.medium}, high {r.high}, very high {r.very_high}",
    ])


def cmd_score(args: argparse.Namespace, client: CredScopeClient) -> int:
    if args.example:
        rows: list[Mapping[str, Any]] = [EXAMPLE]
    elif args.csv:
        rows = list(read_csv(args.csv))
    elif args.json:
        rows = read_json(args.json)
    else:
        raise SystemExit("credscope score: give --json FILE, --csv FILE or --example (FILE may be - for stdin)")
    try:
        applicants = [applicant_from_mapping(r) for r in rows]
    except ApplicantFormatError as e:
        raise SystemExit(f"credscope score: {e}") from None
    if not applicants:
        raise SystemExit("credscope score: no applicants in the input")
    if len(applicants) == 1 and not args.csv:
        resp = client.score(applicants[0], request_id=args.request_id or "", explain=args.explain, top_k=args.top_k)
        print(json_format.MessageToJson(resp) if args.output == "json" else format_score(resp))
        return 0
    failures = 0
    out: list[dict[str, Any]] = []
    portfolios = []
    total = len(applicants)
    for start, chunk in _chunks(applicants, args.batch_size):
        batch = client.batch_score(chunk, explain=args.explain, top_k=args.top_k)
        portfolios.append(batch.portfolio)
        for result in batch.results:
            idx = start + result.index
            if result.HasField("error"):
                failures += 1
                out.append({"row": idx, "error": json_format.MessageToDict(result.error)})
            else:
                out.append({"row": idx, **json_format.MessageToDict(result.prediction)})
        if total > args.batch_size:
            print(f"scored {min(start + len(chunk), total)}/{total}", file=sys.stderr)
    portfolio = merge_portfolios(portfolios)
    if args.output == "json":
        print(json.dumps({"results": out, "portfolio": json_format.MessageToDict(portfolio)}, indent=2))
    else:
        print(f"{'row':>5}  {'decision':<8} {'prob':>7}  {'risk':<10} {'conf':>5}  request id")
        for r in out:
            if "error" in r:
                problems = "; ".join(f"{v['field']}: {v['description']}" for v in r["error"].get("fieldViolations", []))
                print(f"{r['row']:>5}  ERROR    {problems or r['error'].get('message', '')}")
            else:
                print(f"{r['row']:>5}  {r['decision'].removeprefix('DECISION_'):<8} "
                      f"{r.get('defaultProbability', 0):>7.4f}  {r['riskLevel'].removeprefix('RISK_LEVEL_'):<10} "
                      f"{r.get('confidence', 0):>5.2f}  {r['requestId']}")
        print(format_portfolio(portfolio))
    print(f"{total - failures} scored, {failures} rejected as invalid", file=sys.stderr)
    return 1 if failures else 0


def cmd_model_info(args: argparse.Namespace, client: CredScopeClient) -> int:
    info = client.model_info()
    if args.output == "json":
        print(json_format.MessageToJson(info))
        return 0
    print(f"model version  {info.model_version}  (trained on {info.training_source or '?'})")
    print(f"policy         APPROVE < {info.policy.approve_below}, REVIEW < {info.policy.review_below}, else REJECT")
    print("metrics        " + ", ".join(f"{k} {v:.0f}" if float(v).is_integer() else f"{k} {v:.4g}"
                                         for k, v in sorted(info.metrics.items())))
    print(f"inputs         {len(info.input_features)}: {', '.join(info.input_features)}")
    print(f"features       {len(info.model_features)} (inputs + engineered)")
    for v in info.versions:
        print(f"  {'*' if v.active else ' '} {v.version}  auc {v.roc_auc:.4f}")
    return 0


def cmd_health(args: argparse.Namespace, client: CredScopeClient) -> int:
    stub = health_pb2_grpc.HealthStub(client.channel)
    try:
        resp = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"{e.code().name}: {e.details()}")
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="credscope", description="Score loan applicants with a CredScope server.")
    p.add_argument("--target", default=os.environ.get("CREDSCOPE_TARGET", DEFAULT_TARGET),
                   help=f"server address (env CREDSCOPE_TARGET, default {DEFAULT_TARGET})")
    p.add_argument("--api-key", default=os.environ.get("CREDSCOPE_API_KEY"),
                   help="API key (env CREDSCOPE_API_KEY; prefer the variable: flags show in process lists)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per call in seconds (default 10)")
    p.add_argument("--tls", action="store_true", default=bool(os.environ.get("CREDSCOPE_TLS")),
                   help="connect over TLS, trusting the system's root certificates (env CREDSCOPE_TLS=1); "
                        "implied by --tls-ca")
    p.add_argument("--tls-ca", metavar="FILE", default=os.environ.get("CREDSCOPE_TLS_CA"),
                   help="connect over TLS, trusting this CA certificate file (PEM) (env CREDSCOPE_TLS_CA)")
    p.add_argument("--tls-cert", metavar="FILE", default=os.environ.get("CREDSCOPE_TLS_CERT"),
                   help="client certificate (PEM) for servers that require mutual TLS (env CREDSCOPE_TLS_CERT)")
    p.add_argument("--tls-key", metavar="FILE", default=os.environ.get("CREDSCOPE_TLS_KEY"),
                   help="private key of --tls-cert (PEM) (env CREDSCOPE_TLS_KEY)")
    p.add_argument("--output", choices=("table", "json"), default="table", help="output format")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score applicants from JSON or CSV",
                       description="Score one applicant (a JSON object) or many (a JSON array, JSON lines or a CSV "
                                   "with Home Credit column names). Exit code 1 if any applicant was invalid.")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--json", metavar="FILE", help="JSON object, array or JSON lines ('-' for stdin)")
    src.add_argument("--csv", metavar="FILE", help="CSV with Home Credit column names ('-' for stdin)")
    src.add_argument("--example", action="store_true", help="score a built-in example applicant")
    s.add_argument("--explain", action="store_true", help="ask for SHAP explanations")
    s.add_argument("--top-k", type=int, default=0, help="contributions to show (default 10)")
    s.add_argument("--request-id", help="request id for a single applicant")
    s.add_argument("--batch-size", type=int, default=500, help="applicants per BatchScore call (default 500)")
    s.set_defaults(func=cmd_score)
    m = sub.add_parser("model-info", help="show the serving model", description="Show the serving model.")
    m.set_defaults(func=cmd_model_info)
    h = sub.add_parser("health", help="check the server's health", description="gRPC health check.")
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    h.set_defaults(func=cmd_health)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        client = CredScopeClient(args.target, api_key=args.api_key, timeout=args.timeout, tls=args.tls,
                                 tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
    except OSError as e:
        print(f"credscope: cannot read a TLS file: {e}", file=sys.stderr)
        return 2
    with client:
        try:
            return int(args.func(args, client))
        except CredScopeRpcError as e:
            print(f"credscope: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # output piped into head & co.
            sys.stderr.close()
            return 0


if __name__ == "__main__":
    sys.exit(main())
