"""The local SendGrid API's suppression endpoints, over real HTTP: auth, paging, shapes,
fed by the outcomes the sink decides (with and without a webhook), global unsubscribes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mailflow.settings import DEMO_API_KEY
from mailflow.sink.testing import SinkHandle, running_sink
from tests.mailflow.test_sink import FORBIDDEN_KEY, UNAUTHORIZED, mail

LIST_PATHS = [
    "/v3/suppression/bounces",
    "/v3/suppression/blocks",
    "/v3/suppression/invalid_emails",
    "/v3/suppression/spam_reports",
    "/v3/suppression/unsubscribes",
    "/v3/asm/suppressions",
]


@pytest.fixture(scope="module")
def running() -> Iterator[SinkHandle]:
    with running_sink(forbidden_keys=(FORBIDDEN_KEY,)) as handle:
        yield handle


@pytest.fixture
def sink(running: SinkHandle) -> SinkHandle:
    running.client.delete("/_sink/suppressions").raise_for_status()
    return running


@pytest.fixture
def http(sink: SinkHandle) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {sink.api_key}"}
    with httpx.Client(base_url=sink.url, headers=headers, trust_env=False, timeout=10) as client:
        yield client


def get(http: httpx.Client, path: str, **params: Any) -> Any:
    response = http.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("path", LIST_PATHS)
@pytest.mark.parametrize("authorization", [None, "Bearer SG.wrong", f"Token {DEMO_API_KEY}"])
def test_lists_need_a_key_like_mail_send(
    sink: SinkHandle, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with httpx.Client(base_url=sink.url, trust_env=False) as client:
        response = client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED


@pytest.mark.parametrize("path", [*LIST_PATHS, "/v3/asm/suppressions/global"])
def test_a_forbidden_key_is_403(sink: SinkHandle, path: str) -> None:
    headers = {"Authorization": f"Bearer {FORBIDDEN_KEY}"}
    with httpx.Client(base_url=sink.url, trust_env=False, headers=headers) as client:
        if path.endswith("/global"):
            response = client.post(path, json={"recipient_emails": ["a@example.com"]})
        else:
            response = client.get(path)
    assert response.status_code == 403
    assert response.json()["errors"][0]["message"] == "access forbidden"
    assert sink.suppression_counts()["unsubscribes"] == 0


def test_outcomes_decided_at_send_fill_the_lists_with_the_spec_shapes(
    sink: SinkHandle, http: httpx.Client
) -> None:
    before = int(time.time())
    for to in (
        "bounce1@example.com",
        "blocked1@example.com",
        "drop1@example.com",
        "spam1@example.com",
        "unsub1@example.com",
        "open1@example.com",
        "Bounce1@Example.com",  # the same address again: still one entry
    ):
        assert http.post("/v3/mail/send", json=mail(to)).status_code == 202
    after = int(time.time())

    bounces = get(http, "/v3/suppression/bounces")
    assert [set(b) for b in bounces] == [{"created", "email", "reason", "status"}]
    assert bounces[0]["email"] == "bounce1@example.com" and bounces[0]["status"] == "5.1.1"
    assert before <= bounces[0]["created"] <= after
    blocks = get(http, "/v3/suppression/blocks")
    assert [(b["email"], set(b)) for b in blocks] == [
        ("blocked1@example.com", {"created", "email", "reason", "status"})
    ]
    invalid = get(http, "/v3/suppression/invalid_emails")
    assert [(b["email"], set(b)) for b in invalid] == [
        ("drop1@example.com", {"created", "email", "reason"})
    ]
    spam = get(http, "/v3/suppression/spam_reports")
    assert [(b["email"], set(b)) for b in spam] == [
        ("spam1@example.com", {"created", "email", "ip"})
    ]
    unsubscribes = get(http, "/v3/suppression/unsubscribes")
    assert [(b["email"], set(b)) for b in unsubscribes] == [
        ("unsub1@example.com", {"created", "email"})
    ]
    assert get(http, "/v3/asm/suppressions") == []


def test_outcomes_drawn_for_the_webhook_are_recorded_too() -> None:
    # With a webhook the outcome RNG decides; every bounce it draws is on the list.
    with running_sink(
        webhook_url="http://127.0.0.1:9/never", bounce_rate=1.0, events_seed=1
    ) as handle:
        headers = {"Authorization": f"Bearer {handle.api_key}"}
        with httpx.Client(base_url=handle.url, headers=headers, trust_env=False) as http:
            for i in range(3):
                assert http.post("/v3/mail/send", json=mail(f"c{i}@example.com")).status_code == 202
            emails = {b["email"] for b in get(http, "/v3/suppression/bounces")}
    assert emails == {"c0@example.com", "c1@example.com", "c2@example.com"}


def test_paging_limit_offset_and_time_range(sink: SinkHandle, http: httpx.Client) -> None:
    seeded = [{"email": f"b{i:04d}@example.com", "created": 1_700_000_000 + i} for i in range(1200)]
    assert sink.seed_suppressions(bounces=seeded) == {"bounces": 1200}
    assert sink.seed_suppressions(bounces=seeded[:10]) == {"bounces": 0}  # idempotent

    first = get(http, "/v3/suppression/bounces")
    assert len(first) == 500  # SendGrid's default and maximum page size
    assert first[0]["email"] == "b1199@example.com"  # newest first
    pages = [get(http, "/v3/suppression/bounces", limit=500, offset=o) for o in (0, 500, 1000)]
    assert [len(p) for p in pages] == [500, 500, 200]
    assert len({b["email"] for p in pages for b in p}) == 1200

    window = get(
        http,
        "/v3/suppression/bounces",
        start_time=1_700_000_010,
        end_time=1_700_000_019,
        limit=4,
        offset=8,
    )
    assert [b["created"] for b in window] == [1_700_000_011, 1_700_000_010]
    assert [b["email"] for b in get(http, "/v3/suppression/bounces", email="B0007")] == [
        "b0007@example.com"
    ]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 501}, "limit"),
        ({"limit": 0}, "limit"),
        ({"offset": -1}, "offset"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"end_time": "1.5"}, "end_time"),
    ],
)
def test_bad_paging_is_400_naming_the_field(
    http: httpx.Client, params: dict[str, Any], field: str
) -> None:
    response = http.get("/v3/suppression/spam_reports", params=params)
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == field


def test_group_unsubscribes_have_the_asm_shape(sink: SinkHandle, http: httpx.Client) -> None:
    sink.seed_suppressions(
        group_unsubscribes=[
            {"email": "g1@example.com", "group_id": 7, "group_name": "News", "created": 5},
            "g2@example.com",
        ]
    )
    groups = get(http, "/v3/asm/suppressions")
    assert [set(g) for g in groups] == [{"email", "group_id", "group_name", "created_at"}] * 2
    assert {(g["email"], g["group_id"]) for g in groups} == {
        ("g1@example.com", 7),
        ("g2@example.com", 1),
    }


def test_global_unsubscribes_are_added_once(sink: SinkHandle, http: httpx.Client) -> None:
    body = {"recipient_emails": ["x@example.com", "y@example.com"]}
    for _ in range(2):
        response = http.post("/v3/asm/suppressions/global", json=body)
        assert response.status_code == 201
        assert response.json() == body
    listed = get(http, "/v3/suppression/unsubscribes")
    assert sorted(u["email"] for u in listed) == ["x@example.com", "y@example.com"]
    bad = http.post("/v3/asm/suppressions/global", json={"recipient_emails": "x@example.com"})
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["field"] == "recipient_emails"


def test_seeding_refuses_an_unknown_list(sink: SinkHandle) -> None:
    response = sink.client.post("/_sink/suppressions", json={"bounced": ["a@example.com"]})
    assert response.status_code == 400
    assert "unknown suppression list 'bounced'" in response.json()["errors"][0]["message"]
