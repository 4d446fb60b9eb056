"""Hostile ``/v3/mail/send`` bodies posted over HTTP to the local SendGrid API: what SendGrid
refuses is refused (400, the field named, nothing stored), what it takes is taken."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.hostile.conftest import Corpus

Edit = Callable[[dict[str, Any]], None]
ACCEPTED = "accepted"


def base() -> dict[str, Any]:
    return {
        "personalizations": [{"to": [{"email": "ann@example.com", "name": "Ann"}]}],
        "from": {"email": "shop@example.com", "name": "Shop"},
        "subject": "Hello",
        "content": [{"type": "text/plain", "value": "hi"}, {"type": "text/html", "value": "hi"}],
    }


def to(**entry: Any) -> Edit:
    def edit(p: dict[str, Any]) -> None:
        p["personalizations"][0]["to"][0].update(entry)

    return edit


def sender(**entry: Any) -> Edit:
    def edit(p: dict[str, Any]) -> None:
        p["from"].update(entry)

    return edit


def top(**fields: Any) -> Edit:
    def edit(p: dict[str, Any]) -> None:
        p.update(fields)

    return edit


def person(**fields: Any) -> Edit:
    def edit(p: dict[str, Any]) -> None:
        p["personalizations"][0].update(fields)

    return edit


TO_EMAIL = "personalizations.0.to.0.email"
TO_NAME = "personalizations.0.to.0.name"

# (case, edit of a good payload, ACCEPTED or the field SendGrid names in its 400)
CASES: dict[str, list[tuple[str, Edit, str]]] = {
    "addresses": [
        ("no tld", to(email="ann@example"), TO_EMAIL),
        ("display form", to(email="Ann <ann@example.com>"), TO_EMAIL),
        ("leading space", to(email=" ann@example.com"), TO_EMAIL),
        ("nul", to(email="ann\x00@example.com"), TO_EMAIL),
        ("crlf", to(email="ann@example.com\r\nbcc: x@example.com"), TO_EMAIL),
        ("two addresses", to(email="a@example.com,b@example.com"), TO_EMAIL),
        ("quoted local", to(email='"a b"@example.com'), TO_EMAIL),
        ("ip literal", to(email="a@[127.0.0.1]"), TO_EMAIL),
        ("non-ascii local", to(email="ä@example.com"), TO_EMAIL),
        ("local part 65", to(email="l" * 65 + "@example.com"), TO_EMAIL),
        (
            "address 255",
            to(email="a@" + "d" * 63 + ".e" + "e" * 62 + ".f" + "f" * 62 + ".g" + "g" * 61),
            TO_EMAIL,
        ),
        ("empty", to(email=""), TO_EMAIL),
        ("bad sender", sender(email="shop"), "from.email"),
        ("bad reply_to", top(reply_to={"email": "x"}), "reply_to.email"),
        ("local part 64", to(email="l" * 64 + "@example.com"), ACCEPTED),
        ("upper case", to(email="UPPER.Case@Example.COM"), ACCEPTED),
        ("punycode domain", to(email="a@xn--bcher-kva.example"), ACCEPTED),
    ],
    "names": [
        ("unquoted comma", to(name="Doe, Jane"), TO_NAME),
        ("unquoted semicolon", to(name="Ann;Bob"), TO_NAME),
        ("crlf", to(name="Ann\r\nBcc: x@example.com"), TO_NAME),
        ("lf in sender", sender(name="Shop\nX"), "from.name"),
        ("quoted comma", to(name='"Doe, Jane"'), ACCEPTED),
        ("unicode", to(name="Zoë 🙂"), ACCEPTED),
    ],
    "subjects": [
        ("crlf injection", top(subject="Hi\r\nBcc: victim@example.com"), "subject"),
        ("lf", top(subject="Hi\nthere"), "subject"),
        ("nul", top(subject="Hi\x00"), "subject"),
        ("999 characters", top(subject="s" * 999), "subject"),
        ("personalization crlf", person(subject="a\r\nb"), "personalizations.0.subject"),
        ("empty", top(subject=""), "subject"),
        ("not a string", top(subject=["a"]), "subject"),
        ("998 characters", top(subject="s" * 998), ACCEPTED),
        ("unicode", top(subject="Frühling — 20 % 🙂"), ACCEPTED),
    ],
    "header values": [
        (
            "crlf in value",
            top(headers={"X-Campaign": "a\r\nBcc: victim@example.com"}),
            "headers.X-Campaign",
        ),
        ("lf in value", top(headers={"X-Campaign": "a\nb"}), "headers.X-Campaign"),
        ("nul in value", top(headers={"X-Campaign": "a\x00"}), "headers.X-Campaign"),
        ("colon in name", top(headers={"X-Bad:Name": "v"}), "headers.X-Bad:Name"),
        ("space in name", top(headers={"X Bad": "v"}), "headers.X Bad"),
        ("empty name", top(headers={"": "v"}), "headers."),
        ("non-ascii name", top(headers={"X-Ünï": "v"}), "headers.X-Ünï"),
        ("reserved name", top(headers={"Bcc": "victim@example.com"}), "headers.Bcc"),
        ("number value", top(headers={"X-N": 1}), "headers.X-N"),
        (
            "personalization crlf",
            person(headers={"X-P": "a\r\nb"}),
            "personalizations.0.headers.X-P",
        ),
        (
            "list-unsubscribe",
            top(headers={"List-Unsubscribe": "<https://x.example/u/t>"}),
            ACCEPTED,
        ),
        ("unicode value", top(headers={"X-Note": "Grüße"}), ACCEPTED),
    ],
}


@pytest.mark.parametrize("category", sorted(CASES))
def test_hostile_mail_send_bodies(sink: Any, category: str) -> None:
    corpus = Corpus(category)
    headers = {"Authorization": f"Bearer {sink.api_key}"}
    accepted = 0
    with httpx.Client(timeout=10, trust_env=False) as client:
        for name, edit, want in CASES[category]:
            payload = copy.deepcopy(base())
            edit(payload)
            response = client.post(sink.mail_send_url, json=payload, headers=headers)
            problems = []
            if want == ACCEPTED:
                accepted += 1
                if response.status_code != 202:
                    problems.append(f"expected 202, got {response.status_code} {response.text}")
            elif response.status_code != 400:
                problems.append(f"expected 400 naming {want}, got {response.status_code}")
            else:
                fields = [e["field"] for e in response.json()["errors"]]
                if want not in fields:
                    problems.append(f"400 names {fields}, not {want}")
            corpus.check(f"{category}: {name}", problems)
    # Nothing a refusal answered was kept; every accepted one was, to its named address.
    kept = sink.messages()
    corpus.check(
        "(nothing kept for a refused body)",
        [] if len(kept) == accepted else [f"{len(kept)} kept, {accepted} accepted"],
    )
    corpus.done()
