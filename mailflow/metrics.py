"""Engagement metrics: from ledger rows, webhook events and orders to analyst tables.

Two tables, rebuilt incrementally; every definition is the metrics contract's
(``docs/metrics.md``, version :data:`CONTRACT_VERSION`):

- ``mf_message_facts``, one row per sent message: delivered, bounced, opened (human
  and machine opens apart), clicked, unsubscribed, complained, and the orders
  attributed to it;
- ``mf_metrics_daily``, one row per (trigger, variant, send day): those facts added
  up, with the median and 90th percentile of the seconds to open and to click. The
  views ``mf_engagement_daily`` and ``mf_engagement_totals`` add the rates.

Times: SendGrid's event timestamps are whole seconds, ``sent_at`` has microseconds. A
duration is an event's time minus ``sent_at`` truncated to the second (both at the
precision of the events), never below 0.

Attribution is last touch: an order belongs to the latest message sent to the same
customer before it, if that message went out at most ``attribution_window`` earlier.
So an order is never counted twice, whichever triggers reached the customer.

The rollup is incremental and idempotent. A run finds the customers whose numbers
may have changed since the last run (new events, newly sent messages, new or changed
orders), recomputes every fact of those customers from the raw rows, then recomputes
the daily rows of every send day those facts touch. Rerunning it, or running it over
the same input twice, gives the same numbers; a ``full`` run rebuilds everything.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    update,
)

from mailflow.clock import utcnow
from mailflow.warehouse.schema import (
    events,
    message_facts,
    metrics_daily,
    order_attribution,
    orders,
    rollup_state,
)
from mailflow.warehouse.schema import send_ledger as ledger

#: The version of docs/metrics.md these tables implement.
CONTRACT_VERSION = 2
ROLLUP_NAME = "engagement"
#: PostgreSQL advisory lock key of the rollup (any constant unique to this job).
_LOCK_KEY = 0x6D66_726F6C6C  # "mfroll"
DEFAULT_VARIANT = "default"
#: Orders in these states never count as conversions.
NOT_CONVERTING = ("cancelled", "refunded")
#: Rows seen this long before the previous run's start are looked at again, so a row
#: committed late (a concurrent transaction) is not missed; recomputing is idempotent.
OVERLAP = timedelta(minutes=10)
#: Orders placed this long before the last run are looked at again (late warehouse loads).
LATE_ORDERS = timedelta(hours=6)

_UNSUBSCRIBE_EVENTS = ("unsubscribe", "group_unsubscribe")


@dataclass(frozen=True, slots=True)
class RollupResult:
    """What one rollup run did."""

    full: bool
    customers: int  # recomputed whole, attribution included
    messages: int  # fact rows written
    days: tuple[date, ...]
    last_event_id: int
    seconds: float


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _flag(condition: Any) -> Any:
    # A comparison, so the result is a boolean on every dialect (0/1 on SQLite).
    return func.max(case((condition, 1), else_=0)) > 0


def _count(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _first(condition: Any) -> Any:
    return func.min(case((condition, events.c.occurred_at), else_=None))


def _human_open() -> Any:
    return and_(events.c.event == "open", not_(events.c.machine_open))


def _machine_open() -> Any:
    return and_(events.c.event == "open", events.c.machine_open)


def _changes(
    conn: Connection, *, since: datetime, last_event_id: int, late_orders: timedelta
) -> tuple[set[int], set[int]]:
    """What changed since the last run: (customers, messages) to recompute.

    A customer is recomputed whole (attribution included) when they were sent a
    message, or placed or changed an order: either can move an order from one
    message to another. A message is recomputed alone when only new events arrived
    for it; its conversions cannot have changed. ``late_orders`` widens the order
    window for warehouses that load orders late with their original timestamps.
    """
    sent = ledger.c.status == "sent"
    new_events = or_(events.c.id > last_event_id, events.c.received_at >= since)
    by_event = conn.execute(
        select(ledger.c.customer_id, ledger.c.id)
        .distinct()
        .select_from(events.join(ledger, ledger.c.id == events.c.ledger_id))
        .where(new_events, sent)
    ).all()
    by_send = conn.execute(
        select(ledger.c.customer_id, ledger.c.id).where(sent, ledger.c.updated_at >= since)
    ).all()
    o, a = orders.c, order_attribution.c
    changed = or_(o.updated_at >= since, o.created_at >= since - late_orders)
    by_order = conn.execute(select(o.customer_id).distinct().where(changed)).scalars()
    # The customer a changed order was credited to before: it may have moved to another.
    credited_before = conn.execute(
        select(a.customer_id).distinct().where(a.order_id.in_(select(o.id).where(changed)))
    ).scalars()
    customers = {int(c) for c, _ in by_send if c is not None}
    customers.update(int(c) for c in (*by_order, *credited_before) if c is not None)
    messages = {int(i) for c, i in (*by_event, *by_send) if c is None or c not in customers}
    return customers, messages


def _all_customers(conn: Connection) -> tuple[set[int], set[int]]:
    sent = ledger.c.status == "sent"
    customers = conn.execute(
        select(ledger.c.customer_id).distinct().where(sent, ledger.c.customer_id.is_not(None))
    ).scalars()
    loose = conn.execute(select(ledger.c.id).where(sent, ledger.c.customer_id.is_(None))).scalars()
    return {int(c) for c in customers}, {int(i) for i in loose}


def _facts_select(which: Any, now: datetime) -> Any:
    """The fact rows (without conversions) of the sent messages selected by ``which``.

    One GROUP BY over the ledger rows and their events, run inside the warehouse.
    """
    l_, e = ledger.c, events.c
    sent_at = func.coalesce(l_.sent_at, l_.updated_at)
    bounce_kind = func.lower(func.coalesce(e.bounce_type, "bounce"))
    # An open or a click proves delivery when the delivered event is missing (lost, late).
    delivered_at = func.coalesce(
        _first(e.event == "delivered"), _first(e.event.in_(("open", "click")))
    )
    return (
        select(
            l_.id,
            l_.trigger,
            func.coalesce(l_.variant, DEFAULT_VARIANT),
            l_.customer_id,
            func.date(sent_at),
            sent_at,
            delivered_at,
            _flag(and_(e.event == "bounce", bounce_kind != "blocked")),
            _flag(and_(e.event == "bounce", bounce_kind == "blocked")),
            _flag(e.event == "dropped"),
            _flag(e.event == "deferred"),
            _count(_human_open()),
            _first(_human_open()),
            _count(e.event == "click"),
            _first(e.event == "click"),
            _flag(e.event.in_(_UNSUBSCRIBE_EVENTS)),
            _flag(e.event == "spamreport"),
            literal(0),
            literal(None, message_facts.c.first_order_id.type),
            literal(0),
            literal(now, message_facts.c.updated_at.type),
            _count(_machine_open()),
        )
        .select_from(ledger.outerjoin(events, e.ledger_id == l_.id))
        .where(which, l_.status == "sent")
        # Grouping by the primary key: the other ledger columns depend on it.
        .group_by(l_.id)
    )


def _frame(rows: Sequence[Any], columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame([tuple(r) for r in rows], columns=list(columns))


def _attribute(messages: pd.DataFrame, order_rows: pd.DataFrame, window: timedelta) -> pd.DataFrame:
    """Per order: the message it is attributed to (last touch within ``window``), if any."""
    sends = messages.sort_values("sent_at", kind="stable")
    placed = order_rows.sort_values("created_at", kind="stable")
    matched = pd.merge_asof(
        placed,
        sends,
        left_on="created_at",
        right_on="sent_at",
        by="customer_id",
        direction="backward",
        tolerance=pd.Timedelta(window),
        allow_exact_matches=False,
    ).dropna(subset=["ledger_id"])
    matched["ledger_id"] = matched["ledger_id"].astype("int64")
    return matched


def _per_message(matched: pd.DataFrame) -> pd.DataFrame:
    """Orders, revenue and first order per message, from :func:`_attribute`'s matches."""
    per = matched.groupby("ledger_id", sort=False).agg(
        orders=("order_id", "size"), revenue=("total", "sum"), first_order_id=("order_id", "first")
    )
    return per.reset_index()


def _attribution(
    conn: Connection, customers: Sequence[int], window: timedelta
) -> list[dict[str, Any]]:
    """Orders, revenue and first order per fact of ``customers`` (update parameters)."""
    o, f = orders.c, message_facts.c
    conn.execute(delete(order_attribution).where(order_attribution.c.customer_id.in_(customers)))
    first_send = conn.execute(
        select(func.min(f.sent_at)).where(f.customer_id.in_(customers))
    ).scalar_one()
    if first_send is None:
        return []
    order_rows = _frame(
        conn.execute(
            select(o.id, o.customer_id, o.created_at, o.total).where(
                o.customer_id.in_(customers),
                o.created_at > first_send,
                o.status.not_in(NOT_CONVERTING),
            )
        ).all(),
        ["order_id", "customer_id", "created_at", "total"],
    )
    if order_rows.empty:
        return []
    buyers = sorted({int(c) for c in order_rows["customer_id"]})
    sends = _frame(
        conn.execute(
            select(f.ledger_id, f.customer_id, f.sent_at).where(f.customer_id.in_(buyers))
        ).all(),
        ["ledger_id", "customer_id", "sent_at"],
    )
    if sends.empty:
        # Buyers who were never sent anything (others in this chunk were): nothing to credit.
        return []
    for frame, column in ((order_rows, "created_at"), (sends, "sent_at")):
        # One unit on both sides: merge_asof refuses to compare datetime64[s] with [us].
        frame[column] = pd.to_datetime(frame[column]).astype("datetime64[ns]")
        frame["customer_id"] = frame["customer_id"].astype("int64")
    order_rows["total"] = order_rows["total"].astype(float)
    matched = _attribute(sends, order_rows, window)
    credited = [
        {
            "order_id": int(r.order_id),
            "ledger_id": int(r.ledger_id),
            "customer_id": int(r.customer_id),
        }
        for r in matched.itertuples(index=False)
    ]
    for part in _chunks(credited, 5_000):
        # An order credited to its previous owner's message (not recomputed in this
        # chunk) gives that row up: an order belongs to one message only.
        conn.execute(
            delete(order_attribution).where(
                order_attribution.c.order_id.in_([r["order_id"] for r in part])
            )
        )
        conn.execute(insert(order_attribution), list(part))
    conv = _per_message(matched)
    return [
        {
            "b_id": int(r.ledger_id),
            "b_orders": int(r.orders),
            "b_revenue": round(float(r.revenue), 2),
            "b_first": int(r.first_order_id),
        }
        for r in conv.itertuples(index=False)
    ]


def _rebuild_facts(
    conn: Connection,
    which_ledger: Any,
    which_facts: Any,
    now: datetime,
    *,
    attribute: tuple[Sequence[int], timedelta] | None,
) -> tuple[int, set[date]]:
    """Recompute the facts selected by ``which_facts`` / ``which_ledger``: (rows, send days).

    With ``attribute`` (customers, window) their orders are attributed anew; without,
    the conversions already recorded are kept.
    """
    f = message_facts.c
    days = set(conn.execute(select(f.send_day).distinct().where(which_facts)).scalars())
    kept = []
    if attribute is None:
        kept = [
            {"b_id": r[0], "b_orders": r[1], "b_revenue": r[2], "b_first": r[3]}
            for r in conn.execute(
                select(f.ledger_id, f.orders, f.revenue, f.first_order_id).where(
                    which_facts, f.orders > 0
                )
            )
        ]
    conn.execute(delete(message_facts).where(which_facts))
    conn.execute(
        message_facts.insert().from_select(
            [c.name for c in message_facts.c], _facts_select(which_ledger, now)
        )
    )
    if attribute is not None:
        kept = _attribution(conn, *attribute)
    if kept:
        conn.execute(
            message_facts.update()
            .where(f.ledger_id == bindparam("b_id"))
            .values(
                orders=bindparam("b_orders"),
                revenue=bindparam("b_revenue"),
                first_order_id=bindparam("b_first"),
            ),
            kept,
        )
    # (Not the INSERT's rowcount: drivers may not report one for INSERT … SELECT.)
    per_day = conn.execute(
        select(f.send_day, func.count()).where(which_facts).group_by(f.send_day)
    ).all()
    days.update(d for d, _ in per_day)
    return sum(n for _, n in per_day), days


def _rebuild_days(conn: Connection, days: Iterable[date], now: datetime) -> None:
    f = message_facts.c
    for part in _chunks(sorted(days), 500):
        conn.execute(delete(metrics_daily).where(metrics_daily.c.day.in_(part)))
        # Column for column as mf_metrics_daily, up to updated_at (see docs/metrics.md).
        agg = (
            select(
                f.trigger,
                f.variant,
                f.send_day,
                func.count(),
                _count(f.delivered_at.is_not(None)),
                _count(f.bounced),
                _count(f.blocked),
                _count(f.dropped),
                _count(f.deferred),
                # A click implies a human open (images off hide the pixel).
                _count(or_(f.opens > 0, f.clicks > 0)),
                _count(f.clicks > 0),
                func.sum(f.opens),
                func.sum(f.clicks),
                _count(f.machine_opens > 0),
                func.sum(f.machine_opens),
                _count(f.unsubscribed),
                _count(f.spam_reported),
                _count(f.orders > 0),
                func.sum(f.orders),
                func.sum(f.revenue),
                literal(now, metrics_daily.c.updated_at.type),
            )
            .where(f.send_day.in_(part))
            .group_by(f.trigger, f.variant, f.send_day)
        )
        columns = [c.name for c in metrics_daily.c][: len(agg.selected_columns)]
        conn.execute(metrics_daily.insert().from_select(columns, agg))
        _rebuild_times(conn, part)


def _rebuild_times(conn: Connection, days: Sequence[date]) -> None:
    """Median and p90 seconds to open and to click of the facts sent on ``days``."""
    f, m = message_facts.c, metrics_daily.c
    facts = _frame(
        conn.execute(
            select(
                f.trigger, f.variant, f.send_day, f.sent_at, f.first_open_at, f.first_click_at
            ).where(
                f.send_day.in_(days),
                or_(f.first_open_at.is_not(None), f.first_click_at.is_not(None)),
            )
        ).all(),
        ["trigger", "variant", "day", "sent_at", "first_open_at", "first_click_at"],
    )
    if facts.empty:
        return
    times = durations(facts)
    rows = [
        {"b_trigger": key[0], "b_variant": key[1], "b_day": key[2], **values}
        for key, values in times.items()
    ]
    conn.execute(
        update(metrics_daily)
        .where(
            m.trigger == bindparam("b_trigger"),
            m.variant == bindparam("b_variant"),
            m.day == bindparam("b_day"),
        )
        .values({name: bindparam(name) for name in TIME_COLUMNS}),
        rows,
    )


#: The time columns of ``mf_metrics_daily`` (per day only: percentiles do not add up).
TIME_COLUMNS = (
    "median_seconds_to_open",
    "p90_seconds_to_open",
    "median_seconds_to_click",
    "p90_seconds_to_click",
)


def seconds_since_send(sent_at: pd.Series, at: pd.Series) -> pd.Series:
    """Seconds from ``sent_at`` truncated to the second to ``at`` (whole seconds), at least 0.

    SendGrid's event times are whole seconds and ``sent_at`` is recorded when SendGrid
    answered, so an event of the same second may carry an earlier time than ``sent_at``.
    """
    sent = pd.to_datetime(sent_at).dt.floor("s")
    return (pd.to_datetime(at) - sent).dt.total_seconds().clip(lower=0)


def durations(facts: pd.DataFrame) -> dict[tuple[Any, Any, Any], dict[str, float | None]]:
    """Per (trigger, variant, day): median and p90 seconds to open and to click.

    Time to open runs to the first human open or the first click, whichever came first
    (a click implies an open); time to click to the first click. Percentiles interpolate
    linearly between the closest ranks (numpy's default, PostgreSQL's percentile_cont).
    """
    frame = facts.copy()
    opened = pd.concat(
        [pd.to_datetime(frame["first_open_at"]), pd.to_datetime(frame["first_click_at"])], axis=1
    ).min(axis=1)
    frame["to_open"] = seconds_since_send(frame["sent_at"], opened)
    frame["to_click"] = seconds_since_send(frame["sent_at"], frame["first_click_at"])
    out: dict[tuple[Any, Any, Any], dict[str, float | None]] = {}
    for key, group in frame.groupby(["trigger", "variant", "day"], sort=False):
        values: dict[str, float | None] = {}
        for kind in ("open", "click"):
            seconds = group[f"to_{kind}"].dropna()
            empty = seconds.empty
            values[f"median_seconds_to_{kind}"] = None if empty else float(seconds.quantile(0.5))
            values[f"p90_seconds_to_{kind}"] = None if empty else float(seconds.quantile(0.9))
        out[(key[0], key[1], key[2])] = values
    return out


def _state(conn: Connection) -> tuple[int, datetime] | None:
    row = conn.execute(
        select(rollup_state.c.last_event_id, rollup_state.c.last_started_at).where(
            rollup_state.c.name == ROLLUP_NAME
        )
    ).first()
    return None if row is None else (int(row[0]), row[1])


def _save_state(conn: Connection, last_event_id: int, started: datetime) -> None:
    values = {"last_event_id": last_event_id, "last_started_at": started, "updated_at": utcnow()}
    updated = conn.execute(
        rollup_state.update().where(rollup_state.c.name == ROLLUP_NAME).values(**values)
    )
    if not updated.rowcount:
        conn.execute(rollup_state.insert().values(name=ROLLUP_NAME, **values))


def rollup(
    engine: Engine,
    *,
    full: bool = False,
    attribution_window: timedelta = timedelta(hours=72),
    late_orders: timedelta = LATE_ORDERS,
    overlap: timedelta = OVERLAP,
    chunk: int = 2_000,
) -> RollupResult:
    """Bring ``mf_message_facts`` and ``mf_metrics_daily`` up to date; see the module doc.

    Work is committed per chunk, so readers never wait long and a crash loses
    nothing: the watermark moves only at the end, and the next run redoes the rest.
    ``full`` (also the first run) rebuilds every fact and every day; it also picks
    up orders loaded more than ``late_orders`` after they were placed, which
    incremental runs do not look for (the deployment runs a full rebuild nightly).
    Changing ``attribution_window`` needs a full rebuild to apply to old messages.
    """
    with _one_at_a_time(engine):
        return _rollup(
            engine,
            full=full,
            attribution_window=attribution_window,
            late_orders=late_orders,
            overlap=overlap,
            chunk=chunk,
        )


@contextmanager
def _one_at_a_time(engine: Engine) -> Iterator[None]:
    """Hold the rollup's lock: a scheduled run and ``mailflow report`` never interleave.

    On PostgreSQL two rollups rebuilding the same customer at once would collide on
    the facts' primary key, so a session advisory lock makes the second one wait.
    SQLite already serialises writers, and each chunk is one transaction.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(select(func.pg_advisory_lock(_LOCK_KEY)))
        conn.commit()
        try:
            yield
        finally:
            conn.execute(select(func.pg_advisory_unlock(_LOCK_KEY)))
            conn.commit()


def _rollup(
    engine: Engine,
    *,
    full: bool,
    attribution_window: timedelta,
    late_orders: timedelta,
    overlap: timedelta,
    chunk: int,
) -> RollupResult:
    t0 = time.perf_counter()
    started = utcnow()
    with engine.connect() as conn:
        # Read the high-water mark first: anything arriving later is the next run's.
        last_event_id = int(
            conn.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one()
        )
        state = None if full else _state(conn)
        if state is None:
            full = True
            customers, messages_only = _all_customers(conn)
        else:
            customers, messages_only = _changes(
                conn, since=state[1] - overlap, last_event_id=state[0], late_orders=late_orders
            )

    days: set[date] = set()
    with engine.begin() as conn:
        if full:
            days.update(conn.execute(select(message_facts.c.send_day).distinct()).scalars())
            conn.execute(delete(message_facts))
            conn.execute(delete(order_attribution))
    # Whole customers (attribution anew), then single messages (conversions kept).
    work = (
        (sorted(customers), ledger.c.customer_id, message_facts.c.customer_id, True),
        (sorted(messages_only), ledger.c.id, message_facts.c.ledger_id, False),
    )
    messages = 0
    for ids, ledger_key, facts_key, attribute in work:
        for part in _chunks(ids, chunk):
            with engine.begin() as conn:
                n, touched = _rebuild_facts(
                    conn,
                    ledger_key.in_(part),
                    facts_key.in_(part),
                    started,
                    attribute=(part, attribution_window) if attribute else None,
                )
                messages += n
                days |= touched
    with engine.begin() as conn:
        _rebuild_days(conn, days, started)
        _save_state(conn, last_event_id, started)
    return RollupResult(
        full=full,
        customers=len(customers),
        messages=messages,
        days=tuple(sorted(days)),
        last_event_id=last_event_id,
        seconds=time.perf_counter() - t0,
    )
