"""Deterministic arms: stable across reruns, independent across campaigns, shares within 1 pp."""

from __future__ import annotations

from collections import Counter

from mailflow.campaigns.assign import HOLDOUT, assign, bucket
from mailflow.campaigns.model import parse_campaign


def campaign(name: str, shares: list[float], holdout: float):  # type: ignore[no-untyped-def]
    return parse_campaign(
        {
            "name": name,
            "template": "campaign_spring",
            "segment": {"field": "country", "op": "eq", "value": "DE"},
            "variants": [
                {"name": f"v{i}", "share": s, "subject": "s"} for i, s in enumerate(shares)
            ],
            "holdout_share": holdout,
        }
    )


def test_assignment_is_stable_across_reruns_and_input_order() -> None:
    c = campaign("stable", [0.5, 0.5], 0.1)
    ids = list(range(1, 5001))
    first = assign(c, ids)
    assert assign(c, reversed(ids)) == first
    assert assign(c, ids[:100]) == {i: first[i] for i in ids[:100]}
    assert bucket("stable", 42) == bucket("stable", 42)


def test_split_is_within_one_point_of_the_requested_shares_on_100k() -> None:
    c = campaign("split", [0.6, 0.3, 0.1], 0.1)
    n = 100_000
    counts = Counter(assign(c, range(1, n + 1)).values())
    assert abs(counts[HOLDOUT] / n - 0.10) < 0.01
    for name, share in (("v0", 0.6), ("v1", 0.3), ("v2", 0.1)):
        assert abs(counts[name] / n - share * 0.9) < 0.01, (name, counts)


def test_campaigns_are_independent_and_holdout_survives_a_new_split() -> None:
    ids = range(1, 20_001)
    a = assign(campaign("one", [0.5, 0.5], 0.2), ids)
    b = assign(campaign("two", [0.5, 0.5], 0.2), ids)
    held_a = {i for i, arm in a.items() if arm == HOLDOUT}
    held_b = {i for i, arm in b.items() if arm == HOLDOUT}
    # Independent draws: the overlap is about 0.2 * 0.2 of everyone, not 0.2.
    assert abs(len(held_a & held_b) / 20_000 - 0.04) < 0.01
    resplit = assign(campaign("one", [0.8, 0.2], 0.2), ids)
    assert {i for i, arm in resplit.items() if arm == HOLDOUT} == held_a
