"""The mailer interface: what the send stage needs from an email provider."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One rendered message for one recipient, ready to hand to a provider."""

    ledger_id: int
    to_email: str
    subject: str
    html: str
    text: str
    to_name: str | None = None
    categories: tuple[str, ...] = ()
    custom_args: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    send_at: int | None = None


class Outcome(StrEnum):
    """What became of one message after the provider answered (or did not)."""

    SENT = "sent"  # accepted (202) with a provider message id
    FAILED = "failed"  # refused for good (400): never retry as it is
    RETRY = "retry"  # not accepted, safe to send again later (429, 5xx, refused connection)
    UNKNOWN = "unknown"  # request may have reached the provider (timeout): do not resend blindly


@dataclass(frozen=True, slots=True)
class SendResult:
    """The provider's answer for one message."""

    ledger_id: int
    outcome: Outcome
    message_id: str | None = None
    status_code: int | None = None
    reason: str | None = None
    attempts: int = 1


class Mailer(Protocol):
    """Sends batches of messages. Implementations retry transient failures themselves.

    ``send_many`` returns one result per message, in any order, and hands each result to
    ``on_result`` (in the event loop) the moment it is known, so the caller can record
    answers while the rest are in flight. It draws from an async iterable only as fast
    as it can send, so the caller can claim its rows just in time. It raises
    ``FatalRunError`` when the provider refuses the credentials (401/403): the caller
    must stop the run, and nothing of the batch counts as sent.
    """

    async def send_many(
        self,
        messages: Iterable[OutboundMessage] | AsyncIterable[OutboundMessage],
        on_result: Callable[[SendResult], None] | None = None,
    ) -> list[SendResult]: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Mailer: ...

    async def __aexit__(self, *exc: object) -> None: ...
