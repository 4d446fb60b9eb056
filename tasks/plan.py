"""Plan stage: a ledger row per message before anything is sent, then batches of ids."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mailflow import ledger
from mailflow.settings import get_settings
from mailflow.triggers import ContextDefaults, get_trigger
from mailflow.warehouse.engine import get_engine

_CHUNK = 5_000


def shop_defaults() -> ContextDefaults:
    """Shop-wide context values from the settings."""
    s = get_settings()
    return ContextDefaults(
        shop_name=s.from_name,
        shop_url=s.public_base_url.rstrip("/"),
        support_email=s.support_email,
        shop_address=s.shop_address,
    )


@task(name="plan", cache_policy=NONE, persist_result=False)
def plan_messages(
    trigger_name: str,
    frame: pd.DataFrame,
    params: dict[str, Any],
    flow_run_id: str | None,
    batch_size: int,
    lease_minutes: float = 30.0,
) -> list[list[int]]:
    """Write ``planned`` ledger rows for ``frame`` and return the ids to send, in batches.

    The batches also hold rows an earlier run planned but never claimed (it stopped
    before sending them): they are safe to send, and nothing planned is left behind.
    """
    trigger = get_trigger(trigger_name)
    shop = shop_defaults()
    engine = get_engine()
    logger = get_run_logger()
    with engine.begin() as conn:
        expired = ledger.expire_stale_claims(
            conn, trigger_name, lease=timedelta(minutes=lease_minutes)
        )
    if expired:
        logger.warning(
            "%s: %d messages were left mid-send by a stopped run; marked unknown, not resent",
            trigger_name,
            expired,
        )
    for start in range(0, len(frame), _CHUNK):
        part = frame.iloc[start : start + _CHUNK]
        with engine.begin() as conn:
            contexts = trigger.build_contexts(conn, part, shop)
            records = part.to_dict("records")
            ledger.plan(
                conn,
                trigger_name,
                (
                    ledger.PlannedMessage(
                        dedupe_key=row["dedupe_key"],
                        # Stored normalised: the exclusions compare addresses case-insensitively.
                        email=str(row["email"]).strip().lower(),
                        customer_id=int(row["customer_id"]),
                        variant=trigger.variant(row, params),
                        context=ctx,
                    )
                    for row, ctx in zip(records, contexts, strict=True)
                ),
                flow_run_id=flow_run_id,
            )
    with engine.connect() as conn:
        ids = ledger.planned_ids(conn, trigger_name)
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    logger.info(
        "%s: %d messages planned in %d batches of up to %d",
        trigger_name,
        len(ids),
        len(batches),
        batch_size,
    )
    return batches
