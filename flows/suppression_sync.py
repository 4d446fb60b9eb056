"""Flow ``suppression-sync``: SendGrid's suppression lists ↔ ``mf_suppressions``."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from tasks.suppressions import sync_suppressions


@flow(
    name="suppression-sync",
    description="Pull SendGrid's suppression lists into the warehouse; push local unsubscribes.",
)
def suppression_sync(
    page_size: Annotated[int, Field(ge=1, le=500)] = 500,
    push_chunk: Annotated[int, Field(ge=1, le=1000)] = 500,
) -> dict[str, Any]:
    """Bring mf_suppressions and SendGrid's lists level (see mailflow/provider_suppressions.py).

    Args:
        page_size: Entries asked per page of a SendGrid list (SendGrid allows 1-500).
        push_chunk: Addresses sent per request to SendGrid's global unsubscribes.
    """
    return sync_suppressions(page_size, push_chunk, flow_run.get_id())
