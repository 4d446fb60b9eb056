"""Message building: one claimed ledger row → one rendered message for the mailer."""

from __future__ import annotations

from pydantic import SecretStr

from mailflow import ledger
from mailflow.mailer.base import OutboundMessage
from mailflow.render import Renderer
from mailflow.triggers.base import Trigger
from mailflow.unsubscribe import list_unsubscribe_headers, unsubscribe_url


def build_message(
    claimed: ledger.ClaimedMessage,
    trigger: Trigger,
    renderer: Renderer,
    *,
    unsubscribe: tuple[str, SecretStr] | None,
    send_at: int | None = None,
) -> OutboundMessage:
    """Render one claimed ledger row into a message (raises ``TemplateError``).

    ``unsubscribe`` is ``(base_url, signing key)`` for marketing messages: they carry
    RFC 8058 one-click headers and the same link in the footer. The link needs the
    ledger id, so it is added here rather than stored with the planned context.
    ``send_at`` (unix time) schedules delivery, e.g. at the opening of quiet hours.

    The template variant rendered is the context's ``template_variant`` when the trigger
    puts one there (campaigns: the ledger's variant is the experiment arm, the template
    variant follows the segment), else the ledger's variant.
    """
    ctx = claimed.context
    headers: dict[str, str] = {}
    if unsubscribe is not None:
        url = unsubscribe_url(unsubscribe[0], unsubscribe[1], claimed.id)
        ctx = {**ctx, "links": {**ctx.get("links", {}), "unsubscribe": url}}
        headers = list_unsubscribe_headers(url)
    rendered = renderer.render(
        trigger.template,
        ctx,
        locale=ctx.get("customer", {}).get("locale"),
        variant=ctx.get("template_variant", claimed.variant),
    )
    customer = ctx.get("customer", {})
    return OutboundMessage(
        ledger_id=claimed.id,
        to_email=claimed.email,
        to_name=customer.get("first_name") or None,
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        categories=(trigger.name,),
        # Comes back on every engagement event: links the event to this ledger row.
        custom_args={"ledger_id": str(claimed.id), "trigger": trigger.name},
        headers=headers,
        send_at=send_at,
    )
