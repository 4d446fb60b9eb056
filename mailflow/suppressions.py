"""Manual suppression management (``mailflow suppress``): add, remove, list, import a CSV.

Events add suppressions on their own (see :mod:`mailflow.webhook.ingest`); these are
for people: a complaint by phone, a legal request, or the list exported from a
previous provider. Addresses are stored trimmed and lower-cased, like every other
suppression, and adding one twice keeps the first entry.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, select

from mailflow.addresses import EMAIL_REGEX, email_problem, normalise
from mailflow.clock import utcnow
from mailflow.errors import ConfigError
from mailflow.warehouse.dialect import insert_ignoring_conflicts
from mailflow.warehouse.schema import suppressions

_EMAIL = re.compile(EMAIL_REGEX)
#: Column names a provider's export may use for the address, tried in this order.
EMAIL_HEADERS = ("email", "email_address", "e-mail", "address", "recipient")
REASON_HEADERS = ("reason", "type", "status")


@dataclass
class Outcome:
    """What an add or import did; ``invalid`` holds (where, address, problem)."""

    added: int = 0
    already: int = 0
    invalid: list[tuple[str, str, str]] = field(default_factory=list)


def _reason(value: str) -> str:
    reason = value.strip()
    if not reason or len(reason) > 64:
        raise ConfigError(f"suppression reason {value!r} must be 1-64 characters")
    return reason


def add(conn: Connection, entries: Iterable[tuple[str, str, str]], *, source: str) -> Outcome:
    """Suppress each (where, email, reason); a malformed address is reported, not stored."""
    outcome = Outcome()
    now = utcnow()
    stmt = insert_ignoring_conflicts(conn, suppressions).returning(suppressions.c.id)
    for where, raw, reason in entries:
        email = normalise(raw)
        if not _EMAIL.search(email):
            outcome.invalid.append((where, raw, email_problem(raw.strip())))
            continue
        values = {"email": email, "reason": _reason(reason), "source": source[:255]}
        if conn.execute(stmt, {**values, "created_at": now}).all():
            outcome.added += 1
        else:
            outcome.already += 1
    return outcome


def remove(conn: Connection, emails: Iterable[str]) -> int:
    """Lift the suppression of each address; the number lifted."""
    wanted = sorted({normalise(e) for e in emails})
    if not wanted:
        return 0
    return int(conn.execute(delete(suppressions).where(suppressions.c.email.in_(wanted))).rowcount)


def listing(
    conn: Connection, *, reason: str | None = None, contains: str | None = None, limit: int = 100
) -> tuple[int, list[Any]]:
    """(total matching, the newest ``limit`` of them)."""
    conds = []
    if reason:
        conds.append(suppressions.c.reason == reason)
    if contains:
        conds.append(suppressions.c.email.contains(normalise(contains), autoescape=True))
    total = conn.execute(select(func.count()).select_from(suppressions).where(*conds)).scalar_one()
    rows = conn.execute(
        select(suppressions)
        .where(*conds)
        .order_by(suppressions.c.created_at.desc(), suppressions.c.id.desc())
        .limit(limit)
    ).all()
    return int(total), list(rows)


def read_csv(path: Path, *, default_reason: str) -> list[tuple[str, str, str]]:
    """(``file:line``, email, reason) for each data row of a CSV with a header row.

    The address column is the first of :data:`EMAIL_HEADERS` present (any case); a
    reason column (:data:`REASON_HEADERS`) is used when present and non-empty.
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        headers = {h.strip().lower(): h for h in reader.fieldnames or ()}
        email_col = next((headers[h] for h in EMAIL_HEADERS if h in headers), None)
        if email_col is None:
            raise ConfigError(
                f"{path}: no address column in the header row {list(headers)}; name it one of "
                f"{', '.join(EMAIL_HEADERS)}"
            )
        reason_col = next((headers[h] for h in REASON_HEADERS if h in headers), None)
        entries = []
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            reason = (row.get(reason_col) or "").strip() if reason_col else ""
            entries.append((where, row.get(email_col) or "", reason or default_reason))
        return entries
