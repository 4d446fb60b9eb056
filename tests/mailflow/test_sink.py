"""The local SendGrid API, over real HTTP on loopback (no mocks).

One sink runs in a background thread for the module; each test starts from a
clean store and the start-up fault settings.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from mailflow.settings import DEMO_API_KEY
from mailflow.sink import SinkConfig, validate_mail_send
from mailflow.sink.cli import sink_app
from mailflow.sink.testing import SinkHandle, running_sink
from mailflow.sink.validation import HELP_BASE, mail_send_schema

SECOND_KEY = "SG.second-key"
FORBIDDEN_KEY = "SG.restricted-no-mail-send"

# Exactly what the SendGrid mailer builds for one cart reminder.
MAILER_PAYLOAD: dict[str, Any] = {
    "personalizations": [
        {
            "to": [{"email": "a@example.com", "name": "Ann"}],
            "custom_args": {"ledger_id": "17", "trigger": "abandoned_cart"},
        }
    ],
    "from": {"email": "shop@example.com", "name": "Example Shop"},
    "subject": "…",
    "content": [{"type": "text/plain", "value": "…"}, {"type": "text/html", "value": "…"}],
    "categories": ["abandoned_cart"],
    "headers": {
        "List-Unsubscribe": "<https://x/u/t>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    },
    "custom_args": {"ledger_id": "17"},
}
UNAUTHORIZED = {
    "errors": [
        {
            "message": "The provided authorization grant is invalid, expired, or revoked",
            "field": None,
            "help": None,
        }
    ]
}


def mail(to: str = "a@example.com", **changes: Any) -> dict[str, Any]:
    """A valid payload to ``to``, with top-level keys replaced by ``changes``."""
    payload = copy.deepcopy(MAILER_PAYLOAD)
    payload["personalizations"][0]["to"][0]["email"] = to
    payload.update(changes)
    return payload


@pytest.fixture(scope="module")
def running() -> Iterator[SinkHandle]:
    with running_sink(
        api_keys=(DEMO_API_KEY, SECOND_KEY), forbidden_keys=(FORBIDDEN_KEY,)
    ) as handle:
        yield handle


@pytest.fixture
def sink(running: SinkHandle) -> SinkHandle:
    running.reset_faults()
    running.clear()
    return running


@pytest.fixture
def http(sink: SinkHandle) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {sink.api_key}"}
    with httpx.Client(base_url=sink.url, headers=headers, trust_env=False, timeout=10) as client:
        yield client


def send(http: httpx.Client, payload: Any, **kwargs: Any) -> httpx.Response:
    return http.post("/v3/mail/send", json=payload, **kwargs)


def fields(response: httpx.Response) -> list[str | None]:
    return [error["field"] for error in response.json()["errors"]]


# ------------------------------------------------------------------ accepting


def test_good_payload_is_accepted_and_stored(sink: SinkHandle, http: httpx.Client) -> None:
    response = send(http, MAILER_PAYLOAD)

    assert response.status_code == 202
    assert response.content == b""
    message_id = response.headers["X-Message-Id"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", message_id)
    stored = sink.message(message_id)
    assert stored is not None
    assert stored["recipients"] == ["a@example.com"]
    assert stored["subject"] == "…"
    assert stored["categories"] == ["abandoned_cart"]
    # Merged: personalization-level custom_args extend (and override) message-level ones.
    assert stored["custom_args"] == {"ledger_id": "17", "trigger": "abandoned_cart"}
    assert stored["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert stored["send_at"] is None
    assert stored["payload"] == MAILER_PAYLOAD
    assert stored["received_at"].endswith("+00:00")
    assert sink.stats()["accepted"] >= 1


def test_tally_counts_messages_per_custom_arg_past_the_store_bound() -> None:
    with running_sink(keep=1, count_arg="ledger_id") as sink:
        headers = {"Authorization": f"Bearer {sink.api_key}"}
        with httpx.Client(base_url=sink.url, headers=headers, trust_env=False) as http:
            for ledger_id in ("1", "2", "2"):
                body = mail()
                body["personalizations"][0]["custom_args"]["ledger_id"] = ledger_id
                assert send(http, body).status_code == 202
            tally = sink.tally(values=True)
            assert (tally["values"], tally["messages"]) == (2, 3)
            assert tally["repeated"] == {"2": 2}
            assert sorted(tally["seen"]) == ["1", "2"]
            sink.clear()
            assert sink.tally()["messages"] == 0


def test_second_key_and_gzip_body_are_accepted(sink: SinkHandle, http: httpx.Client) -> None:
    body = gzip.compress(orjson.dumps(mail("gz@example.com")))
    response = http.post(
        "/v3/mail/send",
        content=body,
        headers={
            "Authorization": f"Bearer {SECOND_KEY}",
            "Content-Encoding": "gzip",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 202
    assert [m["recipients"] for m in sink.messages()] == [["gz@example.com"]]


def test_mailer_payload_validates_against_the_official_schema() -> None:
    assert validate_mail_send(MAILER_PAYLOAD) == []
    # The schema file's own examples are valid too.
    assert mail_send_schema()["required"] == ["personalizations", "from"]


def test_message_level_custom_args_object_is_accepted_string_refused() -> None:
    # The OpenAPI file types it as a string; SendGrid takes an object (see the patch).
    assert validate_mail_send(mail(custom_args={"a": "1"})) == []
    errors = validate_mail_send(mail(custom_args="ledger_id=17"))
    assert [e["field"] for e in errors] == ["custom_args"]
    assert validate_mail_send(mail(custom_args={"n": 17}))[0]["field"] == "custom_args.n"


def test_validation_does_not_modify_the_payload() -> None:
    payload = mail(attachments=[{"content": "aGk=", "filename": "a.txt"}])
    before = copy.deepcopy(payload)
    assert validate_mail_send(payload) == []
    assert payload == before  # no "disposition" default written in


# ------------------------------------------------------------------ auth


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer SG.wrong", f"Token {DEMO_API_KEY}", "Bearer", DEMO_API_KEY],
)
def test_missing_or_invalid_key_is_401(sink: SinkHandle, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with httpx.Client(base_url=sink.url, trust_env=False) as client:
        response = client.post("/v3/mail/send", json=MAILER_PAYLOAD, headers=headers)
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert sink.messages() == []


def test_key_without_mail_send_scope_is_403(sink: SinkHandle, http: httpx.Client) -> None:
    response = send(http, MAILER_PAYLOAD, headers={"Authorization": f"Bearer {FORBIDDEN_KEY}"})
    assert response.status_code == 403
    assert response.json() == {
        "errors": [{"message": "access forbidden", "field": None, "help": None}]
    }


# ------------------------------------------------------------------ validation


def _recipients(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"email": f"r{i}@example.com"} for i in range(start, start + n)]


def _person(**extra: Any) -> dict[str, Any]:
    return {"to": [{"email": "a@example.com"}], **extra}


LIMIT_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "no personalizations": ({"personalizations": []}, "personalizations"),
    "1001 personalizations": (
        {"personalizations": [{"to": [r]} for r in _recipients(1001)]},
        "personalizations",
    ),
    "1001 recipients": (
        {"personalizations": [{"to": _recipients(600), "bcc": _recipients(401, 600)}]},
        "personalizations",
    ),
    "empty to": ({"personalizations": [{"to": []}]}, "personalizations.0.to"),
    "duplicate across to and cc": (
        {"personalizations": [_person(cc=[{"email": "A@Example.com"}])]},
        "personalizations.0.cc",
    ),
    "duplicate across personalizations": (
        {"personalizations": [_person(), _person()]},
        "personalizations.1.to",
    ),
    "custom_args over 10,000 bytes merged": (
        {
            "custom_args": {"a": "x" * 5000},
            "personalizations": [_person(custom_args={"b": "y" * 5000})],
        },
        "personalizations.0.custom_args",
    ),
    "11 categories": ({"categories": [f"c{i}" for i in range(11)]}, "categories"),
    "category of 256 chars": ({"categories": ["c" * 256]}, "categories.0"),
    "html before plain": (
        {"content": [{"type": "text/html", "value": "<p>x"}, {"type": "text/plain", "value": "x"}]},
        "content",
    ),
    "no content": ({"content": []}, "content"),
    "send_at 73 h ahead": ({"send_at": int(time.time()) + 73 * 3600}, "send_at"),
    "personalization send_at 73 h ahead": (
        {"personalizations": [_person(send_at=int(time.time()) + 73 * 3600)]},
        "personalizations.0.send_at",
    ),
    "bad from": ({"from": {"email": "shop@"}}, "from.email"),
    "no from": ({"from": None}, "from"),
    "bad recipient": (
        {"personalizations": [{"to": [{"email": "not an address"}]}]},
        "personalizations.0.to.0.email",
    ),
    "bad cc": (
        {"personalizations": [_person(cc=[{"email": "x@@example.com"}])]},
        "personalizations.0.cc.0.email",
    ),
    "subject not a string": ({"subject": 3}, "subject"),
}


@pytest.mark.parametrize("case", LIMIT_CASES, ids=list(LIMIT_CASES))
def test_each_limit_violated_is_400_with_the_field(http: httpx.Client, case: str) -> None:
    changes, field = LIMIT_CASES[case]
    payload = mail(**changes)
    if changes.get("from", "") is None:
        del payload["from"]
        field = "from.email"
    response = send(http, payload)
    assert response.status_code == 400, response.text
    assert field in fields(response), response.text
    for error in response.json()["errors"]:
        assert set(error) == {"message", "field", "help"}
        assert error["message"]
        assert error["help"].startswith(HELP_BASE + "#message.")


def test_error_body_shape_for_a_bad_recipient(http: httpx.Client) -> None:
    response = send(http, mail(to="nobody"))
    assert response.json() == {
        "errors": [
            {
                "message": "Does not contain a valid address.",
                "field": "personalizations.0.to.0.email",
                "help": HELP_BASE + "#message.personalizations.to",
            }
        ]
    }


@pytest.mark.parametrize(
    "header",
    ["Subject", "x-sg-id", "X-SG-EID", "received", "DKIM-Signature", "content-type",
     "Content-Transfer-Encoding", "To", "from", "Reply-To", "cc", "BCC"],
)  # fmt: skip
def test_reserved_header_is_refused(http: httpx.Client, header: str) -> None:
    response = send(http, mail(headers={header: "x", "X-Fine": "ok"}))
    assert response.status_code == 400
    assert fields(response) == [f"headers.{header}"]


def test_reserved_header_in_a_personalization_is_refused() -> None:
    errors = validate_mail_send(mail(personalizations=[_person(headers={"From": "x"})]))
    assert [e["field"] for e in errors] == ["personalizations.0.headers.From"]


def test_all_errors_are_collected() -> None:
    payload = mail(
        to="bad",
        categories=["c"] * 2,
        headers={"Subject": "x"},
        content=[{"type": "text/html", "value": "h"}, {"type": "text/plain", "value": "t"}],
    )
    del payload["subject"]
    assert sorted(e["field"] for e in validate_mail_send(payload)) == [
        "categories",
        "content",
        "headers.Subject",
        "personalizations.0.to.0.email",
        "subject",
    ]


def test_subject_may_come_from_every_personalization() -> None:
    payload = mail(personalizations=[_person(subject="Hi")])
    del payload["subject"]
    assert validate_mail_send(payload) == []


@pytest.mark.parametrize("body", [b"{not json", b"", b"null", '{"a": "\xe9"}'.encode("latin-1")])
def test_malformed_json_is_400_bad_request(http: httpx.Client, body: bytes) -> None:
    response = http.post("/v3/mail/send", content=body)
    assert response.status_code == 400
    assert response.json() == {"errors": [{"message": "Bad Request", "field": None, "help": None}]}


def test_body_of_30_mb_is_413(sink: SinkHandle, http: httpx.Client) -> None:
    big = mail(content=[{"type": "text/plain", "value": "x" * (30 * 1024 * 1024)}])
    response = send(http, big)
    assert response.status_code == 413
    assert response.json()["errors"][0]["message"] == "content too large"
    assert sink.messages() == []
    # Just under the limit is fine.
    limit = SinkConfig().max_body_bytes
    body = orjson.dumps(mail(content=[{"type": "text/plain", "value": ""}]))
    pad = limit - len(body) - 1
    ok = mail(content=[{"type": "text/plain", "value": "x" * pad}])
    assert len(orjson.dumps(ok)) == limit - 1
    assert send(http, ok).status_code == 202


def test_wrong_method_and_unknown_path_answer_like_sendgrid(http: httpx.Client) -> None:
    response = http.get("/v3/mail/send")
    assert (response.status_code, fields(response)) == (405, [None])
    assert response.json()["errors"][0]["message"] == "method not allowed"
    response = http.post("/v3/nothing", json={})
    assert response.status_code == 404
    assert response.json()["errors"][0]["message"] == "not found"


# ------------------------------------------------------------------ faults


def test_scripted_503_three_times_then_202(sink: SinkHandle, http: httpx.Client) -> None:
    sink.set_faults(script=[{"status": 503, "count": 3}])
    assert sink.faults()["script"] == [
        {"status": 503, "count": 3, "reset_in": 1.0, "delay_ms": 0.0, "drop": False}
    ]
    statuses = [send(http, MAILER_PAYLOAD).status_code for _ in range(4)]
    assert statuses == [503, 503, 503, 202]
    assert sink.faults()["script"] == []
    assert len(sink.messages()) == 1  # faulted requests are not stored


def test_scripted_429_carries_the_reset(sink: SinkHandle, http: httpx.Client) -> None:
    sink.set_faults(script=[{"status": 429, "count": 1, "reset_in": 2}])
    before = time.time()
    response = send(http, MAILER_PAYLOAD)
    assert response.status_code == 429
    assert response.json() == {"errors": [{"field": None, "message": "too many requests"}]}
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert before + 2 <= int(response.headers["X-RateLimit-Reset"]) <= before + 4


def test_rate_limit_answers_429_with_headers(sink: SinkHandle, http: httpx.Client) -> None:
    sink.set_faults(rate_limit=2, rate_limit_window_s=30)
    before = time.time()
    first, second, third = (send(http, MAILER_PAYLOAD) for _ in range(3))

    assert [first.status_code, second.status_code, third.status_code] == [202, 202, 429]
    assert first.headers["X-RateLimit-Remaining"] == "1"
    assert third.headers["X-RateLimit-Limit"] == "2"
    assert third.headers["X-RateLimit-Remaining"] == "0"
    reset = int(third.headers["X-RateLimit-Reset"])
    assert before + 29 <= reset <= before + 32
    assert third.json() == {"errors": [{"field": None, "message": "too many requests"}]}
    assert len(sink.messages()) == 2


def test_per_recipient_fault_fails_one_message_of_a_batch(
    sink: SinkHandle, http: httpx.Client
) -> None:
    sink.set_faults(fail_recipients={"Bad400@example.com": 400, "busy@example.com": 503})
    batch = ["ok1@example.com", "bad400@example.com", "ok2@example.com", "busy@example.com"]
    responses = [send(http, mail(to=to)) for to in batch]

    assert [r.status_code for r in responses] == [202, 400, 202, 503]
    assert fields(responses[1]) == ["personalizations.0.to.0.email"]
    assert [m["recipients"] for m in sink.messages()] == [["ok1@example.com"], ["ok2@example.com"]]


def test_dropped_connection_has_no_response(sink: SinkHandle, http: httpx.Client) -> None:
    dropped = sink.stats()["dropped"]
    sink.set_faults(script=[{"drop": True}])
    with pytest.raises(httpx.RemoteProtocolError):
        send(http, MAILER_PAYLOAD)
    assert send(http, MAILER_PAYLOAD).status_code == 202  # the client reconnects
    assert sink.stats()["dropped"] == dropped + 1
    assert len(sink.messages()) == 1


def test_a_drop_after_the_client_gave_up_is_counted_not_answered(
    sink: SinkHandle, http: httpx.Client
) -> None:
    """The client's timeout passes before the drop: its connection is gone already, so
    there is nothing to cut and nothing to answer (no 502 for a connection nobody reads)."""
    before = sink.stats()
    sink.set_faults(script=[{"drop": True, "delay_ms": 600}])
    with pytest.raises(httpx.ReadTimeout):
        send(http, MAILER_PAYLOAD, timeout=0.1)
    deadline = time.monotonic() + 5
    while sink.stats()["dropped"] == before["dropped"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = sink.stats()
    assert after["dropped"] == before["dropped"] + 1
    assert after["rejected"] == before["rejected"]
    assert sink.messages() == []


def test_random_errors_are_reproducible_with_a_seed(sink: SinkHandle, http: httpx.Client) -> None:
    def run() -> list[int]:
        sink.set_faults(error_rate_500=0.3, error_rate_503=0.3, seed=42)
        return [send(http, MAILER_PAYLOAD).status_code for _ in range(20)]

    first = run()
    assert set(first) == {202, 500, 503}
    assert run() == first


def test_latency_is_applied_without_blocking_the_loop(sink: SinkHandle) -> None:
    sink.set_faults(latency_ms=300)

    async def burst() -> list[int]:
        headers = {"Authorization": f"Bearer {sink.api_key}"}
        async with httpx.AsyncClient(headers=headers, trust_env=False, timeout=10) as client:
            calls = [client.post(sink.mail_send_url, json=MAILER_PAYLOAD) for _ in range(20)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    began = time.perf_counter()
    statuses = asyncio.run(burst())
    elapsed = time.perf_counter() - began
    assert statuses == [202] * 20
    assert 0.3 <= elapsed < 1.5  # 20 x 300 ms would be 6 s if the sleeps were serial


def test_slow_request_times_the_client_out_but_was_accepted(
    sink: SinkHandle, http: httpx.Client
) -> None:
    sink.set_faults(slow_rate=1.0, slow_ms=2000)
    with pytest.raises(httpx.ReadTimeout):
        send(http, MAILER_PAYLOAD, timeout=0.3)
    # Like the real API: the request arrived, so the message may go out anyway.
    assert len(sink.messages()) == 1


def test_bad_fault_settings_are_refused_with_the_field(sink: SinkHandle) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"drop_rate": 1.5}, "drop_rate"),
        ({"script": [{"status": 299}]}, "script.0.status"),
        ({"nonsense": 1}, "nonsense"),
        ({"error_rate_500": 0.6, "error_rate_503": 0.6}, "error_rate_503"),
    ]
    for changes, word in cases:
        with pytest.raises(httpx.HTTPStatusError) as caught:
            sink.set_faults(**changes)
        assert caught.value.response.status_code == 400
        assert word in caught.value.response.json()["errors"][0]["message"]
    assert sink.faults()["drop_rate"] == 0.0  # nothing changed


# ------------------------------------------------------------------ inspection


def test_listing_filtering_and_clear(sink: SinkHandle, http: httpx.Client) -> None:
    ids = []
    for i, (to, category) in enumerate(
        [("ann@example.com", "cart"), ("bob@example.com", "welcome"), ("Ann@Example.com", "cart")]
    ):
        payload = mail(to=to, categories=[category], subject=f"s{i}")
        ids.append(send(http, payload).headers["X-Message-Id"])

    assert [m["message_id"] for m in sink.messages()] == ids  # newest last
    assert [m["subject"] for m in sink.messages(to="ANN@example.com")] == ["s0", "s2"]
    assert [m["subject"] for m in sink.messages(category="welcome")] == ["s1"]
    assert [m["subject"] for m in sink.messages(limit=2)] == ["s1", "s2"]
    assert [m["subject"] for m in sink.messages(limit=1, offset=1)] == ["s1"]
    assert sink.message(ids[1])["recipients"] == ["bob@example.com"]  # type: ignore[index]
    assert sink.message("no-such-id") is None

    stats = sink.stats()
    assert stats["stored"] == 3 and stats["in_flight"] >= 0 and stats["uptime_s"] > 0
    assert sink.clear() == 3
    assert sink.messages() == []
    assert sink.stats()["accepted"] == stats["accepted"]  # counts survive a clear


def test_bad_listing_parameter_is_400(http: httpx.Client) -> None:
    response = http.get("/_sink/messages", params={"limit": "many"})
    assert response.status_code == 400
    assert "limit" in response.json()["errors"][0]["message"]


def test_store_keeps_only_the_newest() -> None:
    with running_sink(keep=2) as small:
        headers = {"Authorization": f"Bearer {small.api_key}"}
        for i in range(3):
            response = small.client.post(
                "/v3/mail/send", json=mail(subject=f"s{i}"), headers=headers
            )
            assert response.status_code == 202
        assert [m["subject"] for m in small.messages()] == ["s1", "s2"]
        assert small.stats()["accepted"] == 3


def test_running_sink_in_a_child_process() -> None:
    with running_sink(process=True, latency_ms=1) as child:
        headers = {"Authorization": f"Bearer {child.api_key}"}
        response = child.client.post("/v3/mail/send", json=MAILER_PAYLOAD, headers=headers)
        assert response.status_code == 202
        assert child.stats()["accepted"] == 1
        assert child.faults()["latency_ms"] == 1.0


# ------------------------------------------------------------------ CLI


def test_cli_talks_to_a_running_sink(sink: SinkHandle, http: httpx.Client) -> None:
    message_id = send(http, mail(to="cli@example.com")).headers["X-Message-Id"]
    runner = CliRunner()

    listed = runner.invoke(sink_app, ["list", "--url", sink.url, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)[0]["message_id"] == message_id
    table = runner.invoke(sink_app, ["list", "--url", sink.url])
    assert message_id in table.output and "cli@example.com" in table.output

    script = '[{"status": 503, "count": 2}]'
    changed = runner.invoke(sink_app, ["faults", "--url", sink.url, "--script", script])
    assert changed.exit_code == 0, changed.output
    assert sink.faults()["script"][0]["count"] == 2

    refused = runner.invoke(sink_app, ["faults", "--url", sink.url, "--drop-rate", "2"])
    assert refused.exit_code == 2
    assert "drop_rate" in refused.output

    assert runner.invoke(sink_app, ["clear", "--url", sink.url]).exit_code == 0
    assert sink.messages() == []
