"""What the local SendGrid API accepted, held in memory (bounded, oldest dropped).

Each accepted request becomes one ``MessageRecord``. The raw body is kept instead
of the decoded payload: at 200,000 records a decoded 2 KB payload would cost
several times its size in Python objects (and give the garbage collector
millions of containers to walk), the bytes cost their size. Only what listing
filters on is extracted eagerly; the rest is decoded from the bytes on access.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["AcceptHook", "MessageRecord", "MessageStore", "Recipient", "record_from_payload"]


@dataclass(frozen=True, slots=True)
class Recipient:
    """One recipient of an accepted request, with what SendGrid's events would carry back."""

    email: str
    kind: str  # "to", "cc" or "bcc"
    personalization: int
    custom_args: dict[str, str]
    categories: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One accepted ``POST /v3/mail/send``.

    ``recipients`` are all addresses of the request (to, cc, bcc, in order);
    ``subject``, ``custom_args``, ``headers`` and ``send_at`` are what the *first*
    personalization gets (message level overridden by personalization level);
    ``recipients_detail()`` gives the per-recipient view for multi-personalization sends.
    """

    message_id: str
    received_ts: float
    recipients: tuple[str, ...]
    subject: str | None
    categories: tuple[str, ...]
    send_at: int | None
    raw: bytes

    @property
    def custom_args(self) -> dict[str, str]:
        """Message-level ``custom_args`` merged with the first personalization's."""
        return _merged(self.payload, "custom_args")

    @property
    def headers(self) -> dict[str, str]:
        """Message-level ``headers`` merged with the first personalization's."""
        return _merged(self.payload, "headers")

    @property
    def received_at(self) -> str:
        """Receipt time, UTC, ISO 8601."""
        return datetime.fromtimestamp(self.received_ts, UTC).isoformat()

    @property
    def payload(self) -> Any:
        """The request body as SendGrid would have parsed it (decoded on each access)."""
        return orjson.loads(self.raw)

    def recipients_detail(self) -> list[Recipient]:
        """Every recipient with its merged ``custom_args`` (what its events will carry)."""
        payload = self.payload
        base_args = _str_map(payload.get("custom_args"))
        out = []
        for i, person in enumerate(_objects(payload.get("personalizations"))):
            args = {**base_args, **_str_map(person.get("custom_args"))}
            for kind in ("to", "cc", "bcc"):
                for entry in _objects(person.get(kind)):
                    email = entry.get("email")
                    if isinstance(email, str):
                        out.append(Recipient(email, kind, i, args, self.categories))
        return out

    def to_dict(self, *, include_payload: bool = True) -> dict[str, Any]:
        """JSON-ready form, as served by ``GET /_sink/messages``."""
        payload = self.payload
        data: dict[str, Any] = {
            "message_id": self.message_id,
            "received_at": self.received_at,
            "recipients": list(self.recipients),
            "subject": self.subject,
            "categories": list(self.categories),
            "custom_args": _merged(payload, "custom_args"),
            "headers": _merged(payload, "headers"),
            "send_at": self.send_at,
        }
        if include_payload:
            data["payload"] = payload
        return data


def _objects(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _merged(payload: Any, key: str) -> dict[str, str]:
    if not isinstance(payload, dict):
        return {}
    persons = _objects(payload.get("personalizations"))
    first = persons[0] if persons else {}
    return {**_str_map(payload.get(key)), **_str_map(first.get(key))}


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v if isinstance(v, str) else str(v) for k, v in value.items()}


def record_from_payload(
    payload: Any, raw: bytes, *, message_id: str, received_ts: float
) -> MessageRecord:
    """Extract the searchable fields of an accepted payload (tolerant of odd shapes, since
    validation may be switched off)."""
    if not isinstance(payload, dict):
        payload = {}
    persons = _objects(payload.get("personalizations"))
    first = persons[0] if persons else {}
    recipients = tuple(
        entry["email"]
        for person in persons
        for kind in ("to", "cc", "bcc")
        for entry in _objects(person.get(kind))
        if isinstance(entry.get("email"), str)
    )
    subject = first.get("subject", payload.get("subject"))
    send_at = first.get("send_at", payload.get("send_at"))
    categories = payload.get("categories")
    return MessageRecord(
        message_id=message_id,
        received_ts=received_ts,
        recipients=recipients,
        subject=subject if isinstance(subject, str) else None,
        categories=tuple(c for c in categories if isinstance(c, str))
        if isinstance(categories, list)
        else (),
        send_at=send_at if isinstance(send_at, int) and not isinstance(send_at, bool) else None,
        raw=raw,
    )


#: Called on the event loop right after a message is stored. It must not block:
#: hand slow work (e.g. posting webhook events) to a queue or a task.
AcceptHook = Callable[[MessageRecord], None]


class MessageStore:
    """The most recent ``keep`` accepted messages, by id and in arrival order."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._by_id: OrderedDict[str, MessageRecord] = OrderedDict()
        self._hooks: list[AcceptHook] = []
        self.accepted = 0  # all ever accepted, including the ones dropped for space

    def add_hook(self, hook: AcceptHook) -> None:
        """Call ``hook(record)`` for every message accepted from now on."""
        self._hooks.append(hook)

    def add(self, record: MessageRecord) -> None:
        """Store ``record`` (dropping the oldest past ``keep``) and run the hooks."""
        self._by_id[record.message_id] = record
        self.accepted += 1
        if len(self._by_id) > self.keep:
            self._by_id.popitem(last=False)
        for hook in self._hooks:
            hook(record)

    def get(self, message_id: str) -> MessageRecord | None:
        """The record with this ``X-Message-Id``, if still held."""
        return self._by_id.get(message_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[MessageRecord]:
        return iter(self._by_id.values())

    def clear(self) -> int:
        """Forget every held message (the ``accepted`` count stays); returns how many."""
        count = len(self._by_id)
        self._by_id.clear()
        return count

    def query(
        self,
        *,
        to: str | None = None,
        category: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[MessageRecord]:
        """Matching records, oldest first, newest last.

        ``to`` matches any recipient (to, cc or bcc), case-insensitively; ``category``
        matches one category exactly. Paging counts back from the newest: ``offset``
        skips that many of the newest matches, ``limit`` caps how many are returned.
        """
        wanted = to.lower() if to else None
        found: list[MessageRecord] = []
        need = offset + limit
        for record in reversed(self._by_id.values()):
            if wanted is not None and wanted not in (r.lower() for r in record.recipients):
                continue
            if category is not None and category not in record.categories:
                continue
            found.append(record)
            if len(found) >= need:
                break
        found.reverse()
        return found[: max(len(found) - offset, 0)] if offset else found
