"""Segments: who a campaign is for, as plain filters a marketer writes — never SQL.

A segment is a tree. A leaf is a :class:`Condition` (``field``, ``op``, ``value``); an
inner node is a :class:`Group` with exactly one of ``all`` (every child matches),
``any`` (at least one does) or ``not`` (its one child does not)::

    all:
      - {field: country, op: in, value: [DE, AT, CH]}
      - {field: lifetime_value, op: gte, value: 100}
      - any:
          - {field: ordered, op: within_days, value: 90}
          - {field: abandoned_cart, op: is, value: true}

Fields, operators and value types are a closed vocabulary (:data:`FIELDS`): an unknown
field or operator is refused with the list of valid ones, and every value is checked
against its type before anything is compiled. :func:`compile_segment` turns the tree
into a SQLAlchemy boolean expression over ``customers``; values only ever travel as
bound parameters, so no user text reaches SQL as text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)
from sqlalchemy import and_, exists, false, not_, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from mailflow.warehouse.schema import cart_items, carts, customers, events, orders, send_ledger

__all__ = [
    "FIELDS",
    "Condition",
    "Group",
    "Segment",
    "compile_segment",
    "describe_segment",
    "parse_segment",
]

#: A campaign's name: lower-case letters, digits, ``_`` and ``-`` (it becomes part of
#: the ledger's dedupe keys, the SendGrid category and Prefect artifact keys).
CAMPAIGN_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}\Z")
_COUNTRY_RE = re.compile(r"[A-Z]{2}\Z")
_LOCALE_RE = re.compile(r"[a-z]{2,3}(?:_[a-z0-9]{2,8})*\Z")
_MAX_LIST = 500
_MAX_DAYS = 3650

ValueKind = Literal[
    "country", "countries", "locale", "locales", "money", "money_range", "days", "bool",
    "timestamp", "campaigns",
]  # fmt: skip

_KIND_HELP: dict[str, str] = {
    "country": "an ISO 3166 two-letter country code such as 'DE'",
    "countries": "a list of two-letter country codes such as [DE, AT]",
    "locale": "a locale such as 'de' or 'pt_br'",
    "locales": "a list of locales such as [de, fr]",
    "money": "a non-negative number such as 100 or 99.50",
    "money_range": "two numbers [low, high] with low <= high",
    "days": f"a whole number of days from 1 to {_MAX_DAYS}",
    "bool": "true or false",
    "timestamp": "an ISO date or UTC date-time such as 2025-01-31 or 2025-01-31T08:00:00",
    "campaigns": "a list of campaign names (lower-case letters, digits, '_' and '-')",
}


class SegmentValueError(ValueError):
    """A value does not fit its field and operator; the message names the fix."""


# -- values: check and normalise (JSON-friendly), then convert for SQL ------------------


def _as_list(value: Any, what: str) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise SegmentValueError(f"expected {what}, got {_show(value)}")
    if not value:
        raise SegmentValueError(f"expected {what}, got an empty list")
    if len(value) > _MAX_LIST:
        raise SegmentValueError(f"at most {_MAX_LIST} values, got {len(value)}")
    return list(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _country(value: Any) -> str:
    if not isinstance(value, str) or not _COUNTRY_RE.match(value.strip().upper()):
        raise SegmentValueError(f"expected {_KIND_HELP['country']}, got {_show(value)}")
    return value.strip().upper()


def _locale(value: Any) -> str:
    text = value.strip().lower().replace("-", "_") if isinstance(value, str) else None
    if text is None or not _LOCALE_RE.match(text):
        raise SegmentValueError(f"expected {_KIND_HELP['locale']}, got {_show(value)}")
    return text


def _money(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise SegmentValueError(f"expected {_KIND_HELP['money']}, got {_show(value)}")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise SegmentValueError(f"expected {_KIND_HELP['money']}, got {_show(value)}") from None
    if not number.is_finite() or number < 0:
        raise SegmentValueError(f"expected {_KIND_HELP['money']}, got {_show(value)}")
    return str(number)


def _days(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SegmentValueError(f"expected {_KIND_HELP['days']}, got {_show(value)}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise SegmentValueError(f"expected {_KIND_HELP['days']}, got {_show(value)}")
    if not 1 <= int(value) <= _MAX_DAYS:
        raise SegmentValueError(f"expected {_KIND_HELP['days']}, got {_show(value)}")
    return int(value)


def _timestamp(value: Any) -> str:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise SegmentValueError(
                f"expected {_KIND_HELP['timestamp']}, got {_show(value)}"
            ) from None
    else:
        raise SegmentValueError(f"expected {_KIND_HELP['timestamp']}, got {_show(value)}")
    if parsed.tzinfo is not None:
        offset = parsed.utcoffset() or timedelta(0)
        parsed = (parsed - offset).replace(tzinfo=None)
    return parsed.isoformat()


def normalise_value(kind: ValueKind, value: Any) -> Any:
    """Check ``value`` against ``kind`` and return it normalised (JSON-friendly).

    Raises:
        SegmentValueError: the value does not fit; the message says what would.
    """
    if kind == "country":
        return _country(value)
    if kind == "countries":
        return sorted({_country(v) for v in _as_list(value, _KIND_HELP[kind])})
    if kind == "locale":
        return _locale(value)
    if kind == "locales":
        return sorted({_locale(v) for v in _as_list(value, _KIND_HELP[kind])})
    if kind == "money":
        return _money(value)
    if kind == "money_range":
        items = _as_list(value, _KIND_HELP[kind])
        if len(items) != 2:
            raise SegmentValueError(f"expected {_KIND_HELP[kind]}, got {_show(value)}")
        low, high = _money(items[0]), _money(items[1])
        if Decimal(low) > Decimal(high):
            raise SegmentValueError(f"expected {_KIND_HELP[kind]}, got {_show(value)}")
        return [low, high]
    if kind == "days":
        return _days(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise SegmentValueError(f"expected {_KIND_HELP[kind]}, got {_show(value)}")
        return value
    if kind == "timestamp":
        return _timestamp(value)
    if kind == "campaigns":
        names = _as_list(value, _KIND_HELP[kind])
        for name in names:
            if not isinstance(name, str) or not CAMPAIGN_NAME_RE.match(name):
                raise SegmentValueError(f"expected {_KIND_HELP[kind]}, got {_show(name)}")
        return sorted(set(names))
    raise AssertionError(kind)  # pragma: no cover - the vocabulary is closed


# -- the vocabulary ---------------------------------------------------------------------

Builder = Callable[[str, Any, datetime], ColumnElement[bool]]

_c = customers.c
_NOT_CANCELLED = orders.c.status != "cancelled"


def _compare(column: Any) -> Builder:
    def build(op: str, value: Any, now: datetime) -> ColumnElement[bool]:
        if op == "eq":
            return column == value  # type: ignore[no-any-return]
        if op == "ne":
            return column != value  # type: ignore[no-any-return]
        if op == "in":
            return column.in_(value)  # type: ignore[no-any-return]
        if op == "not_in":
            return column.not_in(value)  # type: ignore[no-any-return]
        raise AssertionError(op)  # pragma: no cover

    return build


def _money_ops(op: str, value: Any, now: datetime) -> ColumnElement[bool]:
    col = _c.lifetime_value
    if op == "between":
        return and_(col >= Decimal(value[0]), col <= Decimal(value[1]))
    number = Decimal(value)
    return {"gte": col >= number, "gt": col > number, "lte": col <= number, "lt": col < number}[op]


def _ordered(op: str, value: Any, now: datetime) -> ColumnElement[bool]:
    placed = [orders.c.customer_id == _c.id, _NOT_CANCELLED]
    if op == "is":
        found = exists().where(*placed)
        return found if value else ~found
    recent = exists().where(*placed, orders.c.created_at >= now - timedelta(days=value))
    return recent if op == "within_days" else ~recent


def _abandoned_cart(op: str, value: Any, now: datetime) -> ColumnElement[bool]:
    cond = [
        carts.c.customer_id == _c.id,
        exists().where(cart_items.c.cart_id == carts.c.id),
        ~exists().where(orders.c.cart_id == carts.c.id),
    ]
    if op == "within_days":
        cond.append(carts.c.updated_at >= now - timedelta(days=value))
    found = exists().where(*cond)
    return found if (op == "within_days" or value) else ~found


def _created(op: str, value: Any, now: datetime) -> ColumnElement[bool]:
    if op == "within_days":
        return _c.created_at >= now - timedelta(days=value)
    at = datetime.fromisoformat(value)
    return _c.created_at < at if op == "before" else _c.created_at >= at


def _engaged(event_names: tuple[str, ...]) -> Builder:
    def build(op: str, value: Any, now: datetime) -> ColumnElement[bool]:
        # mf_events is the source of truth (the metric rollup is built from it and may lag).
        found = exists(
            select(events.c.id)
            .join(send_ledger, send_ledger.c.id == events.c.ledger_id)
            .where(
                send_ledger.c.customer_id == _c.id,
                send_ledger.c.trigger.in_([f"campaign:{name}" for name in value]),
                events.c.event.in_(event_names),
            )
        )
        return found if op == "in" else ~found

    return build


@dataclass(frozen=True)
class FieldSpec:
    """One filterable field: its operators (with the value type each takes) and its SQL."""

    description: str
    ops: Mapping[str, ValueKind]
    build: Builder


FIELDS: dict[str, FieldSpec] = {
    "country": FieldSpec(
        "the customer's country (customers.country; customers without one never match)",
        {"eq": "country", "ne": "country", "in": "countries", "not_in": "countries"},
        _compare(_c.country),
    ),
    "locale": FieldSpec(
        "the customer's language (customers.locale)",
        {"eq": "locale", "ne": "locale", "in": "locales", "not_in": "locales"},
        _compare(_c.locale),
    ),
    "lifetime_value": FieldSpec(
        "money spent so far (customers.lifetime_value)",
        {"gte": "money", "gt": "money", "lte": "money", "lt": "money", "between": "money_range"},
        _money_ops,
    ),
    "ordered": FieldSpec(
        "placed an order (cancelled orders do not count): ever (is), or in the last N days",
        {"is": "bool", "within_days": "days", "not_within_days": "days"},
        _ordered,
    ),
    "abandoned_cart": FieldSpec(
        "has a cart with items that never became an order: ever (is), or active in the last N days",
        {"is": "bool", "within_days": "days"},
        _abandoned_cart,
    ),
    "created": FieldSpec(
        "when the customer signed up (customers.created_at, UTC)",
        {"before": "timestamp", "after": "timestamp", "within_days": "days"},
        _created,
    ),
    "opened_campaign": FieldSpec(
        "opened a message of one of the named campaigns (mf_events)",
        {"in": "campaigns", "not_in": "campaigns"},
        _engaged(("open",)),
    ),
    "clicked_campaign": FieldSpec(
        "clicked a link in a message of one of the named campaigns (mf_events)",
        {"in": "campaigns", "not_in": "campaigns"},
        _engaged(("click",)),
    ),
}


# -- the tree -----------------------------------------------------------------------------


class Condition(BaseModel):
    """One filter: ``field`` ``op`` ``value``, e.g. ``country in [DE, AT]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str = Field(description=f"One of: {', '.join(FIELDS)}.")
    op: str = Field(description="An operator of that field (eq, in, gte, within_days, ...).")
    value: Any = Field(description="The value, of the type the operator takes.")

    @model_validator(mode="after")
    def _check(self) -> Condition:
        spec = FIELDS.get(self.field)
        if spec is None:
            raise ValueError(
                f"unknown field {self.field!r}; valid fields: {', '.join(sorted(FIELDS))}"
            )
        kind = spec.ops.get(self.op)
        if kind is None:
            raise ValueError(
                f"field {self.field!r} has no operator {self.op!r}; "
                f"valid operators: {', '.join(spec.ops)}"
            )
        try:
            normalised = normalise_value(kind, self.value)
        except SegmentValueError as exc:
            raise ValueError(f"{self.field} {self.op}: {exc}") from None
        object.__setattr__(self, "value", normalised)
        return self


def _node_tag(value: Any) -> str:
    if isinstance(value, Group) or (
        isinstance(value, Mapping) and {"all", "any", "not"} & set(value)
    ):
        return "group"
    return "condition"


#: Limits of a segment, checked when it is parsed (campaign files, the Prefect form).
MAX_SEGMENT_DEPTH = 10
MAX_SEGMENT_CONDITIONS = 200

#: A segment: a :class:`Condition` or a :class:`Group`. Its JSON schema (the Prefect form)
#: is a plain object: the recursive union has no schema a form could render usefully, and
#: the validation above names every problem anyway.
Segment = Annotated[
    Annotated[Condition, Tag("condition")] | Annotated["Group", Tag("group")],
    Discriminator(_node_tag),
    WithJsonSchema(
        {
            "type": "object",
            "description": "Filters: {field, op, value}, or {all: [...]}, {any: [...]}, "
            "{not: ...}. Fields: " + ", ".join(FIELDS) + ".",
        }
    ),
]


class Group(BaseModel):
    """Exactly one of ``all`` (every child matches), ``any`` (one does), ``not`` (it does not)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    all: list[Segment] | None = Field(default=None, min_length=1, max_length=100)
    any: list[Segment] | None = Field(default=None, min_length=1, max_length=100)
    not_: Segment | None = Field(default=None, alias="not")

    @model_validator(mode="after")
    def _one_kind(self) -> Group:
        given = [k for k, v in (("all", self.all), ("any", self.any), ("not", self.not_)) if v]
        if len(given) != 1:
            raise ValueError(
                "a group needs exactly one of 'all', 'any' or 'not'"
                + (f" (got {', '.join(given)}); nest one group inside the other" if given else "")
            )
        if _depth(self) > MAX_SEGMENT_DEPTH:
            raise ValueError(
                f"the segment nests more than {MAX_SEGMENT_DEPTH} levels deep; flatten it"
            )
        if _conditions(self) > MAX_SEGMENT_CONDITIONS:
            raise ValueError(
                f"the segment has more than {MAX_SEGMENT_CONDITIONS} conditions; use "
                "'in' with a list of values instead of one condition per value"
            )
        return self


Group.model_rebuild()

_SEGMENT_ADAPTER: TypeAdapter[Condition | Group] = TypeAdapter(Segment)


def parse_segment(data: Any) -> Condition | Group:
    """Validate a segment given as data (a mapping, as in YAML).

    Raises:
        pydantic.ValidationError: naming each bad field, operator or value.
    """
    return _SEGMENT_ADAPTER.validate_python(data)


def _children(node: Group) -> list[Condition | Group]:
    return list(node.all or node.any or ([node.not_] if node.not_ is not None else []))


def _depth(node: Condition | Group) -> int:
    if isinstance(node, Condition):
        return 1
    return 1 + max(_depth(c) for c in _children(node))


def _conditions(node: Condition | Group) -> int:
    if isinstance(node, Condition):
        return 1
    return sum(_conditions(c) for c in _children(node))


def compile_segment(node: Condition | Group, *, now: datetime) -> ColumnElement[bool]:
    """The segment as a boolean expression over ``customers`` (values as bound parameters).

    ``now`` anchors relative filters such as ``within_days`` (naive UTC).
    """
    if _depth(node) > MAX_SEGMENT_DEPTH:  # a Group refuses this already; a safety net
        raise ValueError(f"the segment nests more than {MAX_SEGMENT_DEPTH} levels deep")
    return _compile(node, now)


def _compile(node: Condition | Group, now: datetime) -> ColumnElement[bool]:
    if isinstance(node, Condition):
        return FIELDS[node.field].build(node.op, node.value, now)
    if node.all is not None:
        return and_(true(), *(_compile(c, now) for c in node.all))
    if node.any is not None:
        return or_(false(), *(_compile(c, now) for c in node.any))
    assert node.not_ is not None
    return not_(_compile(node.not_, now))


def describe_segment(node: Condition | Group, indent: int = 0) -> str:
    """The segment in words, one filter per line (for previews)."""
    pad = "  " * indent
    if isinstance(node, Condition):
        return f"{pad}- {node.field} {node.op} {node.value}"
    if node.not_ is not None:
        return f"{pad}- not:\n" + describe_segment(node.not_, indent + 1)
    word = "all of" if node.all is not None else "any of"
    children = node.all if node.all is not None else node.any or []
    return f"{pad}- {word}:\n" + "\n".join(describe_segment(c, indent + 1) for c in children)
