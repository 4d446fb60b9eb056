"""Store SendGrid Event Webhook events and derive suppressions from them.

SendGrid delivers at least once, sometimes re-sending an event with a new
``sg_event_id``; each event is therefore stored once by ``sg_event_id`` *and* by a
natural key (message id, event, timestamp, email). Suppression effects are applied
only for events stored by this call, so a late redelivery of an old
``group_unsubscribe`` cannot undo a later ``group_resubscribe``. An event also resolves
an ambiguous send of its message (``unknown`` → ``sent``,
:func:`mailflow.ledger.confirm_by_events`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, update

from mailflow import ledger
from mailflow.clock import utcnow
from mailflow.extract import MARKETING_ONLY_SUPPRESSIONS
from mailflow.warehouse.dialect import insert_ignoring_conflicts
from mailflow.warehouse.schema import events as events_table
from mailflow.warehouse.schema import suppressions

EVENT_TYPES = frozenset(
    {
        "processed",
        "dropped",
        "delivered",
        "deferred",
        "bounce",
        "open",
        "click",
        "spamreport",
        "unsubscribe",
        "group_unsubscribe",
        "group_resubscribe",
    }
)

#: Events after which the address must never be emailed again (bounce/dropped: see below).
_SUPPRESSING = frozenset({"spamreport", "unsubscribe", "group_unsubscribe"})
# SendGrid drop reasons that say the address itself is bad ("Invalid", "Bounced
# Address"), not e.g. "Invalid SMTPAPI header", which is our request's fault.
_BAD_ADDRESS_DROP = re.compile(r"^\s*invalid\s*$|invalid (email )?address|bounced address", re.I)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one webhook batch did."""

    received: int
    stored: int
    duplicates: int
    suppressed: int
    confirmed: int = 0  # ambiguous sends these events proved accepted (now ``sent``)
    #: Events stored without an address: theirs was not usable as given (see ``address``).
    unusable_addresses: int = 0
    named: frozenset[int] = frozenset()  # ledger ids the new events name


def _text(value: Any, limit: int) -> str | None:
    # Never reject an event over a field's shape: coerce and clip to the column size.
    if value is None or isinstance(value, (dict, list)):
        return None
    # PostgreSQL text cannot hold NUL; one such byte would fail the whole batch forever.
    text = str(value).replace("\x00", "").strip()
    return text[:limit] if text else None


#: The longest address field kept (RFC 5321 paths are at most 256 octets; the column 320).
MAX_EVENT_ADDRESS_CHARS = 320
# Control characters (C0, DEL, C1) and whitespace inside an address: not part of any real
# address, and removing them could turn it into somebody else's.
_NOT_IN_ADDRESS = re.compile(r"[\x00-\x20\x7f-\x9f\s]")


def address(value: Any) -> str | None:
    """The event's address, trimmed and lower-cased, or None when it is not usable *as
    given*: not a string, empty, longer than the column, or holding a control character
    (a NUL, a line break) or inner whitespace. Such an address is never repaired: removing a
    character can make another person's address, who would then be suppressed."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > MAX_EVENT_ADDRESS_CHARS or _NOT_IN_ADDRESS.search(text):
        return None
    return text.lower()


def _unix_seconds(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _occurred_at(ts: int | None, fallback: datetime) -> datetime:
    if ts is None:
        return fallback
    try:
        return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):
        return fallback


def machine_open(raw: Mapping[str, Any]) -> bool:
    """SendGrid's ``sg_machine_open`` flag of an open (JSON true; "true"/"1" tolerated)."""
    flag = raw.get("sg_machine_open")
    if isinstance(flag, bool):
        return flag
    return isinstance(flag, (str, int)) and str(flag).strip().lower() in ("true", "1")


#: Ledger ids are BIGINT; a larger number in an event would fail the whole batch's insert
#: (and SendGrid would redeliver it forever), so it names no ledger row.
_MAX_LEDGER_ID = 2**63 - 1


def _ledger_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        found = int(str(value).strip())
    except ValueError:
        return None
    return found if 1 <= found <= _MAX_LEDGER_ID else None


def natural_key(sg_message_id: str | None, event: str, ts: int | None, email: str | None) -> str:
    """sha256 hex of (message id, event, timestamp, email), the fallback dedupe key."""
    parts = (sg_message_id or "", event, "" if ts is None else str(ts), email or "")
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def normalise(raw: Mapping[str, Any], received_at: datetime) -> dict[str, Any]:
    """One ``mf_events`` row from one event as SendGrid sent it (pure)."""
    event = _text(raw.get("event"), 32) or "unknown"
    email = address(raw.get("email"))
    ts = _unix_seconds(raw.get("timestamp"))
    sg_message_id = _text(raw.get("sg_message_id"), 128)
    return {
        "sg_event_id": _text(raw.get("sg_event_id"), 128),
        "natural_key": natural_key(sg_message_id, event, ts, email),
        "event": event,
        "email": email,
        # A missing timestamp should not lose the event; the receipt time is the best bound.
        "occurred_at": _occurred_at(ts, received_at),
        "sg_message_id": sg_message_id,
        "ledger_id": _ledger_id(raw.get("ledger_id")),
        "trigger": _text(raw.get("trigger"), 64),
        "url": _text(raw.get("url"), 100_000) if event == "click" else None,
        "reason": _text(raw.get("reason"), 100_000),
        "bounce_type": _text(raw.get("type"), 32) if event == "bounce" else None,
        "machine_open": event == "open" and machine_open(raw),
        "raw": dict(raw),
        "received_at": received_at,
    }


def suppression_reason(row: Mapping[str, Any]) -> str | None:
    """The suppression reason this stored event implies, or None."""
    event = row["event"]
    if event == "bounce":
        # "blocked" is a temporary/IP-level refusal, not a dead address.
        return None if (row["bounce_type"] or "").lower() == "blocked" else "bounce"
    if event == "dropped":
        return "dropped" if _BAD_ADDRESS_DROP.search(row["reason"] or "") else None
    return event if event in _SUPPRESSING else None


def store_events(conn: Connection, events: Sequence[Mapping[str, Any]]) -> IngestResult:
    """Store ``events`` once each and apply their suppression effects, in ``conn``'s transaction.

    The caller owns the transaction: commit before acknowledging the webhook. Ambiguous
    sends the events name are resolved by :func:`ingest`, after the commit.
    """
    if not events:
        return IngestResult(received=0, stored=0, duplicates=0, suppressed=0, confirmed=0)
    now = utcnow()
    rows = [normalise(e, now) for e in events]
    # One executemany; RETURNING reports exactly the rows that were new, even with
    # another writer committing concurrently (a before/after count would not).
    stmt = insert_ignoring_conflicts(conn, events_table).returning(events_table.c.natural_key)
    stored_keys = set(conn.execute(stmt, rows).scalars())
    new_rows = sorted(
        (r for r in rows if r["natural_key"] in stored_keys), key=lambda r: r["occurred_at"]
    )
    # Within the batch a key is stored once; keep the first row seen for it.
    seen: set[str] = set()
    fresh = []
    for r in new_rows:
        if r["natural_key"] not in seen:
            seen.add(r["natural_key"])
            fresh.append(r)
    suppressed = _apply_suppressions(conn, fresh, now)
    unusable = sum(
        1 for e, r in zip(events, rows, strict=True) if r["email"] is None and e.get("email")
    )
    return IngestResult(
        received=len(rows),
        stored=len(stored_keys),
        duplicates=len(rows) - len(stored_keys),
        suppressed=suppressed,
        unusable_addresses=unusable,
        named=frozenset(r["ledger_id"] for r in fresh if r["ledger_id"] is not None),
    )


def ingest(engine: Engine, events: Sequence[Mapping[str, Any]]) -> IngestResult:
    """Store one webhook batch (committed when this returns), then resolve the ambiguous
    sends its events name: each names a message SendGrid accepted.

    The confirmation runs in a transaction of its own, after the events are committed, so
    a send stage settling one of these rows as ``unknown`` at the same moment cannot miss
    them: whichever commits second sees the other's write (and the send stage, too,
    confirms after it has committed, :func:`mailflow.ledger.confirm_by_events`).
    """
    with engine.begin() as conn:
        result = store_events(conn, events)
    if not result.named:
        return result
    with engine.begin() as conn:
        confirmed = ledger.confirm_by_events(conn, ledger_ids=result.named)
    return replace(result, confirmed=confirmed)


def _apply_suppressions(conn: Connection, rows: Sequence[Mapping[str, Any]], now: datetime) -> int:
    """Apply suppress / resubscribe effects in event-time order; return rows added."""
    added = 0
    for row in rows:
        email = row["email"]
        if not email:
            continue
        if row["event"] == "group_resubscribe":
            # mf_suppressions has no ASM group column: a resubscribe lifts only a
            # suppression that came from a group unsubscribe, never a bounce or complaint.
            conn.execute(
                delete(suppressions).where(
                    and_(
                        suppressions.c.email == email, suppressions.c.reason == "group_unsubscribe"
                    )
                )
            )
            continue
        reason = suppression_reason(row)
        if reason is None:
            continue
        source = f"event:{row['sg_event_id'] or row['natural_key']}"[:255]
        stmt = insert_ignoring_conflicts(conn, suppressions).returning(suppressions.c.id)
        result = conn.execute(
            stmt, {"email": email, "reason": reason, "source": source, "created_at": now}
        )
        if result.all():
            added += 1
        elif reason not in MARKETING_ONLY_SUPPRESSIONS:
            # An address that unsubscribed and then bounced or complained must stop
            # transactional mail too: the stronger reason replaces the marketing-only one.
            conn.execute(
                update(suppressions)
                .where(
                    suppressions.c.email == email,
                    suppressions.c.reason.in_(MARKETING_ONLY_SUPPRESSIONS),
                )
                .values(reason=reason, source=source, created_at=now)
            )
    return added
