"""The pip-audit gate's rules (tools/audit_deps.py), on pip-audit reports made here (no network)."""

from __future__ import annotations

from tools.audit_deps import cvss3_base_score, judge, parse, rate, severity_of

REPORT = {"dependencies": [
    {"name": "credscope", "skip_reason": "distribution marked as editable"},
    {"name": "goodlib", "version": "1.0", "vulns": []},
    {"name": "badlib", "version": "2.0", "vulns": [
        {"id": "PYSEC-2099-1", "aliases": ["GHSA-aaaa-bbbb-cccc", "CVE-2099-1"], "fix_versions": ["2.1"]}]},
    {"name": "meh", "version": "0.1", "vulns": [{"id": "GHSA-low", "aliases": [], "fix_versions": []}]},
]}


def test_cvss_scores_match_the_specification_examples() -> None:
    assert cvss3_base_score("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H") == 9.8
    assert cvss3_base_score("CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N") == 6.1
    assert cvss3_base_score("CVSS:3.0/AV:L/AC:L/PR:L/UI:N/S:U/C:N/I:N/A:N") == 0.0
    assert cvss3_base_score("not a vector") is None


def test_severity_prefers_the_advisory_rating_then_cvss() -> None:
    assert severity_of({"database_specific": {"severity": "MODERATE"}}) == "MODERATE"
    assert severity_of({"severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}]}) \
        == "CRITICAL"
    assert severity_of({}) is None


def test_high_fails_low_passes_and_unrated_fails() -> None:
    audit = parse(REPORT)
    assert audit.audited == ["goodlib 1.0", "badlib 2.0", "meh 0.1"] and not audit.unreachable
    records = {"GHSA-aaaa-bbbb-cccc": {"database_specific": {"severity": "HIGH"}},
               "GHSA-low": {"database_specific": {"severity": "LOW"}}}
    rate(audit.findings, fetch=records.get)
    assert [f.severity for f in audit.findings] == ["HIGH", "LOW"]
    code, lines = judge(audit, strict=True)
    assert code == 1 and any("HIGH" in line and "badlib" in line for line in lines)

    unrated = parse(REPORT)
    rate(unrated.findings, fetch=lambda vid: None)  # OSV does not answer
    assert {f.severity for f in unrated.findings} == {"UNKNOWN"}
    assert judge(unrated, strict=False)[0] == 1  # unrated counts as high

    audit.findings = audit.findings[1:]  # only the low one
    assert judge(audit, strict=True)[0] == 0


def test_an_unreachable_advisory_service_is_said_plainly_and_fails_only_when_strict() -> None:
    audit = parse({"dependencies": [
        {"name": "grpcio", "skip_reason": "Dependency not found on PyPI and could not be audited: grpcio (1.0)"}]})
    assert audit.unreachable == ["grpcio"] and not audit.audited
    code, lines = judge(audit, strict=False)
    assert code == 0 and any("NOT AUDITED" in line for line in lines)
    assert judge(audit, strict=True)[0] == 2
