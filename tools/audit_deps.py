"""``python -m tools.audit_deps``: pip-audit over the installed dependencies, failing on high severity.

pip-audit asks PyPI's JSON API (``/pypi/<name>/<version>/json``) for the known vulnerabilities of every
installed distribution (the editable ``credscope`` itself is skipped). pip-audit reports no severity, so
each vulnerability found is looked up in OSV (``api.osv.dev``) by its id and aliases: the GitHub
advisory's rating (``database_specific.severity``: LOW, MODERATE, HIGH, CRITICAL) or, failing that, the
highest CVSS v3 base score (≥ 7.0 is HIGH). HIGH and CRITICAL fail the run; so does a vulnerability whose
severity cannot be found (fail closed: it may be high). Lower ones are printed and pass.

When the advisory service does not answer (PyPI unreachable, or a mirror without the per-version JSON
API, as on the development machines), pip-audit marks the packages "not found on PyPI" and would say
"No known vulnerabilities found". This script counts them instead and says plainly that the audit was
not done. Without ``--strict`` that is a warning and the run passes (a machine without the service could
otherwise never pass CI); with ``--strict`` (GitHub Actions, where PyPI answers) it fails.

If pip-audit gives no report at all (e.g. it cannot connect), nothing was audited: the same rule applies.

Exit codes: 0 passed (or not done, without --strict), 1 a high-severity (or unrated) vulnerability,
2 the audit could not be done under --strict.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess  # nosec B404  # runs pip-audit from this virtualenv, no shell
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

OSV_VULN_URL = "https://api.osv.dev/v1/vulns/"
FAILING = frozenset({"HIGH", "CRITICAL", "UNKNOWN"})


@dataclass
class Finding:
    package: str
    version: str
    vuln_id: str
    aliases: list[str]
    fix_versions: list[str]
    severity: str = "UNKNOWN"


@dataclass
class Audit:
    audited: list[str] = field(default_factory=list)
    """Packages the advisory service answered for."""
    unreachable: list[str] = field(default_factory=list)
    """Packages it did not answer for (not audited)."""
    findings: list[Finding] = field(default_factory=list)


def parse(report: dict[str, Any]) -> Audit:
    """Split pip-audit's JSON report into audited and unaudited packages and the vulnerabilities found."""
    audit = Audit()
    for dep in report.get("dependencies", []):
        name, version = dep.get("name", "?"), dep.get("version", "")
        reason = dep.get("skip_reason")
        if reason:
            if "editable" not in reason:
                audit.unreachable.append(name)
            continue
        audit.audited.append(f"{name} {version}")
        for v in dep.get("vulns", []):
            audit.findings.append(Finding(name, version, v.get("id", "?"), list(v.get("aliases", [])),
                                          list(v.get("fix_versions", []))))
    return audit


# --- severity ------------------------------------------------------------------------------------

_W = {"AV": {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2}, "AC": {"L": 0.77, "H": 0.44},
      "UI": {"N": 0.85, "R": 0.62}, "CIA": {"H": 0.56, "L": 0.22, "N": 0.0}}


def _roundup(x: float) -> float:
    i = round(x * 100000)
    return i / 100000.0 if i % 10000 == 0 else (math.floor(i / 10000) + 1) / 10.0


def cvss3_base_score(vector: str) -> float | None:
    """The CVSS v3.x base score of a vector ``CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H``."""
    try:
        m = dict(part.split(":", 1) for part in vector.split("/")[1:])
        changed = m["S"] == "C"
        pr = {"N": 0.85, "L": 0.68 if changed else 0.62, "H": 0.5 if changed else 0.27}[m["PR"]]
        iss = 1 - (1 - _W["CIA"][m["C"]]) * (1 - _W["CIA"][m["I"]]) * (1 - _W["CIA"][m["A"]])
        impact = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15 if changed else 6.42 * iss
        exploitability = 8.22 * _W["AV"][m["AV"]] * _W["AC"][m["AC"]] * pr * _W["UI"][m["UI"]]
    except (KeyError, ValueError):
        return None
    if impact <= 0:
        return 0.0
    raw = 1.08 * (impact + exploitability) if changed else impact + exploitability
    return _roundup(min(raw, 10.0))


def rating(score: float) -> str:
    return "CRITICAL" if score >= 9.0 else "HIGH" if score >= 7.0 else "MODERATE" if score >= 4.0 else "LOW"


def severity_of(record: dict[str, Any]) -> str | None:
    """An OSV record's severity: the GitHub advisory rating, else the highest CVSS v3 score's rating."""
    given = str((record.get("database_specific") or {}).get("severity", "")).upper()
    if given in ("LOW", "MODERATE", "MEDIUM", "HIGH", "CRITICAL"):
        return "MODERATE" if given == "MEDIUM" else given
    scores = [cvss3_base_score(s.get("score", "")) for s in record.get("severity", [])
              if str(s.get("type", "")).startswith("CVSS_V3")]
    known = [s for s in scores if s is not None]
    return rating(max(known)) if known else None


def fetch_osv(vuln_id: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """OSV's record of ``vuln_id`` (None when OSV does not answer or does not know it)."""
    url = OSV_VULN_URL + urllib.request.quote(vuln_id, safe="")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310  # nosec B310  # constant https URL
            data = json.load(r)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def rate(findings: Sequence[Finding], fetch: Callable[[str], dict[str, Any] | None] = fetch_osv) -> None:
    """Fill each finding's severity from OSV (its id first, then its aliases, GHSA ones first)."""
    for f in findings:
        for vid in [f.vuln_id, *sorted(f.aliases, key=lambda a: not a.startswith("GHSA-"))]:
            record = fetch(vid)
            found = severity_of(record) if record else None
            if found:
                f.severity = found
                break


# --- the gate --------------------------------------------------------------------------------------

def run_pip_audit(extra: Sequence[str]) -> dict[str, Any] | None:
    """pip-audit's JSON report, or None when it gave none (its last error line is printed)."""
    cmd = [sys.executable, "-m", "pip_audit", "--skip-editable", "--format", "json", "--aliases", "on",
           "--progress-spinner", "off", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # nosec B603  # fixed argv
    # pip-audit exits 1 when it finds vulnerabilities; its JSON is on stdout either way.
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"pip-audit gave no report (exit {done.returncode}): {last}")
        return None
    return report if isinstance(report, dict) else None


def judge(audit: Audit, *, strict: bool) -> tuple[int, list[str]]:
    """The exit code and the lines to print."""
    lines = [f"pip-audit: {len(audit.audited)} packages audited, {len(audit.unreachable)} not audited, "
             f"{len(audit.findings)} known vulnerabilities"]
    code = 0
    for f in audit.findings:
        fixed = ", ".join(f.fix_versions) or "no fix released"
        aliases = f" ({', '.join(f.aliases)})" if f.aliases else ""
        lines.append(f"  {f.severity:<8} {f.package} {f.version}: {f.vuln_id}{aliases}; fixed in {fixed}")
        if f.severity in FAILING:
            code = 1
    if any(f.severity == "UNKNOWN" for f in audit.findings):
        lines.append("  UNKNOWN = OSV gave no severity (or did not answer): counted as high")
    if audit.unreachable:
        lines.append(f"NOT AUDITED: the advisory service (PyPI's JSON API) gave no answer for {len(audit.unreachable)} "
                     f"package(s): {', '.join(audit.unreachable[:8])}{' ...' if len(audit.unreachable) > 8 else ''}")
        if not audit.audited:
            lines.append("NOT AUDITED: no dependency could be audited on this machine (no PyPI JSON API here); "
                         + ("--strict: failing" if strict else "a warning only (run with --strict where PyPI answers)"))
        if strict and code == 0:
            code = 2
    if code == 0 and audit.audited and not audit.unreachable:
        lines.append("pip-audit: no high-severity vulnerability")
    return code, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.audit_deps",
        description="pip-audit of the installed dependencies with severities from OSV: HIGH and CRITICAL "
                    "(or unrated) vulnerabilities fail. Arguments after -- go to pip-audit "
                    "(e.g. -- --ignore-vuln GHSA-xxxx).")
    p.add_argument("--strict", action="store_true",
                   help="also fail when the advisory service cannot be reached (packages not audited)")
    p.add_argument("pip_audit_args", nargs="*", help="extra pip-audit arguments (after --)")
    args = p.parse_args(argv)
    report = run_pip_audit(args.pip_audit_args)
    audit = parse(report) if report is not None else Audit(unreachable=["(every package: no report)"])
    rate(audit.findings)
    code, lines = judge(audit, strict=args.strict)
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
