"""Hostile one-click unsubscribe requests over HTTP to the running webhook service: a
refused request (400/404/405) suppresses nobody; an accepted one suppresses exactly the
address of the message its token names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select

from mailflow.unsubscribe import make_token
from mailflow.warehouse.schema import suppressions
from tests.hostile.conftest import Corpus
from tests.unsubscribe_service import serving_unsubscribes

KEY = SecretStr("test-only-unsubscribe-secret-0123456789")
MESSAGES = 6  # ledger ids 1..6, addresses u1@example.com ...
FORM = {"data": {"List-Unsubscribe": "One-Click"}}


def good(i: int) -> str:
    return make_token(KEY, i)


def mac_swapped(i: int) -> str:
    head, payload, _ = good(i).split(".")
    return f"{head}.{payload}.{good(i + 1).split('.')[2]}"


def other_secret(i: int) -> str:
    return make_token(SecretStr("attacker-chosen-secret-0123456789"), i)


# (case, method, path, request keywords, expected status, the address suppressed or None)
CASES: list[tuple[str, str, str, dict[str, Any], int, str | None]] = [
    ("urlencoded one-click", "POST", f"/u/{good(1)}", FORM, 200, "u1@example.com"),
    (
        "multipart one-click",
        "POST",
        f"/u/{good(2)}",
        {"files": {"List-Unsubscribe": (None, "One-Click")}},
        200,
        "u2@example.com",
    ),
    ("the same link again", "POST", f"/u/{good(1)}", FORM, 200, None),
    ("GET changes nothing", "GET", f"/u/{good(3)}", {}, 200, None),
    ("HEAD changes nothing", "HEAD", f"/u/{good(3)}", {}, 200, None),
    ("forged with another secret", "POST", f"/u/{other_secret(3)}", FORM, 400, None),
    ("MAC of another message", "POST", f"/u/{mac_swapped(3)}", FORM, 400, None),
    ("non-ASCII in the MAC", "POST", f"/u/{good(3)[:-1]}é", FORM, 400, None),
    ("token of 500 characters", "POST", "/u/v1.3." + "A" * 492, FORM, 400, None),
    ("unknown version", "POST", f"/u/v2{good(3)[2:]}", FORM, 400, None),
    ("no such message", "POST", f"/u/{good(999)}", FORM, 400, None),
    ("empty token", "POST", "/u/", FORM, 404, None),
    # The client resolves ".." to the events endpoint, which refuses an unsigned body.
    ("path traversal", "POST", "/u/../webhooks/sendgrid/events", FORM, 403, None),
    ("NUL in token", "POST", f"/u/{good(3)}%00", FORM, 400, None),
    (
        "wrong field value",
        "POST",
        f"/u/{good(3)}",
        {"data": {"List-Unsubscribe": "one-click"}},
        400,
        None,
    ),
    ("no body", "POST", f"/u/{good(3)}", {}, 400, None),
    ("JSON body", "POST", f"/u/{good(3)}", {"json": {"List-Unsubscribe": "One-Click"}}, 400, None),
    (
        "body over 8 KB",
        "POST",
        f"/u/{good(3)}",
        {"data": {"List-Unsubscribe": "One-Click", "x": "y" * 9000}},
        400,
        None,
    ),
    (
        "a file upload",
        "POST",
        f"/u/{good(3)}",
        {"files": {"List-Unsubscribe": ("a.txt", b"One-Click", "text/plain")}},
        400,
        None,
    ),
    (
        "broken multipart",
        "POST",
        f"/u/{good(3)}",
        {
            "content": b"--x\r\nnonsense",
            "headers": {"Content-Type": "multipart/form-data; boundary=x"},
        },
        400,
        None,
    ),
    (
        "multipart without boundary",
        "POST",
        f"/u/{good(3)}",
        {"content": b"x", "headers": {"Content-Type": "multipart/form-data"}},
        400,
        None,
    ),
    (
        "21 fields",
        "POST",
        f"/u/{good(3)}",
        {"data": {f"f{i}": "v" for i in range(21)} | {"List-Unsubscribe": "One-Click"}},
        400,
        None,
    ),
    (
        "field repeated",
        "POST",
        f"/u/{good(4)}",
        {
            "content": b"List-Unsubscribe=x&List-Unsubscribe=One-Click",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
        200,
        "u4@example.com",
    ),
    (
        "text/plain form",
        "POST",
        f"/u/{good(5)}",
        {"content": b"List-Unsubscribe=One-Click", "headers": {"Content-Type": "text/plain"}},
        200,
        "u5@example.com",
    ),
]


@pytest.fixture
def served(warehouse_url: str) -> Iterator[tuple[httpx.Client, Engine]]:
    with serving_unsubscribes(warehouse_url, KEY, messages=MESSAGES) as served:
        yield served


def suppressed(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(suppressions.c.email)).scalars())


@pytest.mark.category("unsubscribe requests")
def test_hostile_unsubscribe_requests(
    served: Any, corpus: Corpus, caplog: pytest.LogCaptureFixture
) -> None:
    client, engine = served
    for name, method, path, kwargs, status, address in CASES:
        before = suppressed(engine)
        response = client.request(method, path, **kwargs)
        added = suppressed(engine) - before
        problems = []
        if response.status_code != status:
            problems.append(f"status {response.status_code}, expected {status}")
        if added != ({address} if address else set()):
            problems.append(f"suppressed {added or 'nobody'}, expected {address or 'nobody'}")
        if "Traceback" in response.text:
            problems.append("a traceback in the answer")
        corpus.check(name, problems)
    logged = [r.getMessage()[:200] for r in caplog.records if r.exc_info]
    corpus.check("(no traceback in the service's log)", logged)
    corpus.done()
