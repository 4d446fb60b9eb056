"""What counts as an email address here, and how addresses are compared.

The choices, where RFCs and practice differ (README, "Addresses"):

- **Length**: at most 254 characters in all (RFC 5321's 256-octet path less the angle
  brackets, RFC 3696 erratum 1690) and at most 64 before the ``@`` (RFC 5321 4.5.3.1.1).
  A longer address is quarantined, never cut: a cut address is somebody else's.
- **Case**: RFC 5321 lets a mailbox treat ``Ann`` and ``ann`` as two people, but no
  mainstream mailbox provider does, and one customer typing their address in two cases
  must not get two messages, or keep getting mail after unsubscribing in the other case.
  So an address is trimmed and lower-cased once, when it is planned (:func:`normalise`),
  and that one form is what the ledger keys on, what suppressions match and what is
  delivered to. The cost: a mailbox that really is case-sensitive gets its address
  lower-cased; we accept it for one consistent identity per address.
- **Characters**: ASCII dot-atom only (no quoted local parts, no IP literals, no SMTPUTF8
  local parts); international domains as punycode (``xn--``).
"""

from __future__ import annotations

import re

__all__ = [
    "EMAIL_REGEX",
    "MAX_ADDRESS_CHARS",
    "MAX_LOCAL_PART_CHARS",
    "email_problem",
    "is_address",
    "normalise",
]

MAX_ADDRESS_CHARS = 254
MAX_LOCAL_PART_CHARS = 64

#: A pragmatic, not RFC 5322-complete, address check: what a mail provider will accept and a
#: human meant. ASCII only: IDN domains must arrive as punycode, and we do not count on the
#: provider accepting non-ASCII (SMTPUTF8) local parts. Rejects spaces, a missing or second
#: ``@``, two dots in a row, a dot at either end of the local part, a domain label starting or
#: ending with ``-``, and a TLD that is not 2+ letters (or an ``xn--`` punycode TLD). ``\Z``
#: rather than ``$``: GX matches with ``re.search`` and ``$`` would accept a trailing newline.
EMAIL_REGEX = (
    r"^(?=.{3,254}\Z)"  # whole address: 3 to 254 characters (RFC 5321 path limit), one line
    r"(?!\.)(?!.*\.\.)"  # no leading dot; no two dots in a row anywhere
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}(?<!\.)"  # local part (atext and dots), no end dot
    r"@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"  # domain labels, each then a dot
    r"(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})\Z"  # TLD: 2+ letters, or punycode
)

_EMAIL = re.compile(EMAIL_REGEX)


def is_address(value: object) -> bool:
    """True when ``value`` is a well-formed address as given (no trimming)."""
    return isinstance(value, str) and _EMAIL.search(value) is not None


def normalise(email: str) -> str:
    """The one form an address is stored, matched and delivered in: trimmed, lower-cased."""
    return email.strip().lower()


def email_problem(value: object) -> str:
    """The first thing wrong with an address that failed :data:`EMAIL_REGEX`, in plain words."""
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not text"
    if value != value.strip():
        return "leading or trailing whitespace"
    if any(ch.isspace() for ch in value):
        return "contains whitespace"
    if value.count("@") != 1:
        return "no '@'" if "@" not in value else "more than one '@'"
    local, domain = value.split("@")
    if not local:
        return "nothing before the '@'"
    if ".." in value:
        return "two dots in a row"
    if local.startswith(".") or local.endswith("."):
        return "the part before the '@' starts or ends with a dot"
    if len(value) > MAX_ADDRESS_CHARS or len(local) > MAX_LOCAL_PART_CHARS:
        return "too long"
    if "." not in domain:
        return f"domain {domain!r} has no top-level domain"
    if not value.isascii():
        return "non-ASCII characters"
    tld = domain.rsplit(".", 1)[1]
    if not (len(tld) >= 2 and tld.isalpha()) and not tld.lower().startswith("xn--"):
        return f"top-level domain {tld!r} is not two or more letters"
    return "characters not allowed in an address"
