"""The champion vs challenger section of ``credscope-roi --audit``: the two models' decisions on the same
applicants (those the challenger shadow-scored, ``predictions JOIN challenger_predictions``), and the net
profit of each on the ones with a reported outcome (money figures of :mod:`server.portfolio`)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import numpy as np

from server.challenger import compare
from server.portfolio import LoanParameters, outcome_figures

_SQL = ("SELECT p.probability, p.decision, c.model_version, c.probability, c.decision, o.defaulted "
        "FROM predictions p JOIN challenger_predictions c ON c.request_id = p.request_id "
        "LEFT JOIN outcomes o ON o.request_id = p.request_id ORDER BY p.created_at, p.request_id")


def read_pairs(url: str) -> list[tuple[Any, ...]]:
    """(champion p, champion decision, challenger version, challenger p, challenger decision, defaulted or
    None) rows; none when the database has no challenger table (or cannot be read: the main report says why)."""
    from server.db import dialect, sqlite_path

    if dialect(url) == "sqlite":
        path = sqlite_path(url)
        if not path.is_file():
            return []
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
            try:
                rows = conn.execute(_SQL).fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            return []
        return [(*r[:5], None if r[5] is None else bool(r[5])) for r in rows]

    async def fetch() -> list[tuple[Any, ...]]:
        import asyncpg

        try:
            conn = await asyncpg.connect(url, timeout=10)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            return []
        try:
            return [tuple(r) for r in await conn.fetch(_SQL)]
        except asyncpg.PostgresError:
            return []
        finally:
            await conn.close()

    return asyncio.run(fetch())


def section(rows: list[tuple[Any, ...]], params: LoanParameters) -> dict[str, Any] | None:
    """The report section (None without challenger rows)."""
    c = compare(rows)
    if c is None:
        return None
    rows = [r for r in rows if r[2] == c.challenger_version]
    known = [r for r in rows if r[5] is not None]
    out: dict[str, Any] = {"challenger_version": c.challenger_version, "compared": c.compared,
                           "agreement_rate": c.agreement_rate, "approval_rate_difference": c.approval_rate_difference,
                           "with_outcomes": len(known), "champion_auc": c.champion_auc,
                           "challenger_auc": c.challenger_auc}
    if known:
        defaulted = np.array([bool(r[5]) for r in known])
        champion = outcome_figures(np.array([r[1] == "APPROVE" for r in known]), defaulted, params)
        challenger = outcome_figures(np.array([r[4] == "APPROVE" for r in known]), defaulted, params)
        out.update(champion_net_profit=champion.net_profit, challenger_net_profit=challenger.net_profit)
    return out


def render(s: dict[str, Any]) -> str:
    lines = ["", f"champion vs challenger {s['challenger_version']} on the same {s['compared']:,} applicants: "
                 f"agreement {s['agreement_rate']:.1%}, approval rate {s['approval_rate_difference']:+.1%} "
                 "(challenger - champion)"]
    if "champion_net_profit" in s:
        auc = "" if s["champion_auc"] is None else \
            f"; AUC champion {s['champion_auc']:.3f}, challenger {s['challenger_auc']:.3f}"
        lines.append(f"  on the {s['with_outcomes']:,} with outcomes: net profit champion "
                     f"{s['champion_net_profit']:,.0f}, challenger {s['challenger_net_profit']:,.0f}{auc}")
    return "\n".join(lines) + "\n"
