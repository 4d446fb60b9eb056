"""Suppression lists of the local SendGrid API, fed by the outcomes it decides.

SendGrid keeps one list per kind of suppression and serves each under ``/v3``:

    bounces          GET /v3/suppression/bounces         {created, email, reason, status}
    blocks           GET /v3/suppression/blocks          {created, email, reason, status}
    invalid_emails   GET /v3/suppression/invalid_emails  {created, email, reason}
    spam_reports     GET /v3/suppression/spam_reports    {created, email, ip}
    unsubscribes     GET /v3/suppression/unsubscribes    {created, email} (global)
    group_unsubscribes  GET /v3/asm/suppressions         {email, group_id, group_name, created_at}

An address is on a list at most once (the first entry stays). The first five lists page
with ``limit`` (1-500, default 500), ``offset`` and ``start_time``/``end_time`` (unix
seconds, inclusive), newest first; ``GET /v3/asm/suppressions`` has no paging, as at
SendGrid. ``POST /v3/asm/suppressions/global`` adds to ``unsubscribes``.

Outcomes are recorded as :mod:`mailflow.sink.events` decides them (``record_outcome``),
with the message's receipt time as ``created``: ``bounce`` → bounces, ``blocked`` →
blocks, ``dropped`` → invalid_emails, ``spamreport`` → spam_reports, ``unsubscribe`` →
unsubscribes. Tests seed many entries at once with ``POST /_sink/suppressions``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mailflow.errors import ConfigError

__all__ = [
    "DEFAULT_GROUP",
    "MAX_LIMIT",
    "OUTCOME_LISTS",
    "PAGED_LISTS",
    "SuppressionStore",
]

#: The lists served with paging, by their name in the URL (``/v3/suppression/<name>``).
PAGED_LISTS = ("bounces", "blocks", "invalid_emails", "spam_reports", "unsubscribes")
ALL_LISTS = (*PAGED_LISTS, "group_unsubscribes")
#: SendGrid's page size bound (``PaginationCommonLimit``: 1-500), also the default here.
MAX_LIMIT = 500
#: Which list an outcome of ``mailflow.sink.events`` puts the recipient on.
OUTCOME_LISTS = {
    "bounce": "bounces",
    "blocked": "blocks",
    "dropped": "invalid_emails",
    "spamreport": "spam_reports",
    "unsubscribe": "unsubscribes",
}
#: The unsubscribe group seeded entries belong to when they name none.
DEFAULT_GROUP = (1, "Marketing")

_BOUNCE = ("550 5.1.1 The email account that you tried to reach does not exist.", "5.1.1")
_BLOCK = ("550 5.7.1 Message rejected due to local policy (blocked by the receiver).", "5.7.1")
_INVALID = "Mail domain mentioned in email address is unknown"
_SENDING_IP = "192.0.2.10"


def _entry(name: str, email: str, created: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    if name == "bounces":
        return {"created": created, "email": email, "reason": _BOUNCE[0], "status": _BOUNCE[1]}
    if name == "blocks":
        return {"created": created, "email": email, "reason": _BLOCK[0], "status": _BLOCK[1]}
    if name == "invalid_emails":
        return {"created": created, "email": email, "reason": _INVALID}
    if name == "spam_reports":
        return {"created": created, "email": email, "ip": _SENDING_IP}
    if name == "unsubscribes":
        return {"created": created, "email": email}
    group_id = extra.get("group_id", DEFAULT_GROUP[0])
    group_name = extra.get("group_name", DEFAULT_GROUP[1])
    return {"email": email, "group_id": group_id, "group_name": group_name, "created_at": created}


class SuppressionStore:
    """The sink's suppression lists, in memory (one entry per address and list)."""

    def __init__(self) -> None:
        # Keyed by lower-cased address (by (address, group) for group unsubscribes);
        # dicts keep insertion order, which breaks ties of ``created``.
        self._lists: dict[str, dict[Any, dict[str, Any]]] = {name: {} for name in ALL_LISTS}

    def add(
        self, name: str, email: str, created: int, extra: Mapping[str, Any] | None = None
    ) -> bool:
        """Put ``email`` on list ``name`` unless it is there already; True when added."""
        entries = self._lists[name]
        entry = _entry(name, email.strip(), created, extra or {})
        key: Any = email.strip().lower()
        if name == "group_unsubscribes":
            key = (key, entry["group_id"])
        if key in entries:
            return False
        entries[key] = entry
        return True

    def record_outcome(self, email: str, outcome: str, created: int) -> None:
        """Record one decided outcome (events that suppress nothing are ignored)."""
        name = OUTCOME_LISTS.get(outcome)
        if name is not None:
            self.add(name, email, created)

    def page(
        self,
        name: str,
        *,
        limit: int = MAX_LIMIT,
        offset: int = 0,
        start_time: int | None = None,
        end_time: int | None = None,
        email: str | None = None,
    ) -> list[dict[str, Any]]:
        """One page of list ``name``, newest first (``email`` is a prefix, any case)."""
        prefix = email.lower() if email else None
        found = [
            e
            for e in self._lists[name].values()
            if (start_time is None or e["created"] >= start_time)
            and (end_time is None or e["created"] <= end_time)
            and (prefix is None or e["email"].lower().startswith(prefix))
        ]
        found.sort(key=lambda e: -e["created"])  # stable: equal times keep their order
        return found[offset : offset + limit]

    def groups(self) -> list[dict[str, Any]]:
        """Every group unsubscribe (``GET /v3/asm/suppressions``), newest first."""
        found = list(self._lists["group_unsubscribes"].values())
        found.sort(key=lambda e: -e["created_at"])
        return found

    def seed(self, lists: Mapping[str, object], default_created: int) -> dict[str, int]:
        """Add many entries: ``{list: [email | {"email", "created", "group_id", ...}]}``.

        Returns how many were added per list.

        Raises:
            ConfigError: an unknown list or a malformed entry (the message names it).
        """
        added: dict[str, int] = {}
        for name, entries in lists.items():
            if name not in self._lists:
                known = ", ".join(ALL_LISTS)
                raise ConfigError(f"unknown suppression list {name!r}; known: {known}")
            if not isinstance(entries, list):
                raise ConfigError(f"{name} must be a list of addresses or objects with an email.")
            added[name] = sum(
                self.add(name, *_seed_entry(name, i, raw, default_created))
                for i, raw in enumerate(entries)
            )
        return added

    def clear(self) -> int:
        """Forget every entry of every list; returns how many there were."""
        count = sum(len(entries) for entries in self._lists.values())
        for entries in self._lists.values():
            entries.clear()
        return count

    def counts(self) -> dict[str, int]:
        """Entries per list."""
        return {name: len(entries) for name, entries in self._lists.items()}

    def add_global(self, emails: Iterable[str], created: int) -> None:
        """``POST /v3/asm/suppressions/global``: each address onto ``unsubscribes``."""
        for email in emails:
            self.add("unsubscribes", email, created)


def _seed_entry(
    name: str, index: int, raw: object, default_created: int
) -> tuple[str, int, Mapping[str, Any]]:
    where = f"{name}.{index}"
    if isinstance(raw, str):
        return raw, default_created, {}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("email"), str):
        raise ConfigError(f"{where} must be an address or an object with an email.")
    created = raw.get("created", raw.get("created_at", default_created))
    if isinstance(created, bool) or not isinstance(created, int) or created < 0:
        raise ConfigError(f"{where}.created must be unix seconds, got {created!r}.")
    extra = {k: raw[k] for k in ("group_id", "group_name") if k in raw}
    return raw["email"], created, extra
