"""One-click unsubscribe (RFC 8058): signed, opaque tokens and the message headers.

A token names a ledger row, not an address: ``v1.<ledger id, base 36>.<HMAC-SHA256,
truncated to 128 bits, base64url>``. No email appears in the URL; the address is
looked up in the ledger when the token is used. A forged or altered token fails the
HMAC check (constant-time comparison).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from pydantic import SecretStr

from mailflow.errors import MailflowError

_VERSION = "v1"
#: Tokens are ~30 characters; longer input is refused before any work.
MAX_TOKEN_CHARS = 128


class InvalidToken(MailflowError):
    """The unsubscribe token is malformed, forged or altered."""


def _mac(secret: SecretStr, payload: str) -> str:
    digest = hmac.new(
        secret.get_secret_value().encode(), f"{_VERSION}.{payload}".encode(), hashlib.sha256
    ).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def make_token(secret: SecretStr, ledger_id: int) -> str:
    """The token for one message."""
    payload = _base36(ledger_id)
    return f"{_VERSION}.{payload}.{_mac(secret, payload)}"


def read_token(secret: SecretStr, token: str) -> int:
    """The ledger id in ``token``.

    Raises:
        InvalidToken: wrong shape, unknown version, or a signature that does not match.
    """
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise InvalidToken("malformed unsubscribe token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        raise InvalidToken("malformed unsubscribe token")
    _, payload, mac = parts
    # Bytes: compare_digest refuses str with non-ASCII characters (TypeError, a 500).
    if not hmac.compare_digest(mac.encode(), _mac(secret, payload).encode()):
        raise InvalidToken("unsubscribe token signature does not match")
    try:
        return int(payload, 36)
    except ValueError:
        raise InvalidToken("malformed unsubscribe token") from None


def unsubscribe_url(base_url: str, secret: SecretStr, ledger_id: int) -> str:
    """The one-click URL for one message."""
    return f"{base_url.rstrip('/')}/u/{make_token(secret, ledger_id)}"


def list_unsubscribe_headers(url: str) -> dict[str, str]:
    """RFC 8058 headers: the HTTPS URL, and the one-click POST marker."""
    return {
        "List-Unsubscribe": f"<{url}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def _base36(n: int) -> str:
    if n < 0:
        raise ValueError("ledger ids are positive")
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out
