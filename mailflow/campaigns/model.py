"""A campaign definition: a YAML file under ``campaigns/``, or the ``campaign`` flow's form.

Both carry the same fields and end up as one :class:`Campaign` (validated by pydantic);
:func:`load_campaign` reads a file and reports every problem with its place in the file
and the fix. Example (``campaigns/spring_sale.yaml``)::

    name: spring_sale
    kind: marketing                  # or transactional (no consent needed, not capped)
    template: campaign_spring        # folder under templates/
    segment: {all: [{field: country, op: in, value: [DE, AT]}]}
    variants:                        # subject lines, split among those not held out
      - {name: control, share: 0.5, subject: {en: "Spring is here", de: "Frühling!"}}
      - {name: urgency, share: 0.5, subject: "Three days left"}
    holdout_share: 0.1               # kept back (recorded, never sent) to measure lift
    send_window: {start: "08:00", end: "21:00"}   # in each recipient's own timezone
    default_locale: en
    unknown_locale: fallback         # or quarantine
    template_variants:               # per-segment template variant files (<name>.body.html)
      - {name: vip, segment: {field: lifetime_value, op: gte, value: 1000}}
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mailflow.campaigns.segments import CAMPAIGN_NAME_RE, Condition, Group, Segment
from mailflow.errors import ConfigError

__all__ = [
    "WEEKDAYS",
    "Campaign",
    "CampaignError",
    "SendWindow",
    "TemplateVariant",
    "Variant",
    "format_validation_error",
    "load_campaign",
]

_SLUG_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")
_LOCALE_RE = re.compile(r"[a-z]{2,3}(?:_[a-z0-9]{2,8})*\Z")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_ALL_DAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEKDAYS: tuple[str, ...] = _ALL_DAYS
_SHARE_TOLERANCE = 1e-6
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: A campaign's subject lines; mailbox clients show far fewer characters anyway.
MAX_CAMPAIGN_SUBJECT_CHARS = 200


class CampaignError(ConfigError):
    """A campaign definition is invalid; the message lists each problem and its fix."""


def _campaign_name(value: str) -> str:
    if not CAMPAIGN_NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid campaign name; use 1-48 lower-case letters, digits, "
            "'_' or '-', starting with a letter or digit (e.g. spring_sale)"
        )
    return value


def _slug(value: str) -> str:
    if not _SLUG_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name; use 1-32 lower-case letters, digits, '_' or '-'"
        )
    return value


def _locale(value: str) -> str:
    text = value.strip().lower().replace("-", "_")
    if not _LOCALE_RE.match(text):
        raise ValueError(f"{value!r} is not a locale; use e.g. 'en', 'de' or 'pt_br'")
    return text


CampaignName = Annotated[str, AfterValidator(_campaign_name)]
Slug = Annotated[str, AfterValidator(_slug)]
Locale = Annotated[str, AfterValidator(_locale)]


class Variant(BaseModel):
    """One arm of the experiment: a subject line (per locale) and its share of recipients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Slug = Field(description="Arm name, e.g. 'control' or 'b'. The first arm is control.")
    share: float = Field(gt=0, le=1, description="Share of the recipients not held out.")
    subject: dict[str, str] = Field(
        description="Subject line per locale ({en: ..., de: ...}) or one text for all locales."
    )

    @field_validator("subject", mode="before")
    @classmethod
    def _subject(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"*": value}
        return value

    @field_validator("subject")
    @classmethod
    def _subject_texts(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("give at least one subject line")
        out: dict[str, str] = {}
        for locale, text in value.items():
            key = "*" if locale == "*" else _locale(locale)
            clean = " ".join(text.split())
            if not clean:
                raise ValueError(f"the subject for {locale!r} is empty; write one")
            if _CONTROL_RE.search(clean):
                raise ValueError(
                    f"the subject for {locale!r} holds a control character (e.g. NUL); remove it"
                )
            if len(clean) > MAX_CAMPAIGN_SUBJECT_CHARS:
                raise ValueError(
                    f"the subject for {locale!r} is over {MAX_CAMPAIGN_SUBJECT_CHARS} "
                    "characters; shorten it"
                )
            out[key] = clean
        return out

    def subject_for(self, locale: str, default_locale: str) -> str:
        """The subject for ``locale``: exact, then its language, then the default, then any."""
        for key in (locale, locale.split("_")[0], default_locale, "*"):
            if key in self.subject:
                return self.subject[key]
        return next(iter(self.subject.values()))


class SendWindow(BaseModel):
    """When messages may arrive, in each recipient's own timezone (quiet hours outside)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: time = Field(default=time(8, 0), description="Opening, local time (HH:MM).")
    end: time = Field(default=time(21, 0), description="Closing, local time (HH:MM).")
    days: list[Weekday] = Field(
        default_factory=lambda: list(_ALL_DAYS),
        min_length=1,
        description="Weekdays on which the window opens.",
    )

    @field_validator("start", "end", mode="before")
    @classmethod
    def _quoted(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            # YAML reads an unquoted 08:00 as the number 480 (base 60).
            raise ValueError("write the time in quotes, e.g. start: '08:00'")
        return value

    @model_validator(mode="after")
    def _order(self) -> SendWindow:
        if self.end <= self.start:
            raise ValueError(
                f"end {self.end:%H:%M} is not after start {self.start:%H:%M}; the window is "
                "one span within a local day (e.g. start 08:00, end 21:00)"
            )
        return self


class TemplateVariant(BaseModel):
    """Customers matching ``segment`` get the template's ``<name>.<part>`` files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Slug
    segment: Segment


class Campaign(BaseModel):
    """One campaign, validated. See the module docstring for the YAML form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: CampaignName
    description: str = Field(default="", max_length=2000)
    kind: Literal["marketing", "transactional"] = "marketing"
    template: Slug
    segment: Segment
    variants: list[Variant] = Field(min_length=1, max_length=10)
    holdout_share: float = Field(default=0.0, ge=0, le=0.5)
    send_window: SendWindow | None = None
    default_locale: Locale = "en"
    unknown_locale: Literal["fallback", "quarantine"] = "fallback"
    template_variants: list[TemplateVariant] = Field(default_factory=list, max_length=10)

    @model_validator(mode="after")
    def _arms(self) -> Campaign:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique; got {names}")
        if "holdout" in names:
            raise ValueError("'holdout' is reserved for the held-out group; rename that variant")
        total = sum(v.share for v in self.variants)
        if abs(total - 1.0) > _SHARE_TOLERANCE:
            raise ValueError(
                f"variant shares add up to {total:g}, not 1; they split the recipients who "
                "are not held out (e.g. 0.5 and 0.5)"
            )
        tv = [t.name for t in self.template_variants]
        if len(set(tv)) != len(tv):
            raise ValueError(f"template variant names must be unique; got {tv}")
        return self

    @property
    def trigger(self) -> str:
        """The ledger's ``trigger`` (and SendGrid category) of this campaign's messages."""
        return f"campaign:{self.name}"

    @property
    def control(self) -> str:
        return self.variants[0].name

    def definition(self) -> dict[str, Any]:
        """The definition as JSON-friendly data (what is stored and hashed)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def definition_hash(self) -> str:
        text = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def format_validation_error(exc: ValidationError, source: str) -> str:
    """A pydantic error as lines ``source: field.path: problem``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(
            str(p) for p in err["loc"] if p not in ("condition", "group", "function-after")
        )
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {source}: {loc or '(top level)'}: {msg}")
    count = len(lines)
    return f"invalid campaign ({count} problem{'s' if count > 1 else ''}):\n" + "\n".join(lines)


def parse_campaign(data: Any, *, source: str = "campaign") -> Campaign:
    """Validate ``data`` (a mapping) into a :class:`Campaign`.

    Raises:
        CampaignError: every problem, each with its place and the fix.
    """
    if not isinstance(data, dict):
        raise CampaignError(
            f"{source}: expected a mapping of campaign fields (name, segment, template, "
            f"variants, ...), got {type(data).__name__}"
        )
    try:
        return Campaign.model_validate(data)
    except ValidationError as exc:
        raise CampaignError(format_validation_error(exc, source)) from None


def load_campaign(path: str | Path) -> Campaign:
    """Read and validate a campaign YAML file.

    Raises:
        CampaignError: the file is missing, not YAML, or not a valid campaign.
    """
    file = Path(path)
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise CampaignError(f"{file}: no such file; give the path of a campaign YAML") from None
    if size > MAX_CAMPAIGN_BYTES:
        raise CampaignError(
            f"{file}: {size} bytes, over the {MAX_CAMPAIGN_BYTES} a campaign file may have"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CampaignError(
            f"{file}: not UTF-8 text (byte {exc.start}); save the campaign file as UTF-8"
        ) from None
    except OSError as exc:  # a folder, no permission, ...
        raise CampaignError(
            f"{file}: cannot be read ({exc.strerror or type(exc).__name__}); give the path "
            "of a campaign YAML file"
        ) from None
    try:
        data = yaml.load(text, Loader=_CampaignLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise CampaignError(f"{file}: not valid YAML ({exc}); fix the syntax") from None
    except _TooComplex as exc:
        raise CampaignError(f"{file}: {exc}") from None
    return parse_campaign(data, source=str(file))


#: Limits of a campaign file, checked before anything is built from it.
MAX_CAMPAIGN_BYTES = 256 * 1024
MAX_YAML_DEPTH = 40


class _TooComplex(Exception):
    pass


class _CampaignLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``: a small file could expand into
    billions of nodes) and with a bound on nesting (deep documents exhaust the stack)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _TooComplex(
                f"line {mark.line + 1}: YAML aliases (*name) are not allowed in campaign "
                "files; write the value out"
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _TooComplex(
                    f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# The segment types are recursive; resolve their references here, where both are imported.
__all__ += ["Condition", "Group"]
TemplateVariant.model_rebuild()
Campaign.model_rebuild()
