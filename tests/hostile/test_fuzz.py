"""Property-based fuzzing (Hypothesis) of the three parsers that take outside input: Event
Webhook events (the ingest), campaign files (the YAML loader and the model) and unsubscribe
tokens. Bounded: ``max_examples`` and a per-example ``deadline`` keep each test well under
20 s on a busy two-core machine; no example database is written (``database=None``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import Engine, select

from mailflow.campaigns.model import Campaign, CampaignError, load_campaign
from mailflow.unsubscribe import InvalidToken, make_token, read_token
from mailflow.warehouse.engine import make_engine
from mailflow.warehouse.migrate import upgrade
from mailflow.warehouse.schema import suppressions
from mailflow.webhook.ingest import EVENT_TYPES, store_events

# Hypothesis warns when the global `random` state changes while it draws an example. No
# strategy here uses it, but background threads left by other tests (Prefect's client,
# a local API's event emitter) may, and the warning would fail a fuzz test at random.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

FUZZ = settings(
    max_examples=200,
    deadline=2000,  # ms per example
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- webhook events ------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
CONTROL = st.sampled_from(["\x00", "\r", "\n", "\t", " ", "\x7f", "\x85", "\u200b", ""])
ADDRESS = st.builds(
    lambda local, cut, c, domain, case: (
        (local[:cut] + c + local[cut:] + "@" + domain).swapcase()
        if case
        else local[:cut] + c + local[cut:] + "@" + domain
    ),
    st.text("abcXYZ.+-_", min_size=1, max_size=10),
    st.integers(0, 10),
    CONTROL,
    st.sampled_from(["example.com", "EXAMPLE.org", "x.io"]),
    st.booleans(),
)
EVENT = st.fixed_dictionaries(
    {},
    optional={
        "email": ADDRESS | JSON,
        "event": st.sampled_from(sorted(EVENT_TYPES)) | JSON,
        "timestamp": st.integers(-(2**70), 2**70) | st.floats() | JSON,
        "sg_event_id": st.text(max_size=300) | JSON,
        "sg_message_id": st.text(max_size=50) | JSON,
        "ledger_id": st.integers() | st.text(max_size=10) | JSON,
        "type": st.sampled_from(["bounce", "blocked", "BLOCKED"]) | JSON,
        "reason": st.text(max_size=50) | JSON,
        "url": JSON,
    },
)

# Events SendGrid could send, whose addresses carry the hostile characters above: these
# reach the suppression path, the one that must never hit another address.
PLAUSIBLE = st.fixed_dictionaries(
    {
        "email": ADDRESS,
        "event": st.sampled_from(["bounce", "spamreport", "unsubscribe", "group_unsubscribe"]),
        "timestamp": st.integers(1_600_000_000, 1_800_000_000),
    },
    optional={"sg_event_id": st.text(max_size=20), "type": st.sampled_from(["bounce", "blocked"])},
)

_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f\s]")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'warehouse.db'}"
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


@settings(FUZZ, max_examples=300)
@given(batch=st.lists(PLAUSIBLE | EVENT, max_size=5))
@example(batch=[{"email": "vic\x00tim@example.com", "event": "spamreport"}])
@example(batch=[{"ledger_id": 2**63}, {"ledger_id": "-1"}])  # found: past BIGINT failed a batch
def test_fuzz_webhook_ingest_suppresses_only_addresses_given_as_they_are(
    engine: Engine, batch: list[dict[str, Any]]
) -> None:
    given_as_is = {
        e["email"].strip().lower()
        for e in batch
        if isinstance(e.get("email"), str) and not _CONTROL_OR_SPACE.search(e["email"].strip())
    }
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            result = store_events(conn, batch)
            added = set(conn.execute(select(suppressions.c.email)).scalars())
        finally:
            transaction.rollback()  # every example starts from an empty warehouse
    assert result.received == len(batch) == result.stored + result.duplicates
    event("some address suppressed" if added else "nobody suppressed")  # not vacuous
    assert added <= given_as_is, f"suppressed {added - given_as_is}, never given as such"


# -- campaign files ------------------------------------------------------------------------

SEGMENT = st.recursive(
    st.fixed_dictionaries(
        {
            "field": st.sampled_from(["country", "lifetime_value", "ordered", "nope"]),
            "op": st.sampled_from(["eq", "in", "gte", "within_days", "is", "like"]),
            "value": JSON,
        }
    ),
    lambda inner: st.dictionaries(
        st.sampled_from(["all", "any", "not"]),
        st.lists(inner, max_size=3) | inner,
        min_size=1,
        max_size=2,
    ),
    max_leaves=6,
)
CAMPAIGN = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["spring", "Bad Name", ""]) | st.text(max_size=10),
        "template": st.sampled_from(["campaign_spring", "../x"]) | JSON,
        "segment": SEGMENT | JSON,
        "variants": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.text(max_size=5),
                    "share": st.floats() | JSON,
                    "subject": st.text(max_size=30) | JSON,
                }
            ),
            max_size=3,
        )
        | JSON,
        "holdout_share": st.floats() | JSON,
        "send_window": JSON,
        "kind": st.sampled_from(["marketing", "transactional", "x"]),
    },
)


@settings(FUZZ, max_examples=500)
@given(
    content=st.one_of(
        st.text(max_size=400),
        st.binary(max_size=400),
        CAMPAIGN.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
        st.text("[]{}:&*!|>-#'\" \n\tab0", max_size=200),
    )
)
def test_fuzz_campaign_files_load_or_are_refused_with_a_campaign_error(
    tmp_path_factory: pytest.TempPathFactory, content: str | bytes
) -> None:
    path = Path(tmp_path_factory.getbasetemp()) / "fuzz-campaign.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    try:
        campaign = load_campaign(path)
    except CampaignError as exc:
        assert str(path) in str(exc) or "campaign" in str(exc)
        assert len(str(exc)) < 20_000
    else:
        assert isinstance(campaign, Campaign)


# -- unsubscribe tokens --------------------------------------------------------------------

KEY = SecretStr("fuzz-unsubscribe-secret-0123456789")


@settings(FUZZ, max_examples=1000)
@given(
    token=st.text(max_size=200)
    | st.from_regex(r"v1\.[0-9a-z]{1,8}\.[A-Za-z0-9_-]{22}", fullmatch=True)
)
def test_fuzz_arbitrary_tokens_are_refused_or_name_a_real_id(token: str) -> None:
    try:
        ledger_id = read_token(KEY, token)
    except InvalidToken:
        return
    # Only a token this key made can be read: the same id gives back the same token.
    assert make_token(KEY, ledger_id) == token


@settings(FUZZ, max_examples=1000)
@given(ledger_id=st.integers(0, 2**63 - 1), position=st.integers(0, 200), char=st.characters())
def test_fuzz_a_changed_character_invalidates_a_token(
    ledger_id: int, position: int, char: str
) -> None:
    token = make_token(KEY, ledger_id)
    assert read_token(KEY, token) == ledger_id
    i = position % len(token)
    changed = token[:i] + char + token[i + 1 :]
    if changed == token:
        return
    with pytest.raises(InvalidToken):
        read_token(KEY, changed)
