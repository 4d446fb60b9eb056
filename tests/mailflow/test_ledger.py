"""The ledger's guarantees on a real SQLite warehouse."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from mailflow import ledger
from mailflow.clock import utcnow
from mailflow.mailer.base import Outcome, SendResult
from mailflow.warehouse.engine import make_engine
from mailflow.warehouse.schema import send_ledger


def planned(n: int, prefix: str = "t") -> list[ledger.PlannedMessage]:
    return [
        ledger.PlannedMessage(f"{prefix}:{i}", f"u{i}@example.com", i, None, {"i": i})
        for i in range(n)
    ]


def test_plan_is_idempotent_on_the_dedupe_key(warehouse_url: str) -> None:
    engine = make_engine(warehouse_url)
    with engine.begin() as conn:
        ledger.plan(conn, "t", planned(5), flow_run_id="run-1")
        ledger.plan(conn, "t", planned(7), flow_run_id="run-2")
        rows = list(conn.execute(select(send_ledger).order_by(send_ledger.c.id)))
    assert len(rows) == 7
    assert [r.flow_run_id for r in rows] == ["run-1"] * 5 + ["run-2"] * 2
    engine.dispose()


def test_a_row_can_be_claimed_once(warehouse_url: str) -> None:
    engine = make_engine(warehouse_url)
    with engine.begin() as conn:
        ledger.plan(conn, "t", planned(4), flow_run_id="a")
        ids = ledger.planned_ids(conn, "t")
        first = ledger.claim(conn, ids[:3], flow_run_id="a")
        second = ledger.claim(conn, ids, flow_run_id="b")
    assert [c.id for c in first] == ids[:3]
    assert [c.id for c in second] == ids[3:]
    assert first[0].context == {"i": 0}
    engine.dispose()


def test_settle_moves_rows_to_their_final_state(warehouse_url: str) -> None:
    engine = make_engine(warehouse_url)
    with engine.begin() as conn:
        ledger.plan(conn, "t", planned(4), flow_run_id="a")
        ids = ledger.planned_ids(conn, "t")
        ledger.claim(conn, ids, flow_run_id="a")
        ledger.settle(
            conn,
            [
                SendResult(ids[0], Outcome.SENT, message_id="m0"),
                SendResult(ids[1], Outcome.FAILED, reason="400 bad"),
                SendResult(ids[2], Outcome.UNKNOWN, reason="timeout"),
                SendResult(ids[3], Outcome.RETRY, reason="503"),
            ],
        )
        rows = {r.id: r for r in conn.execute(select(send_ledger))}
        # A settled row is final: settling it again changes nothing.
        ledger.settle(conn, [SendResult(ids[1], Outcome.SENT, message_id="late")])
        again = conn.execute(select(send_ledger.c.status).where(send_ledger.c.id == ids[1]))
        assert again.scalar_one() == "failed"
    assert [rows[i].status for i in ids] == ["sent", "failed", "unknown", "planned"]
    assert rows[ids[0]].provider_message_id == "m0" and rows[ids[0]].sent_at is not None
    with engine.connect() as conn:
        assert ledger.planned_ids(conn, "t") == [ids[3]]
    engine.dispose()


def test_stale_claims_become_unknown_and_are_never_resent(warehouse_url: str) -> None:
    engine = make_engine(warehouse_url)
    with engine.begin() as conn:
        ledger.plan(conn, "t", planned(2), flow_run_id="crashed")
        ids = ledger.planned_ids(conn, "t")
        ledger.claim(conn, ids, flow_run_id="crashed")
        # One claim is an hour old (its run died), the other is fresh (still running).
        conn.execute(
            update(send_ledger)
            .where(send_ledger.c.id == ids[0])
            .values(claimed_at=utcnow() - timedelta(hours=1))
        )
        assert ledger.expire_stale_claims(conn, "t", lease=timedelta(minutes=30)) == 1
        statuses = dict(conn.execute(select(send_ledger.c.id, send_ledger.c.status)).all())
        assert ledger.claim(conn, ids, flow_run_id="next") == []
    assert statuses == {ids[0]: "unknown", ids[1]: "sending"}
    engine.dispose()


def test_release_gives_rows_back(warehouse_url: str) -> None:
    engine = make_engine(warehouse_url)
    with engine.begin() as conn:
        ledger.plan(conn, "t", planned(2), flow_run_id="a")
        ids = ledger.planned_ids(conn, "t")
        ledger.claim(conn, ids, flow_run_id="a")
        ledger.release(conn, ids, reason="not sent: run stopped")
        assert ledger.planned_ids(conn, "t") == ids
    engine.dispose()
