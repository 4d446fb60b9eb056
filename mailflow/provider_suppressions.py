"""Two-way sync of suppressions with SendGrid: pull its lists, push mailflow's unsubscribes.

**Pull.** Every SendGrid suppression list lands in ``mf_suppressions``, ``source`` naming
the list (``sendgrid:bounces``, ...), ``created_at`` SendGrid's ``created`` time:

    list                 endpoint                          reason in mailflow
    bounces              GET /v3/suppression/bounces       bounce
    invalid_emails       GET /v3/suppression/invalid_emails dropped (a bad address)
    spam_reports         GET /v3/suppression/spam_reports  spamreport
    unsubscribes         GET /v3/suppression/unsubscribes  unsubscribe (global)
    group_unsubscribes   GET /v3/asm/suppressions          group_unsubscribe
    blocks               GET /v3/suppression/blocks        (counted, not stored)

No new reason is needed. Blocks are fetched and counted but suppress nothing: a block is a
temporary or IP-level refusal, not a dead address, and the webhook ingest makes the same
call for ``bounce`` events of type ``blocked`` (SendGrid itself keeps sending to them).

Paged lists are read ``limit`` at a time until a short page, newest first, between
``start_time`` (the list's watermark in ``mf_watermarks``, name ``sendgrid:<list>``,
minus :data:`OVERLAP`) and ``end_time`` (the start of this sync); the watermark then moves
to ``end_time``. SendGrid adds new entries at the head, so a page read while entries arrive
can only repeat an entry, never skip one. ``/v3/asm/suppressions`` has no paging or time
range at SendGrid and is read whole. Inserts are idempotent: an address already suppressed
stays as it is — except that a marketing-only entry (``unsubscribe``, ``group_unsubscribe``)
gives way to a bounce, bad address or complaint, as in :mod:`mailflow.webhook.ingest`, so
transactional mail stops too.

**Push.** mailflow's own unsubscribes — reason ``unsubscribe`` or ``manual`` from a source
that is not SendGrid (one-click ``one-click:<id>``, ``mailflow suppress`` ``cli``, imports
``import:<file>``; not ``sendgrid:*`` nor ``event:*``, which SendGrid already has) — go to
SendGrid's global unsubscribes (``POST /v3/asm/suppressions/global``) in chunks, each
address once: ``mf_suppression_pushes`` remembers what was pushed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, and_, exists, not_, or_, select, update

from mailflow import __version__, watermarks
from mailflow.addresses import normalise
from mailflow.clock import utcnow
from mailflow.errors import FatalRunError, MailflowError, TransientError
from mailflow.extract import MARKETING_ONLY_SUPPRESSIONS
from mailflow.settings import Settings
from mailflow.validation import EMAIL_REGEX
from mailflow.warehouse.dialect import insert_ignoring_conflicts
from mailflow.warehouse.schema import suppression_pushes, suppressions

__all__ = [
    "LISTS",
    "OVERLAP",
    "PUSH_LIST",
    "PUSH_REASONS",
    "ListResult",
    "ProviderList",
    "SendGridSuppressions",
    "SyncResult",
    "sync",
]

_EMAIL = re.compile(EMAIL_REGEX)


@dataclass(frozen=True, slots=True)
class ProviderList:
    """One SendGrid suppression list: where it is and what it means in mailflow."""

    name: str
    path: str
    reason: str | None  # None: fetched and counted, not stored (blocks)
    paged: bool = True

    @property
    def source(self) -> str:
        """``mf_suppressions.source`` of its rows, also its watermark name."""
        return f"sendgrid:{self.name}"


LISTS: tuple[ProviderList, ...] = (
    ProviderList("bounces", "/v3/suppression/bounces", "bounce"),
    ProviderList("blocks", "/v3/suppression/blocks", None),
    ProviderList("invalid_emails", "/v3/suppression/invalid_emails", "dropped"),
    ProviderList("spam_reports", "/v3/suppression/spam_reports", "spamreport"),
    ProviderList("unsubscribes", "/v3/suppression/unsubscribes", "unsubscribe"),
    ProviderList("group_unsubscribes", "/v3/asm/suppressions", "group_unsubscribe", paged=False),
)
#: Where mailflow's own unsubscribes are pushed (``mf_suppression_pushes.provider_list``).
PUSH_LIST = "sendgrid:unsubscribes"
#: Reasons of the rows pushed (manual entries default to ``manual``).
PUSH_REASONS = ("unsubscribe", "manual")
#: Each incremental pull starts this long before the last one ended (clock skew, lag).
OVERLAP = timedelta(minutes=10)
#: SendGrid's largest page (``limit`` 1-500) and the addresses sent per push request.
PAGE_SIZE = 500
PUSH_CHUNK = 500

_KEY_SETTING = "MAILFLOW_SENDGRID_API_KEY (or the Secret block MAILFLOW_SENDGRID_API_KEY_BLOCK)"


class SendGridSuppressions:
    """SendGrid's suppression endpoints over HTTP (``httpx``, synchronous)."""

    def __init__(
        self,
        host: str,
        api_key: str,
        *,
        timeout_s: float = 15.0,
        page_size: int = PAGE_SIZE,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not 1 <= page_size <= PAGE_SIZE:
            raise ValueError(f"page_size must be from 1 to {PAGE_SIZE}, got {page_size}")
        self.host = host.rstrip("/")
        self.page_size = page_size
        self._client = httpx.Client(
            base_url=self.host,
            headers={
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                "User-Agent": f"mailflow/{__version__}",
            },
            timeout=timeout_s,
            trust_env=False,
            transport=transport,
        )
        self.requests = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, *, page_size: int = PAGE_SIZE
    ) -> SendGridSuppressions:
        """A client for ``MAILFLOW_SENDGRID_HOST`` with the configured key and timeout."""
        return cls(
            settings.sendgrid_host,
            settings.api_key().get_secret_value(),
            timeout_s=settings.http_timeout_s,
            page_size=page_size,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SendGridSuppressions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(
        self, spec: ProviderList, *, start_time: int | None, end_time: int
    ) -> Iterator[list[dict[str, Any]]]:
        """Pages of ``spec`` (one page for an unpaged list), until a short page."""
        if not spec.paged:
            yield self._json_list(self._request("GET", spec.path))
            return
        offset = 0
        while True:
            params = {"limit": self.page_size, "offset": offset, "end_time": end_time}
            if start_time is not None:
                params["start_time"] = start_time
            page = self._json_list(self._request("GET", spec.path, params=params))
            yield page
            if len(page) < self.page_size:
                return
            offset += self.page_size

    def add_global_unsubscribes(self, emails: Sequence[str]) -> None:
        """``POST /v3/asm/suppressions/global`` (idempotent at SendGrid)."""
        self._request(
            "POST", "/v3/asm/suppressions/global", json={"recipient_emails": list(emails)}
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.requests += 1
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransientError(
                f"{method} {self.host}{path} failed ({exc.__class__.__name__}: {exc}); "
                "check MAILFLOW_SENDGRID_HOST and the network"
            ) from exc
        status = response.status_code
        if status in (401, 403):
            what = "refused" if status == 401 else "lacks the suppressions scope for"
            raise FatalRunError(
                f"SendGrid answered {status} to {method} {path}: the API key in {_KEY_SETTING} "
                f"is {what} this request; set a key with suppression read/write access"
            )
        if status == 429 or status >= 500:
            raise TransientError(f"SendGrid answered {status} to {method} {path}; try later")
        if not 200 <= status < 300:
            raise MailflowError(
                f"SendGrid answered {status} to {method} {path}: {response.text[:500]}"
            )
        return response

    @staticmethod
    def _json_list(response: httpx.Response) -> list[dict[str, Any]]:
        data = response.json()
        if not isinstance(data, list):
            raise MailflowError(f"SendGrid's answer to {response.request.url} is not a list")
        return [entry for entry in data if isinstance(entry, dict)]


@dataclass
class ListResult:
    """What pulling one list did."""

    fetched: int = 0
    added: int = 0
    upgraded: int = 0  # marketing-only entries that became this list's stronger reason
    invalid: int = 0  # entries without a usable address
    pages: int = 0


@dataclass
class SyncResult:
    """Counts of one sync: per list pulled, and addresses pushed."""

    pulled: dict[str, ListResult] = field(default_factory=dict)
    pushed: int = 0
    push_requests: int = 0

    def counts(self) -> dict[str, Any]:
        """JSON-ready counts (the flow's result)."""
        return {
            "pulled": {name: vars(result).copy() for name, result in self.pulled.items()},
            "added": sum(r.added for r in self.pulled.values()),
            "pushed": self.pushed,
        }


def sync(
    engine: Engine,
    client: SendGridSuppressions,
    *,
    lists: Sequence[ProviderList] = LISTS,
    push_chunk: int = PUSH_CHUNK,
    now: datetime | None = None,
    flow_run_id: str | None = None,
) -> SyncResult:
    """Pull every list in ``lists`` into ``mf_suppressions``, then push local unsubscribes.

    Each page is committed on its own, so an interrupted sync keeps what it stored; the
    next one starts from the last watermark again (inserts are idempotent).

    Raises:
        FatalRunError: the key was refused (401/403); the message names the setting.
        TransientError: SendGrid or the network failed (429, 5xx, timeout); retry later.
    """
    started = watermarks.naive_utc(now or utcnow())
    end_time = int(started.replace(tzinfo=UTC).timestamp())
    result = SyncResult()
    for spec in lists:
        result.pulled[spec.name] = _pull(engine, client, spec, started, end_time, flow_run_id)
    before = client.requests
    result.pushed = _push(engine, client, push_chunk)
    result.push_requests = client.requests - before
    return result


def _pull(
    engine: Engine,
    client: SendGridSuppressions,
    spec: ProviderList,
    started: datetime,
    end_time: int,
    flow_run_id: str | None,
) -> ListResult:
    outcome = ListResult()
    start_time = None
    if spec.paged:
        with engine.connect() as conn:
            mark = watermarks.read(conn, spec.source)
        if mark is not None:
            start_time = max(int((mark - OVERLAP).replace(tzinfo=UTC).timestamp()), 0)
    for page in client.entries(spec, start_time=start_time, end_time=end_time):
        outcome.pages += 1
        outcome.fetched += len(page)
        if spec.reason is not None and page:
            with engine.begin() as conn:
                _store(conn, spec, page, outcome)
    if spec.paged:
        with engine.begin() as conn:
            watermarks.advance(conn, spec.source, started, flow_run_id=flow_run_id)
    return outcome


def _created(entry: Mapping[str, Any], fallback: datetime) -> datetime:
    value = entry.get("created", entry.get("created_at"))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return fallback
    try:
        return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):
        return fallback


def _store(
    conn: Connection, spec: ProviderList, page: list[dict[str, Any]], outcome: ListResult
) -> None:
    assert spec.reason is not None
    now = utcnow()
    insert = insert_ignoring_conflicts(conn, suppressions).returning(suppressions.c.id)
    stronger = spec.reason not in MARKETING_ONLY_SUPPRESSIONS
    for entry in page:
        raw = entry.get("email")
        email = normalise(raw) if isinstance(raw, str) else ""
        if not _EMAIL.search(email) or len(email) > 320:
            outcome.invalid += 1
            continue
        created = _created(entry, now)
        values = {"email": email, "reason": spec.reason, "source": spec.source}
        if conn.execute(insert, {**values, "created_at": created}).all():
            outcome.added += 1
        elif stronger:
            upgraded = conn.execute(
                update(suppressions)
                .where(
                    suppressions.c.email == email,
                    suppressions.c.reason.in_(MARKETING_ONLY_SUPPRESSIONS),
                )
                .values(**values, created_at=created)
                .returning(suppressions.c.id)
            ).all()
            outcome.upgraded += len(upgraded)


def _to_push(conn: Connection, limit: int) -> list[str]:
    src = suppressions.c.source
    pushed = exists().where(
        suppression_pushes.c.email == suppressions.c.email,
        suppression_pushes.c.provider_list == PUSH_LIST,
    )
    rows = conn.execute(
        select(suppressions.c.email)
        .where(
            suppressions.c.reason.in_(PUSH_REASONS),
            or_(src.is_(None), and_(not_(src.like("sendgrid:%")), not_(src.like("event:%")))),
            not_(pushed),
        )
        .order_by(suppressions.c.id)
        .limit(limit)
    ).scalars()
    return list(rows)


def _push(engine: Engine, client: SendGridSuppressions, chunk: int) -> int:
    if chunk < 1:
        raise ValueError(f"push_chunk must be at least 1, got {chunk}")
    total = 0
    while True:
        with engine.connect() as conn:
            emails = _to_push(conn, chunk)
        if not emails:
            return total
        client.add_global_unsubscribes(emails)
        with engine.begin() as conn:
            conn.execute(
                insert_ignoring_conflicts(conn, suppression_pushes),
                [{"email": e, "provider_list": PUSH_LIST, "pushed_at": utcnow()} for e in emails],
            )
        total += len(emails)
        if len(emails) < chunk:
            return total
