"""Suppression sync against the local SendGrid API over real HTTP, on both warehouses:
every list pulled with paging, increments, idempotence, the push of local unsubscribes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from mailflow import suppressions as manual
from mailflow.errors import FatalRunError
from mailflow.provider_suppressions import LISTS, PUSH_LIST, SendGridSuppressions, sync
from mailflow.settings import get_settings
from mailflow.sink.testing import SinkHandle
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import suppression_pushes, suppressions, watermarks
from tests.mailflow.test_sink import mail

PAST = 1_700_000_000


@pytest.fixture
def client(env: pytest.MonkeyPatch) -> Iterator[SendGridSuppressions]:
    with SendGridSuppressions.from_settings(get_settings(), page_size=100) as api:
        yield api


def seeded(prefix: str, n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"email": f"{prefix}{i}@example.com", "created": PAST + i, **extra} for i in range(n)]


def rows_by_source() -> dict[tuple[str | None, str], int]:
    with get_engine().connect() as conn:
        found = conn.execute(
            select(suppressions.c.source, suppressions.c.reason, func.count()).group_by(
                suppressions.c.source, suppressions.c.reason
            )
        ).all()
    return {(source, reason): n for source, reason, n in found}


def send(sink: SinkHandle, *recipients: str) -> None:
    headers = {"Authorization": f"Bearer {sink.api_key}"}
    with httpx.Client(base_url=sink.url, headers=headers, trust_env=False) as http:
        for to in recipients:
            assert http.post("/v3/mail/send", json=mail(to)).status_code == 202


def test_every_list_is_pulled_across_pages_once(
    sink: SinkHandle, client: SendGridSuppressions
) -> None:
    sink.seed_suppressions(
        bounces=seeded("Old.Bounce", 250),
        blocks=seeded("blk", 7),
        invalid_emails=seeded("inv", 5),
        spam_reports=seeded("spm", 30),
        unsubscribes=seeded("uns", 12),
        group_unsubscribes=seeded("grp", 3, group_id=4, group_name="News"),
    )
    send(sink, "bounce-new@example.com", "drop-new@example.com", "spam-new@example.com")

    first = sync(get_engine(), client)

    pulled = {name: (r.fetched, r.added, r.pages) for name, r in first.pulled.items()}
    assert pulled == {
        "bounces": (251, 251, 3),  # 100 + 100 + 51: paged until the short page
        "blocks": (7, 0, 1),  # fetched, never stored (a block is no dead address)
        "invalid_emails": (6, 6, 1),
        "spam_reports": (31, 31, 1),
        "unsubscribes": (12, 12, 1),
        "group_unsubscribes": (3, 3, 1),
    }
    assert first.counts()["added"] == 303 and first.pushed == 0
    assert rows_by_source() == {
        ("sendgrid:bounces", "bounce"): 251,
        ("sendgrid:invalid_emails", "dropped"): 6,
        ("sendgrid:spam_reports", "spamreport"): 31,
        ("sendgrid:unsubscribes", "unsubscribe"): 12,
        ("sendgrid:group_unsubscribes", "group_unsubscribe"): 3,
    }
    with get_engine().connect() as conn:
        emails = set(conn.execute(select(suppressions.c.email)).scalars())
        marks = set(conn.execute(select(watermarks.c.name)).scalars())
    assert "old.bounce0@example.com" in emails  # lower-cased like every suppression
    assert {"sendgrid:bounces", "sendgrid:blocks", "sendgrid:unsubscribes"} <= marks

    second = sync(get_engine(), client)
    # Increments: only the last minutes are asked again (the seeded entries are older),
    # and nothing is added twice.
    assert second.pulled["bounces"].fetched == 1
    assert second.pulled["group_unsubscribes"].fetched == 3  # no time range at SendGrid
    assert second.counts()["added"] == 0
    assert sum(rows_by_source().values()) == 303


def test_a_stronger_reason_replaces_a_marketing_only_one(
    sink: SinkHandle, client: SendGridSuppressions
) -> None:
    with get_engine().begin() as conn:
        manual.add(conn, [("t", "Was.Unsub@example.com", "unsubscribe")], source="one-click:1")
        manual.add(conn, [("t", "kept@example.com", "manual")], source="cli")
    sink.seed_suppressions(bounces=["was.unsub@example.com"], unsubscribes=["kept@example.com"])
    result = sync(get_engine(), client, lists=[])
    assert result.pushed == 2  # both were mailflow's own
    result = sync(get_engine(), client)
    assert (result.pulled["bounces"].added, result.pulled["bounces"].upgraded) == (0, 1)
    assert result.pulled["unsubscribes"].added == 0
    with get_engine().connect() as conn:
        rows = dict(
            conn.execute(select(suppressions.c.email, suppressions.c.source)).tuples().all()
        )
    assert rows == {"was.unsub@example.com": "sendgrid:bounces", "kept@example.com": "cli"}


def test_local_unsubscribes_are_pushed_once_in_chunks(
    sink: SinkHandle, client: SendGridSuppressions
) -> None:
    with get_engine().begin() as conn:
        manual.add(conn, [("t", "phone@example.com", "manual")], source="cli")
        manual.add(conn, [("t", "click@example.com", "unsubscribe")], source="one-click:7")
        manual.add(conn, [("t", "old@example.com", "manual")], source="import:old.csv")
        # Not pushed: SendGrid's own, from its events, and reasons other than unsubscribing.
        manual.add(conn, [("t", "evt@example.com", "unsubscribe")], source="event:abc")
        manual.add(conn, [("t", "law@example.com", "legal request")], source="cli")
        manual.add(conn, [("t", "bnc@example.com", "bounce")], source="cli")

    first = sync(get_engine(), client, push_chunk=2)
    assert (first.pushed, first.push_requests) == (3, 2)
    unsubscribes = next(spec for spec in LISTS if spec.name == "unsubscribes")
    listed = client.entries(unsubscribes, start_time=None, end_time=2**31)
    assert {e["email"] for page in listed for e in page} == {
        "phone@example.com",
        "click@example.com",
        "old@example.com",
    }
    with get_engine().connect() as conn:
        pushed = set(
            conn.execute(
                select(suppression_pushes.c.email).where(
                    suppression_pushes.c.provider_list == PUSH_LIST
                )
            ).scalars()
        )
    assert pushed == {"phone@example.com", "click@example.com", "old@example.com"}

    second = sync(get_engine(), client, push_chunk=2)
    assert (second.pushed, second.push_requests) == (0, 0)
    # Pulled back from SendGrid's list, they stay mailflow's rows.
    assert second.pulled["unsubscribes"].added == 0
    assert rows_by_source()[("cli", "manual")] == 1


def test_a_refused_key_names_the_setting(env: pytest.MonkeyPatch, sink: SinkHandle) -> None:
    with (
        SendGridSuppressions(sink.url, "SG.not-a-key") as api,
        pytest.raises(FatalRunError, match="MAILFLOW_SENDGRID_API_KEY") as raised,
    ):
        sync(get_engine(), api)
    assert "401" in str(raised.value)
