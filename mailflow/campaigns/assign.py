"""Deterministic assignment of recipients to the experiment's arms and the holdout.

A customer's place is a number in [0, 1) from a hash of the campaign name and the
customer id: the same on every rerun and every machine, independent across campaigns.
``[0, holdout_share)`` is the holdout; the rest of the interval is split among the
variants in order, by their shares. Changing the variants' split never moves anyone
into or out of the holdout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from mailflow.campaigns.model import Campaign

HOLDOUT = "holdout"
_SCALE = float(2**64)


def bucket(campaign: str, customer_id: int) -> float:
    """The customer's stable place in [0, 1) for ``campaign``."""
    digest = hashlib.sha256(f"{campaign}\x1f{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def arm_of(u: float, *, holdout_share: float, arms: Sequence[tuple[str, float]]) -> str:
    """The arm for place ``u``: ``holdout`` or a variant name."""
    if u < holdout_share:
        return HOLDOUT
    # Rescale the rest of the interval to [0, 1) and walk the cumulative shares.
    v = (u - holdout_share) / (1.0 - holdout_share)
    edge = 0.0
    for name, share in arms:
        edge += share
        if v < edge:
            return name
    return arms[-1][0]  # shares add up to 1 within rounding


def assign(campaign: Campaign, customer_ids: Iterable[int]) -> dict[int, str]:
    """Customer id → arm (``holdout`` or a variant name)."""
    arms = [(v.name, v.share) for v in campaign.variants]
    return {
        int(cid): arm_of(
            bucket(campaign.name, int(cid)), holdout_share=campaign.holdout_share, arms=arms
        )
        for cid in customer_ids
    }
