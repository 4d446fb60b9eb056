"""Each stage of the pipeline on its own, without Prefect: tiny inputs, a real warehouse
(SQLite, and PostgreSQL when available) and real HTTP to the local SendGrid API.

The flow tests (tests/flows) run the same functions through Prefect's harness; these
name the stage that breaks.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import func, insert, select

from mailflow import ledger
from mailflow.clock import utcnow
from mailflow.errors import ConfigError, FatalRunError
from mailflow.pipeline import audience, preflight, resources, summary
from mailflow.pipeline.plan import plan
from mailflow.pipeline.send import forget_abort, is_aborted, send_batch
from mailflow.settings import get_settings
from mailflow.triggers import get_trigger
from mailflow.warehouse.schema import events, quarantine, run_log, send_ledger
from tests.ledger import sent_per_ledger_id
from tests.shop import Shopper, build_shop

CART = get_trigger("abandoned_cart")
PARAMS = CART.params({})


def shop(res: resources.Resources) -> None:
    build_shop(
        res.engine,
        [
            Shopper(email="Ann@Example.com", first_name="Ann"),
            Shopper(email="bob@example.com", first_name="Bob"),
            Shopper(email="carl@example.com", first_name="Carl", lifetime_value="5000.00"),
            Shopper(email="not-an-address", first_name="Dora"),
            Shopper(email="eve@example.com", consent=False),
        ],
    )


def planned(res: resources.Resources, batch_size: int = 2) -> list[list[int]]:
    now = utcnow()
    found = audience.find(res, CART, PARAMS, now)
    valid = audience.validate(res, CART, found.frame, flow_run_id="r1", max_bad_share=0.5)
    return plan(res, CART, valid.frame, PARAMS, flow_run_id="r1", batch_size=batch_size).batches


def statuses(res: resources.Resources) -> dict[str, int]:
    with res.engine.connect() as conn:
        rows = conn.execute(
            select(send_ledger.c.status, func.count()).group_by(send_ledger.c.status)
        ).all()
    return {status: n for status, n in rows}


def test_find_counts_exclusions_and_validate_quarantines_once(env: Any) -> None:
    res = resources.current()
    shop(res)
    found = audience.find(res, CART, PARAMS, utcnow())
    assert (found.found, found.excluded, len(found.frame)) == (5, {"no_consent": 1}, 4)

    first = audience.validate(res, CART, found.frame, flow_run_id="r1", max_bad_share=0.1)
    assert len(first.frame) == 3 and first.bad_rows == 1 and first.still_quarantined == 0
    assert first.gate_error is not None and "max_bad_share" in first.gate_error
    # The next run sees the same bad row: validated again, not recorded twice, and not
    # held against the gate (it is not new).
    again = audience.validate(res, CART, found.frame, flow_run_id="r2", max_bad_share=0.1)
    assert (again.bad_rows, again.still_quarantined, again.all_bad) == (0, 1, 1)
    assert again.gate_error is None
    with res.engine.connect() as conn:
        kept = conn.execute(select(quarantine.c.email, quarantine.c.flow_run_id)).all()
    assert kept == [("not-an-address", "r1")]
    # A preview records nothing and counts every bad row.
    preview = audience.validate(
        res, CART, found.frame, flow_run_id=None, max_bad_share=1.0, record=False
    )
    assert preview.bad_rows == 1


def test_plan_writes_each_key_once_and_batches_what_is_planned(env: Any) -> None:
    res = resources.current()
    shop(res)
    batches = planned(res, batch_size=2)
    assert [len(b) for b in batches] == [2, 1]
    with res.engine.connect() as conn:
        rows = conn.execute(select(send_ledger.c.email, send_ledger.c.variant)).all()
    # Addresses are stored normalised; the VIP gets the VIP variant.
    assert sorted(rows) == [
        ("ann@example.com", None),
        ("bob@example.com", None),
        ("carl@example.com", "vip"),
    ]
    # Planning again offers nothing new and hands back the same unsent rows.
    assert sorted(sum(planned(res, batch_size=10), [])) == sorted(sum(batches, []))
    assert statuses(res) == {"planned": 3}


def test_send_batch_sends_each_claimed_row_once_over_http(env: Any, sink: Any) -> None:
    res = resources.current()
    shop(res)
    ids = sum(planned(res), [])
    report = asyncio.run(send_batch(res, CART, ids, flow_run_id="r1"))
    assert (report.claimed, report.outcomes) == (3, {"sent": 3})
    # A retry of the same batch claims nothing, so it sends nothing.
    again = asyncio.run(send_batch(res, CART, ids, flow_run_id="r1"))
    assert (again.claimed, again.outcomes) == (0, {})
    assert sent_per_ledger_id(sink) == {str(i): 1 for i in ids}
    assert statuses(res) == {"sent": 3}


def test_a_refused_key_stops_the_run_and_hands_rows_back(env: Any, sink: Any) -> None:
    res = resources.current()
    shop(res)
    ids = sum(planned(res), [])
    refused = resources.Resources(
        settings=get_settings().model_copy(
            update={
                "demo": False,
                "sendgrid_api_key": SecretStr("SG.wrong-key-for-this-test"),
                "unsubscribe_secret": SecretStr("test-only-unsubscribe-secret-0123456789"),
            }
        ),
        engine=res.engine,
        renderer=res.renderer,
    )
    run_id = f"refused-{uuid.uuid4()}"  # the stop registry is per process
    with pytest.raises(FatalRunError, match="401"):
        asyncio.run(send_batch(refused, CART, ids, flow_run_id=run_id))
    assert statuses(res) == {"planned": 3}
    assert sink.messages() == []
    # Every other batch of the run, in any process, sees the stop mark and sends nothing.
    forget_abort(run_id)  # as a batch in another process, which only has the stop mark
    assert is_aborted(res, run_id, away_from_flow=True)
    later = asyncio.run(send_batch(res, CART, ids, flow_run_id=run_id))
    assert later.claimed == 0 and statuses(res) == {"planned": 3}


class LosesNetworkAfter:
    """The real mailer of a process that loses its network after ``n`` messages."""

    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n = inner, n

    async def send_many(self, messages: Any, on_result: Any = None) -> Any:
        async def first_n() -> Any:
            handed = 0
            async for message in messages:
                if handed == self.n:
                    await asyncio.sleep(0.5)  # the requests in flight are answered
                    raise OSError("Network is unreachable")
                handed += 1
                yield message

        return await self.inner.send_many(first_n(), on_result=on_result)


def test_a_batch_that_fails_midway_writes_its_answers_and_gives_back_what_it_never_sent(
    env: Any, sink: Any
) -> None:
    res = resources.Resources(
        settings=get_settings().model_copy(update={"settle_every": 5}),
        engine=resources.current().engine,
        renderer=resources.current().renderer,
    )
    build_shop(res.engine, [Shopper(email=f"user{i}@example.com") for i in range(20)])
    ids = sum(planned(res, batch_size=20), [])

    async def send() -> None:
        mailer = res.mailer()
        try:
            await send_batch(res, CART, ids, flow_run_id="r1", mailer=LosesNetworkAfter(mailer, 5))
        finally:
            await mailer.aclose()

    with pytest.raises(ExceptionGroup) as raised:  # from the mailer's task group
        asyncio.run(send())
    assert raised.group_contains(OSError, match="unreachable")
    # The five answered are sent. The sixth reached the mailer unanswered: it may have
    # gone out, so it waits for reconciliation. The rest of its group and the group
    # claimed ahead never reached the mailer: planned again, like the ones never claimed.
    assert statuses(res) == {"sent": 5, "sending": 1, "planned": 14}
    assert len(sent_per_ledger_id(sink)) == 5


def test_complete_counts_from_the_ledger_and_flags_what_is_pending(env: Any) -> None:
    res = resources.current()
    shop(res)
    ids = sum(planned(res), [])
    started = utcnow() - timedelta(seconds=1)
    with res.engine.begin() as conn:
        claimed = ledger.claim(conn, ids[:1], flow_run_id="r1")
    assert len(claimed) == 1
    done = summary.complete(res, summary.RunSummary(trigger=CART.name, flow_run_id="r1"), started)
    # One claimed (still sending) and two planned, never tried: all three are pending.
    assert (done.sent, done.pending) == (0, 3)
    assert done.error is not None and "3 messages are still pending" in done.error
    with res.engine.connect() as conn:
        stored = conn.execute(select(run_log.c.summary)).scalar_one()
    assert stored["pending"] == 3 and stored["flow_run_id"] == "r1"


def test_preflight_refuses_missing_keys_outside_demo_mode(env: Any) -> None:
    res = resources.current()
    production = resources.Resources(
        settings=get_settings().model_copy(
            update={"demo": False, "sendgrid_api_key": None, "sendgrid_api_key_block": None}
        ),
        engine=res.engine,
        renderer=res.renderer,
    )
    with pytest.raises(ConfigError, match="MAILFLOW_SENDGRID_API_KEY"):
        preflight.check_sending(production, CART)
    preflight.check_sending(res, CART)  # demo mode: the local API's demo key
    preflight.check_templates(res, CART)


def test_the_error_budget_stops_a_run_whose_answers_are_mostly_refusals(
    env: Any, sink: Any
) -> None:
    res = resources.current()
    build_shop(
        res.engine,
        [Shopper(email=f"user{i}@example.com", first_name=f"U{i}") for i in range(8)],
    )
    budget = resources.from_settings(
        get_settings().model_copy(update={"run_failure_min": 2, "run_max_failure_share": 0.5})
    )
    batches = planned(budget, batch_size=2)
    with res.engine.connect() as conn:
        email = dict(conn.execute(select(send_ledger.c.id, send_ledger.c.email)).all())
    # SendGrid refuses three addresses for good (400): one in the first batch (1 of 2 is
    # within a budget of half), both in the second (3 of 4 is not).
    refused = [batches[0][0], batches[1][0], batches[1][1]]
    sink.set_faults(fail_recipients={email[i]: 400 for i in refused})
    run_id = f"budget-{uuid.uuid4()}"
    first = asyncio.run(send_batch(budget, CART, batches[0], flow_run_id=run_id))
    assert first.outcomes == {"sent": 1, "failed": 1}  # 1 of 2: not more than half
    with pytest.raises(FatalRunError, match="error budget spent: 3 of 4 .*MAILFLOW_RUN_MAX"):
        asyncio.run(send_batch(budget, CART, batches[1], flow_run_id=run_id))
    # The run's other batches send nothing; their rows stay planned for the next run.
    for batch in batches[2:]:
        assert asyncio.run(send_batch(budget, CART, batch, flow_run_id=run_id)).claimed == 0
    forget_abort(run_id)  # as a batch in another process: only the stop mark tells it
    assert is_aborted(res, run_id, away_from_flow=True)
    assert statuses(res) == {"sent": 1, "failed": 3, "planned": 4}
    assert len(sink.messages()) == 1


def test_bounces_reported_during_the_run_count_against_its_budget(env: Any, sink: Any) -> None:
    res = resources.current()
    build_shop(res.engine, [Shopper(email=f"user{i}@example.com") for i in range(6)])
    budget = resources.from_settings(
        get_settings().model_copy(update={"run_failure_min": 2, "run_max_failure_share": 0.4})
    )
    batches = planned(budget, batch_size=2)
    run_id = f"bounces-{uuid.uuid4()}"
    assert asyncio.run(send_batch(budget, CART, batches[0], flow_run_id=run_id)).outcomes == {
        "sent": 2
    }
    # SendGrid reports both first messages bounced (as the webhook stores such events).
    now = utcnow()
    with res.engine.begin() as conn:
        conn.execute(
            insert(events),
            [
                {
                    "natural_key": f"bounce-{i}",
                    "event": "bounce",
                    "email": "x@example.com",
                    "occurred_at": now,
                    "ledger_id": i,
                    "raw": {},
                    "received_at": now,
                }
                for i in batches[0]
            ],
        )
    # The next batch is sent, then the run stops: 2 of 4 bounced is more than 40 %.
    with pytest.raises(FatalRunError, match=r"2 of 4 .*refused for good \(0\) or bounced \(2\)"):
        asyncio.run(send_batch(budget, CART, batches[1], flow_run_id=run_id))
    assert asyncio.run(send_batch(budget, CART, batches[2], flow_run_id=run_id)).claimed == 0
    forget_abort(run_id)
    assert statuses(res) == {"sent": 4, "planned": 2}
