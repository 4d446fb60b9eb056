"""Validation of ``POST /v3/mail/send`` bodies, as SendGrid does it.

Two layers, both reported in SendGrid's error shape (``message``, ``field``, ``help``):

1. the JSON schema of the request body from SendGrid's official OpenAPI
   description (vendored beside this module), with its ``$ref``s resolved and
   compiled once with fastjsonschema (about 5 µs for a typical payload);
2. the limits SendGrid documents but the schema cannot express (at least one
   personalization, 1000 recipients, unique addresses, the 10,000-byte
   ``custom_args`` budget, reserved headers, content order, ``send_at`` horizon), and
   what it refuses in names and header fields: an unquoted ``,``/``;`` or a line break
   in a name, a line break or NUL in a header value or the subject, a header name that
   is not an RFC 5322 field name, a subject over RFC 5322's 998-character line. Where
   SendGrid's wording is not known the message is ours; the refusal is what matters,
   so a test sees the 400 production would give.

All errors are collected, not just the first, as SendGrid does.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

import fastjsonschema
import orjson

__all__ = [
    "HELP_BASE",
    "MAX_CUSTOM_ARGS_BYTES",
    "MAX_PERSONALIZATIONS",
    "MAX_RECIPIENTS",
    "MAX_SEND_AT_AHEAD_S",
    "MAX_SUBJECT_CHARS",
    "RESERVED_HEADERS",
    "is_valid_email",
    "mail_send_schema",
    "validate_mail_send",
]

HELP_BASE = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000
MAX_CUSTOM_ARGS_BYTES = 10_000
MAX_SEND_AT_AHEAD_S = 72 * 3600
#: RFC 5322 2.1.1: a line is at most 998 characters; SendGrid refuses longer subjects.
MAX_SUBJECT_CHARS = 998
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 field-name: no ':' or space
_LINE_BREAK_OR_NUL = re.compile(r"[\r\n\x00]")
RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)
_RESERVED_LIST = (
    "x-sg-id, x-sg-eid, received, dkim-signature, Content-Type, "
    "Content-Transfer-Encoding, To, From, Subject, Reply-To, CC, BCC"
)
_RECIPIENT_KINDS = ("to", "cc", "bcc")

# SendGrid's own wording where we know it; the generic ones follow gojsonschema,
# the validator SendGrid's messages come from ("Invalid type. Expected: ...").
_MSG_FROM = (
    "The from object must be provided for every email send. It is an object that requires "
    'the email parameter, but may also contain a name parameter.  e.g. {"email" : '
    '"example@example.com"}  or {"email" : "example@example.com", "name" : '
    '"Example Recipient"}.'
)
_MSG_PERSONALIZATIONS = (
    "The personalizations field is required and must have at least one personalization."
)
_MSG_TO = (
    "The to array is required for all personalization objects, and must have at least one "
    "email object with a valid email address."
)
_MSG_ADDRESS = "Does not contain a valid address."
_MSG_SUBJECT = (
    "The subject is required. You can get around this requirement if you use a template "
    "with a subject defined or if every personalization has a subject defined."
)
_MSG_CONTENT = (
    "Unless a valid template_id is provided, the content parameter is required. There must "
    "be at least one defined content block. We typically suggest both text/plain and "
    "text/html blocks are included, but only one block is required."
)
_MSG_CONTENT_ORDER = (
    "If present, text/plain and text/html may only be provided in this order: "
    "text/plain first, then text/html."
)
_MSG_RECIPIENTS = (
    "The total number of recipients must be no more than 1000. This includes all recipients "
    "defined within the to, cc, and bcc parameters, across each object that you include in "
    "the personalizations array."
)
_MSG_CATEGORIES = "Too many categories. You may not assign more than 10 categories to a message."
_MSG_REPLY_TO_BOTH = "You can use either the reply_to property or reply_to_list, but not both."

_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}

# RFC 5321/5322 "dot-atom" addresses, ASCII only, as SendGrid accepts them: no
# quoted local parts, no IP-literal domains, a dotted domain of valid labels.
_EMAIL_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def is_valid_email(value: str) -> bool:
    """True when ``value`` is a well-formed address (``local@domain.tld``, ≤ 254 chars)."""
    if len(value) > 254 or _EMAIL_RE.fullmatch(value) is None:
        return False
    return len(value.partition("@")[0]) <= 64


def _load_openapi() -> dict[str, Any]:
    text = resources.files("mailflow.sink").joinpath("openapi/tsg_mail_v3.json").read_text("utf-8")
    return json.loads(text)


def _resolve_refs(node: Any, schemas: Mapping[str, Any]) -> Any:
    """Inline every ``#/components/schemas/...`` reference (the file has no cycles)."""
    if isinstance(node, list):
        return [_resolve_refs(item, schemas) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if ref is None:
        return {key: _resolve_refs(value, schemas) for key, value in node.items()}
    prefix = "#/components/schemas/"
    if not ref.startswith(prefix):
        raise ValueError(f"unexpected $ref {ref!r} in the mail send schema")
    target = dict(_resolve_refs(schemas[ref[len(prefix) :]], schemas))
    # OpenAPI 3.0 ignores siblings of $ref; keep only the ones that do not clash
    # (the attachment ``disposition`` repeats ``type`` beside its enum $ref).
    for key, value in node.items():
        if key != "$ref":
            target.setdefault(key, value)
    return target


def _strip_docs(node: Any) -> Any:
    """Drop ``description``/``example``/``default`` (not validation, and ``default`` would
    make fastjsonschema write into the payload)."""
    if isinstance(node, list):
        return [_strip_docs(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: _strip_docs(value)
        for key, value in node.items()
        if key not in ("description", "example", "examples", "default", "title")
    }


@lru_cache(maxsize=1)
def mail_send_schema() -> dict[str, Any]:
    """The JSON schema of the ``/v3/mail/send`` request body, refs resolved and patched.

    Patches (each a documented SendGrid behaviour the OpenAPI file gets wrong or leaves out):

    - message-level ``custom_args`` is typed ``string`` in the file, but SendGrid takes
      (and its own client libraries send) an object of string to string, exactly like the
      personalization-level one; a string there is refused by the real API.
    - ``custom_args`` values, at both levels, must be strings (SendGrid refuses numbers
      with "Invalid type"); the file does not say so.
    - ``headers`` values, at both levels, must be strings (they become MIME headers).
    """
    spec = _load_openapi()
    body = spec["components"]["requestBodies"]["PostMailSend"]["content"]["application/json"]
    schema = _strip_docs(
        _resolve_refs(copy.deepcopy(body["schema"]), spec["components"]["schemas"])
    )
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    props = schema["properties"]
    props["custom_args"] = dict(string_map)
    props["headers"] = dict(string_map)
    person = props["personalizations"]["items"]["properties"]
    person["custom_args"] = {**person["custom_args"], "additionalProperties": {"type": "string"}}
    person["headers"] = {**person["headers"], "additionalProperties": {"type": "string"}}
    return schema


@lru_cache(maxsize=1)
def _schema_validator() -> Callable[[Any], Any]:
    # fast_fail=False collects every schema error in one pass, like SendGrid does.
    return fastjsonschema.compile(
        mail_send_schema(),
        formats={"email": is_valid_email},
        use_default=False,
        fast_fail=False,
    )


_NESTED_HELP = frozenset({"personalizations", "mail_settings", "tracking_settings"})


def _help(field: str | None) -> str | None:
    if not field:
        return None
    names = [part for part in field.split(".") if not part.isdigit()]
    anchor = names[:2] if names[0] in _NESTED_HELP else names[:1]
    return f"{HELP_BASE}#message.{'.'.join(anchor)}"


def _error(message: str, field: str | None) -> dict[str, Any]:
    return {"message": message, "field": field, "help": _help(field)}


def _join(path: list[str]) -> str | None:
    return ".".join(path) or None


def _schema_error_message(exc: fastjsonschema.JsonSchemaValueException, field: str | None) -> str:
    rule, expected, value = exc.rule, exc.rule_definition, exc.value
    if rule == "type":
        given = _JSON_TYPES.get(type(value), type(value).__name__)
        return f"Invalid type. Expected: {expected}, given: {given}."
    if rule == "format" and expected == "email":
        return _MSG_ADDRESS
    if rule == "minLength":
        if field == "subject" or (field or "").endswith(".subject"):
            return _MSG_SUBJECT
        return f"String length must be greater than or equal to {expected}."
    if rule == "maxLength":
        return f"String length must be less than or equal to {expected}."
    if rule == "maxItems":
        if field == "categories":
            return _MSG_CATEGORIES
        if field == "personalizations":
            return "The personalizations field cannot have more than 1000 personalizations."
        return f"Array must have at most {expected} items."
    if rule == "uniqueItems":
        return "Array items must be unique."
    if rule == "enum":
        return "Must be one of the following: " + ", ".join(json.dumps(v) for v in expected) + "."
    message = exc.message
    name = exc.name or "data"
    if message.startswith(name):
        message = message[len(name) :].strip()
    return f"{field or 'The request body'} {message}."


def _schema_errors(payload: object) -> list[dict[str, Any]]:
    try:
        _schema_validator()(payload)
    except fastjsonschema.JsonSchemaValuesException as exc:
        failures = exc.errors
    except fastjsonschema.JsonSchemaValueException as exc:
        failures = [exc]
    else:
        return []
    errors = []
    for failure in failures:
        path = failure.path[1:]  # drop the leading "data"
        if failure.rule == "required" and isinstance(failure.value, dict):
            for name in failure.rule_definition or ():
                if name not in failure.value:
                    errors.append(_required_error([*path, name]))
            continue
        field = _join(path)
        errors.append(_error(_schema_error_message(failure, field), field))
    return errors


def _required_error(path: list[str]) -> dict[str, Any]:
    field = _join(path)
    if path == ["from"] or path[-2:] == ["from", "email"]:
        return _error(_MSG_FROM, "from.email" if path[0] == "from" else field)
    if path == ["personalizations"]:
        return _error(_MSG_PERSONALIZATIONS, field)
    if len(path) == 3 and path[0] == "personalizations" and path[2] == "to":
        return _error(_MSG_TO, field)
    if path[-1] == "email":
        return _error(_MSG_ADDRESS, field)
    return _error(f"{path[-1]} is required.", field)


def _dicts(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _check_name(name: object, field: str) -> list[dict[str, Any]]:
    """SendGrid refuses a display name with an unquoted ``,`` or ``;`` (it reads the
    value as a list of addresses) and one with a line break."""
    if not isinstance(name, str):
        return []
    if "\r" in name or "\n" in name:
        return [_error("The name may not contain line breaks (CR or LF).", field)]
    quoted = len(name) >= 2 and name.startswith('"') and name.endswith('"')
    if ("," in name or ";" in name) and not quoted:
        return [
            _error(
                "Invalid name: a name containing ',' or ';' must be enclosed in double "
                'quotes, e.g. ""Doe, Jane"".',
                field,
            )
        ]
    return []


def _check_recipients(personalizations: list[Any]) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    duplicate_reported = False
    total = 0
    for i, person in enumerate(personalizations):
        if not isinstance(person, dict):
            continue
        to = person.get("to")
        if isinstance(to, list) and not to:
            errors.append(_error(_MSG_TO, f"personalizations.{i}.to"))
        for kind in _RECIPIENT_KINDS:
            for j, entry in enumerate(_dicts(person.get(kind))):
                total += 1
                errors += _check_name(entry.get("name"), f"personalizations.{i}.{kind}.{j}.name")
                email = entry.get("email")
                if not isinstance(email, str):
                    continue
                key = email.lower()
                if key in seen and not duplicate_reported:
                    # SendGrid reports only the first duplicate it meets.
                    duplicate_reported = True
                    field = f"personalizations.{i}.{kind}"
                    errors.append(
                        _error(
                            "Each email address in the personalization block should be unique "
                            "between to, cc, and bcc. We found the first duplicate instance of "
                            f"[{email}] in the {field} field.",
                            field,
                        )
                    )
                seen.add(key)
    if total > MAX_RECIPIENTS:
        errors.append(_error(_MSG_RECIPIENTS, "personalizations"))
    return errors


def _check_custom_args(payload: dict[str, Any], personalizations: list[Any]) -> list[dict]:
    message_args = payload.get("custom_args")
    message_args = message_args if isinstance(message_args, dict) else {}
    errors: list[dict[str, Any]] = []
    reported: set[str] = set()
    scopes = [p for p in personalizations if isinstance(p, dict)] or [{}]
    for i, person in enumerate(scopes):
        own = person.get("custom_args")
        own = own if isinstance(own, dict) else {}
        size = len(orjson.dumps({**message_args, **own}))
        if size < MAX_CUSTOM_ARGS_BYTES:
            continue
        field = f"personalizations.{i}.custom_args" if own else "custom_args"
        if field in reported:
            continue
        reported.add(field)
        errors.append(
            _error(
                "The custom_args of a message (message-level merged with personalization-level) "
                f"must be less than 10,000 bytes as JSON; this one is {size} bytes.",
                field,
            )
        )
    return errors


def _check_headers(headers: object, prefix: str) -> list[dict[str, Any]]:
    if not isinstance(headers, dict):
        return []
    errors = []
    for name, value in headers.items():
        field = f"{prefix}headers.{name}"
        if not _FIELD_NAME.match(name):
            errors.append(
                _error(
                    f"Invalid header name {name[:80]!r}: printable ASCII without spaces or ':'.",
                    field,
                )
            )
        elif name.lower() in RESERVED_HEADERS:
            errors.append(
                _error(
                    f"The header {name!r} is reserved and cannot be set. You may not override: "
                    f"{_RESERVED_LIST}.",
                    field,
                )
            )
        if isinstance(value, str) and _LINE_BREAK_OR_NUL.search(value):
            errors.append(
                _error(
                    f"The value of header {name[:80]!r} may not contain line breaks (CR or LF) "
                    "or NUL.",
                    field,
                )
            )
    return errors


def _check_subject(value: object, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, str):
        return []
    if _LINE_BREAK_OR_NUL.search(value):
        return [_error("The subject may not contain line breaks (CR or LF) or NUL.", field)]
    if len(value) > MAX_SUBJECT_CHARS:
        return [
            _error(
                f"The subject may be at most {MAX_SUBJECT_CHARS} characters; this one has "
                f"{len(value)}.",
                field,
            )
        ]
    return []


def _check_send_at(value: object, field: str, now: float) -> list[dict[str, Any]]:
    if isinstance(value, int) and not isinstance(value, bool) and value > now + MAX_SEND_AT_AHEAD_S:
        return [_error("The send_at parameter cannot be more than 72 hours in the future.", field)]
    return []


def _check_content(payload: dict[str, Any], personalizations: list[Any]) -> list[dict]:
    errors: list[dict[str, Any]] = []
    has_template = isinstance(payload.get("template_id"), str) and payload["template_id"] != ""
    content = payload.get("content")
    if not has_template and (content is None or content == []):
        errors.append(_error(_MSG_CONTENT, "content"))
    types = [str(item.get("type", "")).lower() for item in _dicts(content)]
    both = "text/plain" in types and "text/html" in types
    if both and types.index("text/plain") > types.index("text/html"):
        errors.append(_error(_MSG_CONTENT_ORDER, "content"))
    if not has_template and "subject" not in payload:
        persons = [p for p in personalizations if isinstance(p, dict)]
        if not persons or not all("subject" in p for p in persons):
            errors.append(_error(_MSG_SUBJECT, "subject"))
    return errors


def _limit_errors(payload: dict[str, Any], now: float) -> list[dict[str, Any]]:
    raw = payload.get("personalizations")
    personalizations: list[Any] = raw if isinstance(raw, list) else []
    errors: list[dict[str, Any]] = []
    if isinstance(raw, list) and not raw:
        errors.append(_error(_MSG_PERSONALIZATIONS, "personalizations"))
    errors += _check_recipients(personalizations)
    sender = payload.get("from")
    if isinstance(sender, dict):
        errors += _check_name(sender.get("name"), "from.name")
    errors += _check_custom_args(payload, personalizations)
    errors += _check_headers(payload.get("headers"), "")
    errors += _check_subject(payload.get("subject"), "subject")
    errors += _check_send_at(payload.get("send_at"), "send_at", now)
    for i, person in enumerate(personalizations):
        if isinstance(person, dict):
            errors += _check_headers(person.get("headers"), f"personalizations.{i}.")
            errors += _check_subject(person.get("subject"), f"personalizations.{i}.subject")
            errors += _check_send_at(person.get("send_at"), f"personalizations.{i}.send_at", now)
    errors += _check_content(payload, personalizations)
    if "reply_to" in payload and "reply_to_list" in payload:
        errors.append(_error(_MSG_REPLY_TO_BOTH, "reply_to_list"))
    return errors


def validate_mail_send(payload: object, *, now: float | None = None) -> list[dict[str, Any]]:
    """Validate a ``/v3/mail/send`` body the way SendGrid does.

    Args:
        payload: the decoded JSON body.
        now: unix time to judge ``send_at`` against (default: the current time).

    Returns:
        SendGrid-shaped errors (``{"message", "field", "help"}``), all of them;
        an empty list means SendGrid would accept the payload. Pure: the payload
        is not modified.
    """
    errors = _schema_errors(payload)
    if isinstance(payload, dict):
        seen = {(e["field"], e["message"]) for e in errors}
        for error in _limit_errors(payload, time.time() if now is None else now):
            if (error["field"], error["message"]) not in seen:
                errors.append(error)
    return errors
