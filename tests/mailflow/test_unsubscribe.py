"""One-click unsubscribe: tokens and the RFC 8058 endpoint of `mailflow webhook`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from mailflow import ledger
from mailflow.unsubscribe import InvalidToken, make_token, read_token
from mailflow.warehouse.engine import make_engine
from mailflow.warehouse.schema import suppressions
from mailflow.webhook.app import create_app
from tests.unsubscribe_service import serving_unsubscribes

KEY = SecretStr("test-unsubscribe-secret-0123456789")
ONE_CLICK = {
    "content": b"List-Unsubscribe=One-Click",
    "headers": {"Content-Type": "application/x-www-form-urlencoded"},
}


def test_token_round_trip_and_tampering() -> None:
    token = make_token(KEY, 12345)
    assert read_token(KEY, token) == 12345
    assert "@" not in token
    _, payload, mac = token.split(".")
    with pytest.raises(InvalidToken):
        read_token(KEY, f"v1.{payload}x.{mac}")  # another id, same signature
    with pytest.raises(InvalidToken):
        read_token(SecretStr("another-secret-abcdefghijkl"), token)
    with pytest.raises(InvalidToken):
        read_token(KEY, "garbage")


@pytest.fixture
def client_and_engine(warehouse_url: str) -> Iterator[tuple[TestClient, Engine]]:
    engine = make_engine(warehouse_url)
    with engine.begin() as conn:
        ledger.plan(
            conn,
            "abandoned_cart",
            [ledger.PlannedMessage("abandoned_cart:1", "ann@example.com", 1, None, {})],
            flow_run_id="r",
        )
    app = create_app(engine=engine, public_key_b64=None, verify=False, unsubscribe_key=KEY)
    with TestClient(app) as client:
        yield client, engine
    engine.dispose()


def suppressed(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(suppressions.c.email, suppressions.c.reason))]


def test_get_shows_a_page_and_changes_nothing(client_and_engine: Any) -> None:
    client, engine = client_and_engine
    r = client.get(f"/u/{make_token(KEY, 1)}")
    assert r.status_code == 200 and '<form method="post"' in r.text
    assert suppressed(engine) == []


def test_one_click_post_suppresses_without_redirect(client_and_engine: Any) -> None:
    client, engine = client_and_engine
    r = client.post(f"/u/{make_token(KEY, 1)}", follow_redirects=False, **ONE_CLICK)
    assert r.status_code == 200
    assert suppressed(engine) == [("ann@example.com", "unsubscribe")]
    client.post(f"/u/{make_token(KEY, 1)}", **ONE_CLICK)  # twice: still one suppression
    assert len(suppressed(engine)) == 1


def test_forged_token_and_wrong_body_are_refused(client_and_engine: Any) -> None:
    client, engine = client_and_engine
    forged = make_token(SecretStr("attacker-secret-abcdefghijkl"), 1)
    assert client.post(f"/u/{forged}", **ONE_CLICK).status_code == 400
    assert client.get(f"/u/{forged}").status_code == 400
    wrong = {**ONE_CLICK, "content": b"x=y"}
    assert client.post(f"/u/{make_token(KEY, 1)}", **wrong).status_code == 400
    assert suppressed(engine) == []


@pytest.fixture
def served(warehouse_url: str) -> Iterator[tuple[httpx.Client, Engine]]:
    """The webhook service under uvicorn on a real port (its unsubscribe routes)."""
    with serving_unsubscribes(warehouse_url, KEY, messages=2) as served:
        yield served


def test_one_click_works_from_both_form_encodings_over_http(served: Any) -> None:
    client, engine = served
    # RFC 8058: clients SHOULD send multipart/form-data; urlencoded is also seen.
    multipart = client.post(
        f"/u/{make_token(KEY, 1)}", files={"List-Unsubscribe": (None, "One-Click")}
    )
    assert multipart.status_code == 200, multipart.text
    assert multipart.request.headers["content-type"].startswith("multipart/form-data")
    urlencoded = client.post(f"/u/{make_token(KEY, 2)}", data={"List-Unsubscribe": "One-Click"})
    assert urlencoded.status_code == 200, urlencoded.text
    assert sorted(suppressed(engine)) == [
        ("u1@example.com", "unsubscribe"),
        ("u2@example.com", "unsubscribe"),
    ]


def test_hostile_tokens_and_bodies_get_400_and_suppress_nothing(served: Any) -> None:
    client, engine = served
    token = make_token(KEY, 1)
    head, payload, mac = token.split(".")
    for bad in (f"{head}.{payload}.{mac[:-1]}é", "v1.1." + "A" * 500):
        r = client.post(f"/u/{bad}", data={"List-Unsubscribe": "One-Click"})
        assert r.status_code == 400 and "not valid" in r.text
    oversized = client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click", "x": "y" * 9000})
    assert oversized.status_code == 400 and "over 8192 bytes" in oversized.text
    with_file = client.post(
        f"/u/{token}", files={"List-Unsubscribe": ("a.txt", b"One-Click", "text/plain")}
    )
    assert with_file.status_code == 400
    assert suppressed(engine) == []
