"""The campaign flow end to end: real SQLite, Prefect's harness, real HTTP to the local API."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from prefect.exceptions import FlowPauseTimeout
from sqlalchemy import select
from typer.testing import CliRunner

from flows.campaign import campaign
from flows.engagement_rollup import engagement_rollup
from mailflow import cli
from mailflow.campaigns.model import Campaign, parse_campaign
from mailflow.clock import utcnow
from mailflow.settings import get_settings
from mailflow.sink.validation import validate_mail_send
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import (
    campaign_approvals,
    campaign_assignments,
    campaign_results,
    campaign_split,
    send_ledger,
)
from tests.campaigns.approval import resume_when_paused
from tests.campaigns.shop import Person, add_people

pytestmark = pytest.mark.usefixtures("prefect_harness")


def spec(name: str, **over: Any) -> Campaign:
    data: dict[str, Any] = {
        "name": name,
        "template": "campaign_spring",
        "segment": {"field": "country", "op": "in", "value": ["DE", "FR"]},
        "variants": [
            {"name": "control", "share": 0.5, "subject": {"en": "Spring", "de": "Frühling"}},
            {"name": "urgency", "share": 0.5, "subject": "Last days"},
        ],
        "holdout_share": 0.2,
    }
    data.update(over)
    return parse_campaign(data)


def params(c: Campaign, **over: Any) -> dict[str, Any]:
    d = c.definition()
    d.update(over)
    return d


def people(n: int, **kw: Any) -> list[Person]:
    return [Person(email=f"p{i}@example.com", first_name=f"P{i}", **kw) for i in range(n)]


def ledger_rows(trigger: str) -> list[Any]:
    with get_engine().connect() as conn:
        return list(conn.execute(select(send_ledger).where(send_ledger.c.trigger == trigger)))


def test_dry_run_previews_and_sends_nothing(env, sink) -> None:  # type: ignore[no-untyped-def]
    add_people(get_engine(), people(40) + people(5, country="US", locale="en"), first_id=1)
    c = spec("dry")
    summary = campaign(**params(c), dry_run=True)
    assert summary.decision == "dry_run"
    assert summary.found == 40
    assert sum(summary.arms.values()) == 40
    assert set(summary.arms) <= {"control", "urgency", "holdout"}
    assert ledger_rows(c.trigger) == [] and sink.messages() == []
    files = list((get_settings().campaign_preview_dir / "dry").rglob("*.html"))
    assert len(files) == 6  # 3 samples x 2 variants
    assert all("Frühling" in f.read_text() for f in files)


def test_approved_campaign_sends_once_and_holdout_gets_nothing(env, sink) -> None:  # type: ignore[no-untyped-def]
    ids = add_people(get_engine(), people(60))
    add_people(get_engine(), [Person(email="noconsent@example.com", consent=False)], first_id=100)
    c = spec("approve_me")
    answer = {"approve": True, "approver": "marketer@example.com", "comment": "go"}
    thread = resume_when_paused(c.name, answer)
    summary = campaign(**params(c), approval_timeout_s=120)
    thread.join(5)
    assert summary.decision == "approved" and summary.approver == "marketer@example.com"
    assert summary.excluded == {"no_consent": 1}
    arms = summary.arms
    assert arms["holdout"] > 0 and summary.sent == 60 - arms["holdout"]
    rows = ledger_rows(c.trigger)
    assert {r.status for r in rows} == {"sent"}
    assert {r.dedupe_key for r in rows} == {f"campaign:approve_me:{r.customer_id}" for r in rows}
    with get_engine().connect() as conn:
        assigned = dict(
            conn.execute(
                select(campaign_assignments.c.customer_id, campaign_assignments.c.arm).where(
                    campaign_assignments.c.campaign == c.name
                )
            ).all()
        )
        approval = conn.execute(select(campaign_approvals)).one()
    assert set(assigned) == set(ids)
    held = {cid for cid, arm in assigned.items() if arm == "holdout"}
    assert held and not held & {r.customer_id for r in rows}
    assert {r.variant for r in rows} == {"control", "urgency"}
    assert approval.decision == "approved" and approval.approver == "marketer@example.com"
    assert approval.decided_at is not None and approval.comment == "go"
    accepted = sink.messages()
    assert len(accepted) == len(rows)
    for m in accepted:
        assert validate_mail_send(m["payload"]) == []
        assert m["payload"]["categories"] == ["campaign:approve_me"]
        assert "List-Unsubscribe" in m["payload"]["headers"]

    # A rerun plans nothing new: everyone is already in the ledger or held out.
    again_thread = resume_when_paused(c.name, answer)
    again = campaign(**params(c), approval_timeout_s=120)
    again_thread.join(5)
    assert again.sent == 0 and again.planned == 0
    assert again.excluded == {"already_notified": len(rows), "no_consent": 1}
    assert len(sink.messages()) == len(rows)
    assert Counter(
        m["payload"]["personalizations"][0]["custom_args"]["ledger_id"] for m in sink.messages()
    ) == Counter({str(r.id): 1 for r in rows})

    # The analyst's view: every arm, holdout included, from `mailflow report --campaign`.
    env.setattr(cli.console, "width", 200)
    out = CliRunner().invoke(cli.app, ["report", "--campaign", c.name])
    assert out.exit_code == 0, out.output
    assert all(arm in out.output for arm in ("control", "urgency", "holdout")), out.output
    assert "split as configured" in out.output or "MISMATCH" in out.output
    with get_engine().connect() as conn:
        split = {r.arm: r for r in conn.execute(select(campaign_split))}
    assert set(split) == {"control", "urgency", "holdout"}
    assert split["holdout"].configured_share == pytest.approx(0.2)
    assert (
        sum(r.assigned for r in split.values())
        == sum(1 for r in ledger_rows(c.trigger)) + split["holdout"].assigned
    )
    missing = CliRunner().invoke(cli.app, ["report", "--campaign", "no_such_campaign"])
    assert missing.exit_code == 2 and "no_such_campaign" in missing.output

    # The scheduled rollup keeps the results of recent campaigns up to date.
    rolled = engagement_rollup()
    assert rolled["campaigns"] == [c.name]
    assert rolled["messages"] == len(rows)
    with get_engine().connect() as conn:
        arms = set(
            conn.execute(
                select(campaign_results.c.arm).where(campaign_results.c.campaign == c.name)
            ).scalars()
        )
    assert arms == {"control", "urgency", "holdout", "all_variants"}  # and campaign vs holdout


def test_rejected_campaign_sends_nothing(env, sink) -> None:  # type: ignore[no-untyped-def]
    add_people(get_engine(), people(10))
    c = spec("reject_me")
    thread = resume_when_paused(
        c.name, {"approve": False, "approver": "boss@example.com", "comment": "not now"}
    )
    summary = campaign(**params(c), approval_timeout_s=120)
    thread.join(5)
    assert summary.decision == "rejected" and summary.sent == 0
    assert ledger_rows(c.trigger) == [] and sink.messages() == []
    with get_engine().connect() as conn:
        approval = conn.execute(select(campaign_approvals)).one()
        assert conn.execute(select(campaign_assignments)).all() == []
    assert (approval.decision, approval.approver, approval.comment) == (
        "rejected",
        "boss@example.com",
        "not now",
    )


def test_timed_out_approval_sends_nothing(env, sink) -> None:  # type: ignore[no-untyped-def]
    add_people(get_engine(), people(10))
    c = spec("nobody_answers")
    with pytest.raises(FlowPauseTimeout):
        campaign(**params(c), approval_timeout_s=2)
    assert ledger_rows(c.trigger) == [] and sink.messages() == []
    with get_engine().connect() as conn:
        approval = conn.execute(select(campaign_approvals)).one()
    assert approval.decision == "timed_out" and approval.decided_at is not None


def test_frequency_cap_counts_marketing_across_flows(env, sink) -> None:  # type: ignore[no-untyped-def]
    from flows.abandoned_cart import abandoned_cart
    from tests.shop import Shopper, build_shop

    env.setenv("MAILFLOW_FREQUENCY_CAP", "2")
    get_settings.cache_clear()
    build_shop(get_engine(), [Shopper(email=f"cart{i}@example.com") for i in range(4)])
    add_people(get_engine(), people(3, country="US", locale="en"), first_id=10)
    assert abandoned_cart().sent == 4  # one marketing message each for the cart owners

    us = {"field": "country", "op": "eq", "value": "US"}
    first = spec("cap_a", segment=us, holdout_share=0.0)
    thread = resume_when_paused(first.name, {"approve": True, "approver": "m"})
    assert campaign(**params(first), approval_timeout_s=120).sent == 7  # 1 < cap for all
    thread.join(5)

    # Now the cart owners had two marketing messages in 7 days: capped everywhere.
    second = campaign(**params(spec("cap_b", segment=us)), dry_run=True)
    assert second.excluded == {"frequency_capped": 4}
    assert sum(second.arms.values()) == 3
    # The other way round: customer 10 got one campaign message and now leaves a cart;
    # with a cap of 1 the abandoned-cart flow leaves them out.
    env.setenv("MAILFLOW_FREQUENCY_CAP", "1")
    get_settings.cache_clear()
    from mailflow.warehouse.schema import cart_items, carts

    idle = utcnow() - timedelta(hours=6)
    with get_engine().begin() as conn:
        conn.execute(
            carts.insert().values(id=500, customer_id=10, created_at=idle, updated_at=idle)
        )
        conn.execute(
            cart_items.insert().values(cart_id=500, product_id=1, quantity=1, unit_price=5)
        )
    assert abandoned_cart().excluded == {"already_notified": 4, "frequency_capped": 1}
    # Transactional messages are never capped.
    notice = campaign(**params(spec("cap_t", segment=us, kind="transactional")), dry_run=True)
    assert "frequency_capped" not in notice.excluded and sum(notice.arms.values()) == 7


def test_quiet_hours_schedule_with_send_at_or_defer_across_timezones(env, sink) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from mailflow.ledger import DEFERRED_REASON

    zones = ["UTC", "Europe/Berlin", "Asia/Tokyo"]
    add_people(
        get_engine(),
        [Person(email=f"tz{i}@example.com", timezone=z) for i, z in enumerate(zones)],
    )
    days = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    today = datetime.now(UTC).weekday()
    tomorrow, yesterday = days[(today + 1) % 7], days[(today - 1) % 7]
    window = {"start": "00:00", "end": "23:59", "days": [tomorrow]}
    soon = spec("quiet", holdout_share=0.0, send_window=window)
    thread = resume_when_paused(soon.name, {"approve": True, "approver": "m"})
    summary = campaign(**params(soon), approval_timeout_s=120)
    thread.join(5)
    assert summary.sent == 3 and summary.pending == 0
    now = datetime.now(UTC)
    by_email = {m["payload"]["personalizations"][0]["to"][0]["email"]: m for m in sink.messages()}
    for i, zone in enumerate(zones):
        payload = by_email[f"tz{i}@example.com"]["payload"]
        assert validate_mail_send(payload) == []
        local_now = now.astimezone(ZoneInfo(zone))
        if "send_at" not in payload:  # already inside the window where they live
            assert days[local_now.weekday()] == tomorrow
            continue
        at = datetime.fromtimestamp(payload["send_at"], UTC)
        assert timedelta(0) < at - now <= timedelta(hours=72)
        local = at.astimezone(ZoneInfo(zone))
        assert (days[local.weekday()], local.hour, local.minute) == (tomorrow, 0, 0)

    # A window that opens more than 72 h ahead: nothing dropped, rows wait in the ledger.
    later = spec("quiet_later", holdout_share=0.0, send_window={**window, "days": [yesterday]})
    thread = resume_when_paused(later.name, {"approve": True, "approver": "m"})
    summary = campaign(**params(later), approval_timeout_s=120)
    thread.join(5)
    assert summary.sent == 0 and summary.pending == 3
    rows = ledger_rows(later.trigger)
    assert {(r.status, r.reason) for r in rows} == {("planned", DEFERRED_REASON)}


def test_two_customers_sharing_an_address_get_one_message_even_on_rerun(env, sink) -> None:  # type: ignore[no-untyped-def]
    # Dirty CRMs hold the same inbox under two customer records.
    add_people(
        get_engine(),
        [Person(email="shared@example.com"), Person(email="Shared@Example.com")] + people(6),
    )
    c = spec("shared_inbox", holdout_share=0.0)
    answer = {"approve": True, "approver": "m@example.com", "comment": ""}
    sent = 0
    for attempt in range(2):
        thread = resume_when_paused(c.name, answer)
        # One duplicate address in eight rows: above the default 5 % gate.
        summary = campaign(**params(c), approval_timeout_s=120, max_bad_share=0.25)
        thread.join(5)
        sent += summary.sent
        if attempt == 1:
            assert summary.sent == 0
            assert summary.excluded.get("recently_notified") == 1, summary.excluded
    to_shared = [
        m
        for m in sink.messages()
        if m["payload"]["personalizations"][0]["to"][0]["email"].strip().lower()
        == "shared@example.com"
    ]
    assert len(to_shared) == 1
    assert sent == len(sink.messages()) == 7
