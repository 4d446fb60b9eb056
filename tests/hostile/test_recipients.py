"""Hostile addresses and first names in the warehouse, through the real pipeline (find,
validate, plan, send) over HTTP to the local SendGrid API, which refuses what SendGrid
refuses. Each address is either delivered to, as its one normalised form, or quarantined
naming the column; nobody else is ever mailed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from mailflow.clock import utcnow
from mailflow.pipeline import resources
from mailflow.pipeline.plan import prepare
from mailflow.pipeline.send import send_batch
from mailflow.triggers import get_trigger
from mailflow.warehouse.schema import quarantine
from tests.hostile.conftest import Corpus
from tests.shop import Shopper, build_shop

CART = get_trigger("abandoned_cart")
PARAMS = CART.params({})
QUARANTINED = "quarantined"

LOCAL_64 = "l" * 64
DOMAIN_252 = "d" * 63 + "." + "e" * 63 + "." + "f" * 63 + "." + "g" * 60
assert len("a@" + DOMAIN_252) == 254

# (address in the warehouse, the address mailed, or QUARANTINED)
ADDRESSES: list[tuple[str, str]] = [
    # RFC 5321 keeps the local part's case; mailflow delivers one lower-cased form
    # (mailflow/addresses.py, README "Addresses"): a test of that choice.
    ("UPPER.Case@Example.COM", "upper.case@example.com"),
    ("  padded@example.com  ", QUARANTINED),  # surrounding spaces: a data error, named
    (f"{LOCAL_64}@example.com", f"{LOCAL_64}@example.com"),  # 64: the local part's limit
    (f"{LOCAL_64}m@example.com", QUARANTINED),  # 65
    (f"a@{DOMAIN_252}", f"a@{DOMAIN_252}"),  # 254 in all: the limit
    (f"ab@{DOMAIN_252}", QUARANTINED),  # 255
    ("nul\x00byte@example.com", QUARANTINED),
    ("line@example.com\nBcc: victim@example.com", QUARANTINED),
    ("cr\r@example.com", QUARANTINED),
    ("two@example.com, three@example.com", QUARANTINED),
    ("two@example.com;three@example.com", QUARANTINED),
    ("Display Name <display@example.com>", QUARANTINED),
    ('"quoted local"@example.com', QUARANTINED),
    ("literal@[127.0.0.1]", QUARANTINED),
    ("ännä@example.com", QUARANTINED),  # SMTPUTF8 local part
    ("idn@bücher.example", QUARANTINED),  # an IDN domain must come as punycode
    ("idn@xn--bcher-kva.example", "idn@xn--bcher-kva.example"),
    ("double..dot@example.com", QUARANTINED),
    (".lead@example.com", QUARANTINED),
    ("trail.@example.com", QUARANTINED),
    ("no-tld@localhost", QUARANTINED),
    ("at@@example.com", QUARANTINED),
    ("no-at-sign.example.com", QUARANTINED),
    ("", QUARANTINED),
    ("tab\t@example.com", QUARANTINED),
    ("zero\u200bwidth@example.com", QUARANTINED),
    ("plus+tag@example.com", "plus+tag@example.com"),
    ("o'brien@example.com", "o'brien@example.com"),
    ("-@example.com", "-@example.com"),
]

# (first name in the warehouse, the to.name sent (None: left out) or QUARANTINED,
#  a text the plain-text body must start with, or None)
NAMES: list[tuple[str | None, str | None, str | None]] = [
    ("Doe, Jane", '"Doe, Jane"', "Hi Doe, Jane,"),
    ("Ann;Bob", '"Ann;Bob"', None),
    ("Ann\r\nBcc: evil@example.com", "Ann Bcc: evil@example.com", None),
    ("", None, "Hi there,"),  # an empty first name: the greeting without a name
    ("   ", None, "Hi there,"),
    (None, None, "Hi there,"),
    ("\x00", None, "Hi there,"),
    ("Ann\x00", "Ann", "Hi Ann,"),
    ("x" * 100, "x" * 100, None),  # the longest first name kept
    ("x" * 101, QUARANTINED, None),
    ('"Quoted"', '"Quoted"', None),
    ("<script>alert(1)</script>", "<script>alert(1)</script>", None),
    ("{{ 7 * 7 }}", "{{ 7 * 7 }}", "Hi {{ 7 * 7 }},"),  # data, never a template
    ("Zoë 🙂", "Zoë 🙂", "Hi Zoë 🙂,"),
    ("\u202eevil", "\u202eevil", None),  # a bidi override is text, not a control char
]


def run_pipeline(res: resources.Resources) -> None:
    # The path a trigger's run takes: streamed in chunks of 7, so repeats cross chunks.
    prepared = prepare(
        res,
        CART,
        PARAMS,
        utcnow(),
        flow_run_id="h1",
        max_bad_share=1.0,
        batch_size=100,
        chunk_size=7,
    )
    assert prepared.plan is not None
    for ids in prepared.plan.batches:
        asyncio.run(send_batch(res, CART, ids, flow_run_id="h1"))


def storable(res: resources.Resources, values: list[Any]) -> list[Any]:
    """The cases the warehouse can hold: PostgreSQL text cannot contain NUL at all, so a NUL
    from the warehouse is a SQLite-only case."""
    if res.engine.dialect.name != "postgresql":
        return values
    return [v for v in values if "\x00" not in str(v[0])]


def quarantined_columns(res: resources.Resources) -> dict[str | None, set[str | None]]:
    with res.engine.connect() as conn:
        rows = conn.execute(select(quarantine.c.email, quarantine.c.column_name)).all()
    out: dict[str | None, set[str | None]] = {}
    for email, column in rows:
        out.setdefault(email, set()).add(column)
    return out


def mailed(sink: Any) -> dict[str, dict[str, Any]]:
    """The accepted messages by recipient address, each recipient exactly once."""
    by_address: dict[str, dict[str, Any]] = {}
    for message in sink.messages(limit=1000):
        for to in message["payload"]["personalizations"][0]["to"]:
            assert to["email"] not in by_address, f"{to['email']} mailed twice"
            by_address[to["email"]] = {"to": to, "payload": message["payload"]}
    return by_address


@pytest.mark.category("addresses")
def test_hostile_addresses(env: Any, sink: Any, corpus: Corpus) -> None:
    res = resources.current()
    cases = storable(res, ADDRESSES)
    build_shop(res.engine, [Shopper(email=address) for address, _ in cases])
    run_pipeline(res)
    sent = mailed(sink)
    held = quarantined_columns(res)
    expected_sent = {want for _, want in cases if want != QUARANTINED}
    for address, want in cases:
        problems = []
        if want == QUARANTINED:
            if held.get(address) != {"email"}:
                problems.append(f"expected quarantined for email, got {held.get(address)}")
        elif want not in sent:
            problems.append(f"expected mailed as {want!r}; quarantined: {held.get(address)}")
        corpus.check(address, problems)
    # Nobody but the addresses above, each in its one form, was mailed.
    corpus.check("(no other recipient)", [] if set(sent) == expected_sent else [str(set(sent))])
    assert sink.stats()["rejected"] == {}, "the local API refused a message mailflow sent"
    corpus.done()


@pytest.mark.category("names")
def test_hostile_first_names(env: Any, sink: Any, corpus: Corpus) -> None:
    res = resources.current()
    cases = storable(res, NAMES)
    shoppers = [
        Shopper(email=f"name{i}@example.com", first_name=n) for i, (n, _, _) in enumerate(cases)
    ]
    build_shop(res.engine, shoppers)
    run_pipeline(res)
    sent = mailed(sink)
    held = quarantined_columns(res)
    for i, (name, want, greeting) in enumerate(cases):
        email = f"name{i}@example.com"
        problems = []
        if want == QUARANTINED:
            if held.get(email) != {"first_name"}:
                problems.append(f"expected quarantined for first_name, got {held.get(email)}")
            if email in sent:
                problems.append("mailed although quarantined")
        elif email not in sent:
            problems.append(f"not mailed; quarantined: {held.get(email)}")
        else:
            to, payload = sent[email]["to"], sent[email]["payload"]
            if to.get("name") != want:
                problems.append(f"to.name {to.get('name')!r}, expected {want!r}")
            subject = payload["subject"]
            if any(c in subject for c in "\r\n\x00"):
                problems.append(f"subject holds a line break or NUL: {subject!r}")
            text = payload["content"][0]["value"]
            if greeting is not None and not text.startswith(greeting):
                problems.append(f"text starts {text[:40]!r}, expected {greeting!r}")
            html = payload["content"][1]["value"]
            if "<script>alert" in html:
                problems.append("the name reached the HTML unescaped")
        corpus.check(repr(name), problems)
    expected = {
        f"name{i}@example.com" for i, (_, want, _) in enumerate(cases) if want != QUARANTINED
    }
    corpus.check("(no other recipient)", [] if set(sent) == expected else [str(set(sent))])
    assert sink.stats()["rejected"] == {}, "the local API refused a message mailflow sent"
    corpus.done()
