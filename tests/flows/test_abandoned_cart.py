"""The abandoned-cart flow end to end: real SQLite, Prefect's harness, real HTTP."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from flows.abandoned_cart import abandoned_cart
from mailflow.errors import DataQualityError, FatalRunError
from mailflow.settings import TEMPLATES_DIR, get_settings
from mailflow.sink.validation import validate_mail_send
from mailflow.unsubscribe import unsubscribe_url
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import TERMINAL_STATES, quarantine
from tests.ledger import ledger_rows, sent_per_ledger_id
from tests.shop import Shopper, build_shop

pytestmark = pytest.mark.usefixtures("prefect_harness")


def shoppers(n: int, **kw: Any) -> list[Shopper]:
    return [Shopper(email=f"user{i}@example.com", first_name=f"User{i}", **kw) for i in range(n)]


def test_happy_path_sends_each_eligible_cart_once_with_valid_payloads(env, sink) -> None:
    people = shoppers(12)
    people += [
        Shopper(email="noconsent@example.com", consent=False),
        Shopper(email="fresh@example.com", idle_hours=1),  # not idle long enough
        Shopper(email="stale@example.com", idle_hours=24 * 10),  # too old
        Shopper(email="ordered@example.com", ordered=True),  # became an order
        Shopper(email="vip@example.com", lifetime_value="5000.00"),
    ]
    build_shop(get_engine(), people)

    summary = abandoned_cart(batch_size=5)

    assert summary.sent == 13
    assert summary.excluded == {"no_consent": 1}
    assert summary.failed == {} and summary.unknown == 0 and summary.pending == 0
    rows = ledger_rows()
    assert len(rows) == 13
    assert {r.status for r in rows} == {"sent"}
    assert all(r.provider_message_id for r in rows)
    assert {r.email for r in rows} == {p.email for p in people[:12]} | {"vip@example.com"}
    assert [r.variant for r in rows if r.email == "vip@example.com"] == ["vip"]

    accepted = sink.messages()
    assert len(accepted) == 13
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in rows})
    for m in accepted:
        payload = m["payload"]
        assert validate_mail_send(payload) == []
        assert payload["categories"] == ["abandoned_cart"]
        assert payload["content"][0]["type"] == "text/plain"
        cart_url = f"{get_settings().public_base_url}/cart/"
        assert cart_url in payload["content"][1]["value"]
        # RFC 8058 one-click unsubscribe, and the same link visible in both parts.
        ledger_id = int(payload["personalizations"][0]["custom_args"]["ledger_id"])
        link = unsubscribe_url(
            get_settings().unsubscribe_base_url, get_settings().unsubscribe_key(), ledger_id
        )
        assert payload["headers"] == {
            "List-Unsubscribe": f"<{link}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
        assert link in payload["content"][0]["value"] and link in payload["content"][1]["value"]


def test_second_run_sends_nothing_new(env, sink) -> None:
    build_shop(get_engine(), shoppers(8))
    first = abandoned_cart(batch_size=3)
    second = abandoned_cart(batch_size=3)
    assert first.sent == 8
    assert second.sent == 0 and second.planned == 0
    assert second.excluded == {"already_notified": 8}
    assert len(sink.messages()) == 8
    assert all(r.status in TERMINAL_STATES for r in ledger_rows())


def test_bad_rows_are_quarantined_and_the_rest_sent(env, sink) -> None:
    people = shoppers(30)
    people += [
        Shopper(email="not-an-address"),
        Shopper(email=None),
        Shopper(email="USER0@example.com"),  # same address as user0, other customer
        Shopper(email="zero@example.com", items=[(1, 1, "0.00")]),
    ]
    build_shop(get_engine(), people)

    summary = abandoned_cart(max_bad_share=0.2)

    assert summary.sent == 30
    assert summary.quarantined_rows == 4
    with get_engine().connect() as conn:
        q = list(conn.execute(select(quarantine)))
    by_email = {r.email: r for r in q}
    assert by_email["not-an-address"].column_name == "email"
    assert "regex" in by_email["not-an-address"].expectation
    assert by_email[None].expectation == "expect_column_values_to_not_be_null"
    assert by_email["zero@example.com"].column_name == "cart_total"
    assert all(r.flow_run_id == summary.flow_run_id and r.reason for r in q)
    assert "not-an-address" not in {r.email for r in ledger_rows()}

    # The next run meets the same bad rows: known already, so neither recorded twice
    # nor counted against the gate (3 of 3 rows would otherwise fail it). The second
    # customer on user0's address is now excluded in SQL: that inbox heard from us.
    again = abandoned_cart(max_bad_share=0.05)
    assert again.sent == 0 and again.still_quarantined == 3 and again.quarantined_rows == 0
    assert again.excluded == {"already_notified": 30, "recently_notified": 1}
    with get_engine().connect() as conn:
        assert len(list(conn.execute(select(quarantine)))) == len(q)


def test_gate_fails_the_run_when_too_many_rows_are_bad(env, sink) -> None:
    people = shoppers(5) + [Shopper(email=f"bad{i}") for i in range(5)]
    build_shop(get_engine(), people)
    with pytest.raises(DataQualityError, match="mf_quarantine"):
        abandoned_cart(max_bad_share=0.05)
    assert ledger_rows() == []
    assert sink.messages() == []
    with get_engine().connect() as conn:
        assert len(list(conn.execute(select(quarantine)))) == 5


def test_batch_retried_through_503s_sends_each_key_once(env, sink) -> None:
    env.setenv("MAILFLOW_HTTP_MAX_ATTEMPTS", "2")
    get_settings.cache_clear()
    build_shop(get_engine(), shoppers(6))
    # 14 failures: more than one task attempt can absorb (6 messages × 2 tries),
    # so the Prefect task retry has to finish the job.
    sink.set_faults(script=[{"status": 503, "count": 14}])

    summary = abandoned_cart(batch_size=6)

    assert summary.sent == 6
    rows = ledger_rows()
    assert {r.status for r in rows} == {"sent"}
    assert max(r.attempts for r in rows) >= 2  # claimed again by the task retry
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in rows})


def test_400_is_recorded_and_the_rest_of_the_batch_sent(env, sink) -> None:
    build_shop(get_engine(), shoppers(5))
    sink.set_faults(fail_recipients={"user2@example.com": 400})

    summary = abandoned_cart(batch_size=10)

    assert summary.sent == 4
    assert sum(summary.failed.values()) == 1
    failed = [r for r in ledger_rows() if r.status == "failed"]
    assert [r.email for r in failed] == ["user2@example.com"]
    assert failed[0].reason.startswith("400")
    assert len(sink.messages()) == 4


def test_401_stops_the_run_and_marks_nobody_sent(env, sink) -> None:
    env.setenv("MAILFLOW_SENDGRID_API_KEY", "SG.revoked-key")
    get_settings.cache_clear()
    build_shop(get_engine(), shoppers(7))

    with pytest.raises(FatalRunError, match="API key"):
        abandoned_cart(batch_size=3)

    rows = ledger_rows()
    assert len(rows) == 7
    assert {r.status for r in rows} == {"planned"}  # nothing lost: the next run sends them
    assert all("run stopped" in (r.reason or "") for r in rows if r.attempts)
    assert sink.messages() == []

    env.delenv("MAILFLOW_SENDGRID_API_KEY")
    get_settings.cache_clear()
    again = abandoned_cart(batch_size=3)
    assert again.sent == 7
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in rows})


def test_template_error_fails_only_that_message(env, sink, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    # The VIP body asks for a field no context has: only VIPs fail, at render time.
    for vip in templates.glob("abandoned_cart/**/vip.body.html"):
        source = vip.read_text()
        assert "{% endblock %}" in source
        vip.write_text(source.replace("{% endblock %}", "{{ cart.coupon_code }}{% endblock %}", 1))
    env.setenv("MAILFLOW_TEMPLATES_DIR", str(templates))
    get_settings.cache_clear()
    build_shop(
        get_engine(), shoppers(4) + [Shopper(email="vip@example.com", lifetime_value="9000")]
    )

    summary = abandoned_cart()

    assert summary.sent == 4
    failed = [r for r in ledger_rows() if r.status == "failed"]
    assert [r.email for r in failed] == ["vip@example.com"]
    assert "coupon_code" in failed[0].reason and "template" in failed[0].reason


def test_parameters_render_as_a_typed_form_with_descriptions() -> None:
    from prefect.utilities.callables import parameter_schema

    props = parameter_schema(abandoned_cart.fn).model_dump()["properties"]
    assert set(props) == {
        "idle_hours",
        "max_age_days",
        "vip_threshold",
        "batch_size",
        "max_bad_share",
        "override_guardrail",
    }
    assert all(p.get("description") for p in props.values())
    assert props["batch_size"]["type"] == "integer" and props["batch_size"]["maximum"] == 1000


def test_overlapping_runs_send_each_cart_once(env, sink) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sink.set_faults(latency_ms=20)
    build_shop(get_engine(), shoppers(120))
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(abandoned_cart, batch_size=10) for _ in range(2)]
        summaries = [r.result() for r in runs]

    assert sum(s.sent for s in summaries) == 120
    rows = ledger_rows()
    assert len(rows) == 120 and {r.status for r in rows} == {"sent"}
    assert sent_per_ledger_id(sink) == Counter({str(r.id): 1 for r in rows})


def test_suppressed_addresses_are_excluded_in_sql(env, sink) -> None:
    from mailflow.clock import utcnow
    from mailflow.warehouse.schema import suppressions

    build_shop(get_engine(), shoppers(4) + [Shopper(email="  Bounced@Example.com ")])
    with get_engine().begin() as conn:
        conn.execute(
            suppressions.insert().values(
                email="bounced@example.com", reason="bounce", source="test", created_at=utcnow()
            )
        )
    summary = abandoned_cart()
    assert summary.sent == 4
    assert summary.excluded == {"suppressed": 1}
    assert "bounced@example.com" not in {r.email for r in ledger_rows()}


def test_guardrail_refuses_to_send_while_complaints_run_high(env, sink) -> None:
    from mailflow.clock import utcnow
    from mailflow.guardrail import GuardrailTripped
    from mailflow.warehouse.schema import events

    env.setenv("MAILFLOW_GUARDRAIL_MIN_SENT", "5")
    get_settings.cache_clear()
    first = shoppers(10)
    build_shop(get_engine(), first)
    assert abandoned_cart().sent == 10
    # One spam report among 10 recent sends: 10 %, far above the 0.3 % limit.
    with get_engine().begin() as conn:
        conn.execute(
            events.insert().values(
                natural_key="k1",
                event="spamreport",
                email="user1@example.com",
                occurred_at=utcnow(),
                raw={},
                received_at=utcnow(),
            )
        )
    build_shop(
        get_engine(), [Shopper(email=f"later{i}@example.com") for i in range(3)], first_id=100
    )
    with pytest.raises(GuardrailTripped, match="complaint rate 10.00%"):
        abandoned_cart()
    assert len(sink.messages()) == 10
    assert abandoned_cart(override_guardrail=True).sent == 3
