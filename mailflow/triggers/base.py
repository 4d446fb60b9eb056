"""What a trigger is: data that the one pipeline runs.

A trigger declares its candidate query (SQLAlchemy Core, dialect-neutral), the
dedupe key inside it, its template folder, its validation suite and how to turn an
extracted row into a render context. Everything else — exclusions, validation,
the ledger, rendering, sending, the summary — is shared.

The candidate query must label at least these columns:
``dedupe_key``, ``customer_id``, ``email``, ``first_name``, ``locale``,
``marketing_consent``; plus whatever the trigger's suite and context need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import pandas as pd
from sqlalchemy import Connection, Select

from mailflow.validation import Suite

CandidateQuery = Callable[[datetime, Mapping[str, Any]], Select[Any]]
ContextBuilder = Callable[[Connection, pd.DataFrame, "ContextDefaults"], list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class ContextDefaults:
    """Shop-wide values every render context carries."""

    shop_name: str
    shop_url: str
    support_email: str
    shop_address: str


@dataclass(frozen=True)
class Trigger:
    """One kind of message: who gets it, when, with what, and what makes it unique.

    Attributes:
        name: identifier; also the SendGrid category and the ledger's ``trigger``.
        template: folder under ``templates/``.
        kind: ``marketing`` (consent and suppressions required) or ``transactional``.
        candidates: the query of who should hear from us now (see module docstring).
        priority: ``(column, direction)`` pairs of the candidate query ordering one
            customer's candidates; with ``one_per_customer`` only the first is sent and
            the others are excluded as ``superseded``. Also the order of extraction,
            so a duplicate address keeps its highest-priority row.
        cooldown: a customer who got this trigger within it is excluded
            (``recently_notified``); ``None`` for no cooldown.
        suite: validation rules for the extracted rows.
        build_contexts: rows (a frame) → one render context per row, same order.
        variant: row → template variant name, or ``None`` for the default.
        defaults: the trigger's parameter defaults (the flow's parameters override).
        max_delay: how late the message may still go, counted from when it was first
            planned; a row an earlier run left planned past it is ``expired``, never sent.
            ``None``: no limit.
        recheck_condition: before sending a row an earlier run planned, run the candidate
            query again (with this run's parameters) and skip the row if it is no longer
            a candidate (``stale_reason`` says why, e.g. the cart became an order). Off
            for triggers whose query is a time slot or a scan window, not a condition.
        stale_reason: what "no longer a candidate" means for this trigger.
    """

    name: str
    template: str
    kind: Literal["marketing", "transactional"]
    candidates: CandidateQuery
    priority: Sequence[tuple[str, Literal["asc", "desc"]]]
    suite: Suite
    build_contexts: ContextBuilder
    variant: Callable[[Mapping[str, Any], Mapping[str, Any]], str | None] = lambda row, p: None
    one_per_customer: bool = True
    cooldown: timedelta | None = None
    defaults: Mapping[str, Any] | None = None
    max_delay: timedelta | None = timedelta(days=1)
    recheck_condition: bool = False
    stale_reason: str = "the trigger's condition no longer holds"

    @property
    def dedupe_prefix(self) -> str:
        return f"{self.name}:"

    def params(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults merged with ``overrides`` (unknown names refused with the valid ones)."""
        merged = dict(self.defaults or {})
        for key, value in (overrides or {}).items():
            if key not in merged:
                raise KeyError(
                    f"trigger {self.name!r} has no parameter {key!r}; "
                    f"valid: {', '.join(sorted(merged)) or 'none'}"
                )
            merged[key] = value
        return merged
