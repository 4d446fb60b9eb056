"""A campaign as a trigger: the same data the one pipeline runs for every message.

The candidate query is the segment compiled over ``customers``; the dedupe key is
``campaign:<name>:<customer_id>`` (one message per customer per campaign, ever); the
ledger's ``variant`` is the experiment arm; the template variant (per segment) and the
send window travel in the render context (``template_variant``, ``send_window``), which
the send stage reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Connection, String, case, cast, literal, null, select
from sqlalchemy.sql.elements import ColumnElement

from mailflow.campaigns.model import Campaign, parse_campaign
from mailflow.campaigns.segments import compile_segment
from mailflow.campaigns.window import window_context
from mailflow.errors import ConfigError
from mailflow.settings import get_settings
from mailflow.triggers import get_trigger
from mailflow.triggers.base import ContextDefaults, Trigger
from mailflow.triggers.context import customer_context, money, shop_context, text_or_none
from mailflow.validation import Rule, recipient_suite
from mailflow.warehouse.schema import campaigns, customers

CAMPAIGN_PREFIX = "campaign:"

#: A campaign's "cooldown": its whole life (the shared exclusions then leave out any
#: customer or address the campaign already reached, as ``recently_notified``).
ONCE_PER_CAMPAIGN = timedelta(days=3650)


def template_locales(template: str, templates_dir: Path | None = None) -> frozenset[str]:
    """The locale folders the template has (``en``, ``de``, ...)."""
    root = (templates_dir or get_settings().templates_dir) / template
    if not root.is_dir():
        raise ConfigError(
            f"template folder {root.name!r} does not exist under {root.parent}; create "
            f"templates/{template}/<locale>/{{subject.txt, body.html, body.txt}} or fix "
            "the campaign's template"
        )
    with os.scandir(root) as entries:
        return frozenset(e.name for e in entries if e.is_dir() and not e.name.startswith("_"))


def render_locale(locale: Any, available: frozenset[str], default: str) -> str:
    """The locale the message is written in: the customer's, its language, or the default."""
    if isinstance(locale, str):
        wanted = locale.strip().lower().replace("-", "_")
        for candidate in (wanted, wanted.split("_")[0]):
            if candidate in available:
                return candidate
    return default


def campaign_trigger(campaign: Campaign) -> Trigger:
    """The :class:`Trigger` that runs ``campaign`` through the shared pipeline."""

    def candidates(now: datetime, _params: Mapping[str, Any]) -> Any:
        c = customers.c
        variant: ColumnElement[Any] = null()
        if campaign.template_variants:
            variant = case(
                *(
                    (compile_segment(tv.segment, now=now), literal(tv.name))
                    for tv in campaign.template_variants
                ),
                else_=null(),
            )
        return select(
            (literal(f"{campaign.trigger}:") + cast(c.id, String)).label("dedupe_key"),
            c.id.label("customer_id"),
            c.email,
            c.first_name,
            c.last_name,
            c.locale,
            c.timezone,
            c.country,
            c.marketing_consent,
            c.lifetime_value,
            variant.label("template_variant"),
        ).where(compile_segment(campaign.segment, now=now))

    def build_contexts(
        conn: Connection, frame: pd.DataFrame, shop: ContextDefaults
    ) -> list[dict[str, Any]]:
        available = template_locales(campaign.template)
        default = campaign.default_locale
        by_arm = {v.name: v for v in campaign.variants}
        shop_ctx = shop_context(shop)
        window = campaign.send_window
        contexts = []
        for row in frame.itertuples(index=False):
            locale = render_locale(row.locale, available, default)
            arm = by_arm[str(row.arm)]
            tv = row.template_variant if isinstance(row.template_variant, str) else None
            ctx: dict[str, Any] = {
                "customer": customer_context(
                    row,
                    locale=locale,
                    country=text_or_none(row.country),
                    lifetime_value=money(row.lifetime_value),
                ),
                "campaign": {
                    "name": campaign.name,
                    "variant": arm.name,
                    "subject": arm.subject_for(locale, default),
                },
                "shop": shop_ctx,
                # Read by the send stage: the template variant to render (None = default
                # files) — the ledger's variant is the experiment arm — and quiet hours.
                "template_variant": tv,
            }
            if window is not None:
                tz = row.timezone if isinstance(row.timezone, str) else None
                ctx["send_window"] = window_context(
                    tz, start=window.start, end=window.end, days=list(window.days)
                )
            contexts.append(ctx)
        return contexts

    if campaign.unknown_locale == "quarantine":
        suite = recipient_suite(
            campaign.trigger,
            locale_column=None,
            extra=(Rule.in_set("locale", sorted(template_locales(campaign.template))),),
        )
    else:
        # Unknown locales are written in the default locale (build_contexts), not quarantined.
        suite = recipient_suite(campaign.trigger, locale_column=None)
    return Trigger(
        name=campaign.trigger,
        template=campaign.template,
        kind=campaign.kind,
        candidates=candidates,
        priority=(("customer_id", "asc"),),
        suite=suite,
        build_contexts=build_contexts,
        variant=lambda row, _p: str(row["arm"]),
        one_per_customer=False,  # one row per customer by construction
        # Once per campaign, by customer (the dedupe key) and by address: two customer
        # records sharing an inbox get one message between them, on reruns too.
        cooldown=ONCE_PER_CAMPAIGN,
        defaults={},
        # Rows waiting for a send window beyond SendGrid's 72 h go out on a later run.
        max_delay=timedelta(days=7),
    )


def load_stored(conn: Connection, name_or_trigger: str) -> Campaign | None:
    """The campaign stored under ``name`` (or its ``campaign:<name>`` trigger)."""
    name = name_or_trigger.removeprefix(CAMPAIGN_PREFIX)
    row = conn.execute(select(campaigns.c.definition).where(campaigns.c.name == name)).first()
    if row is None:
        return None
    return parse_campaign(row.definition, source=f"mf_campaigns[{name}]")


def resolve_trigger(name: str) -> Trigger:
    """A registered trigger, or the campaign stored in ``mf_campaigns`` for ``campaign:<name>``."""
    if not name.startswith(CAMPAIGN_PREFIX):
        return get_trigger(name)
    from mailflow.warehouse.engine import get_engine

    with get_engine().connect() as conn:
        campaign = load_stored(conn, name)
    if campaign is None:
        raise KeyError(
            f"unknown campaign {name!r}: it is not in mf_campaigns; run the campaign flow "
            "(or `mailflow campaign submit FILE`) to register it"
        )
    return campaign_trigger(campaign)
