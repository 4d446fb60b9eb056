"""SendGrid's Signed Event Webhook: ECDSA P-256 / SHA-256 over ``timestamp + body``.

SendGrid signs the *raw* request body prefixed with the value of the timestamp
header, and sends the DER signature base64-encoded. The verification key is the
base64 of a DER ``SubjectPublicKeyInfo``, which is what SendGrid's settings page
shows. The signer half (``generate_keypair``, ``sign``) exists for the local
SendGrid API and the tests, so both sides run the same code path as production.
"""

from __future__ import annotations

import base64
import binascii
import time

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mailflow.errors import ConfigError, MailflowError

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
PUBLIC_KEY_SETTING = "MAILFLOW_WEBHOOK_PUBLIC_KEY"
DEFAULT_TOLERANCE_S = 300

_ALGORITHM = ec.ECDSA(hashes.SHA256())


class SignatureError(MailflowError):
    """A webhook request is unsigned, badly signed, or outside the time window."""


def _strip_pem(text: str) -> str:
    # Accept a pasted PEM block as well as the bare base64 SendGrid shows.
    lines = [ln.strip() for ln in text.strip().splitlines()]
    return "".join(ln for ln in lines if ln and not ln.startswith("-----"))


def load_public_key(b64: str) -> ec.EllipticCurvePublicKey:
    """Load the verification key from base64 DER SubjectPublicKeyInfo.

    Raises:
        ConfigError: the value is empty, not base64, not a key, or not a P-256 EC key.
    """
    fix = (
        f"set {PUBLIC_KEY_SETTING} to the 'Verification Key' shown under SendGrid "
        "Mail Settings > Signed Event Webhook (base64 DER, one line)"
    )
    if not b64 or not b64.strip():
        raise ConfigError(f"{PUBLIC_KEY_SETTING} is empty; {fix}")
    try:
        der = base64.b64decode(_strip_pem(b64), validate=True)
        key = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{PUBLIC_KEY_SETTING} is not a base64 DER public key ({exc}); {fix}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(
            f"{PUBLIC_KEY_SETTING} holds a {type(key).__name__}, not an ECDSA P-256 key; {fix}"
        )
    return key


def verify(
    public_key: ec.EllipticCurvePublicKey,
    *,
    signature_b64: str | None,
    timestamp: str | None,
    body: bytes,
    now: float | None = None,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> None:
    """Check one request's signature and timestamp; return quietly when both are good.

    The timestamp window (``tolerance_s`` either side of ``now``) limits replays of a
    captured request; duplicates inside the window are harmless (storage dedupes).

    Raises:
        SignatureError: a header is missing or malformed, the timestamp is stale or in
            the future, or the signature does not match the body.
    """
    if not signature_b64:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    if not timestamp:
        raise SignatureError(f"missing {TIMESTAMP_HEADER} header")
    ts_text = timestamp.strip()
    if not ts_text.isascii() or not ts_text.isdigit():
        raise SignatureError(f"malformed {TIMESTAMP_HEADER}: expected unix seconds")
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except binascii.Error:
        raise SignatureError(f"malformed {SIGNATURE_HEADER}: not base64") from None
    if not signature:
        raise SignatureError(f"malformed {SIGNATURE_HEADER}: empty")
    current = time.time() if now is None else now
    skew = current - int(ts_text)
    if skew > tolerance_s:
        raise SignatureError(f"stale timestamp: {int(skew)}s old, limit {tolerance_s}s")
    if skew < -tolerance_s:
        raise SignatureError(f"timestamp {int(-skew)}s in the future, limit {tolerance_s}s")
    try:
        # Sign over the header value exactly as sent, not a re-formatted number.
        public_key.verify(signature, timestamp.encode() + body, _ALGORITHM)
    except InvalidSignature:
        raise SignatureError("bad signature: it does not match the body and timestamp") from None


def generate_keypair() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key pair; the public half as base64 DER SubjectPublicKeyInfo."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_key, base64.b64encode(der).decode("ascii")


def private_key_pem(private_key: ec.EllipticCurvePrivateKey) -> str:
    """The private key as unencrypted PKCS#8 PEM (to hand to the local SendGrid API)."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def sign(private_key: ec.EllipticCurvePrivateKey, timestamp: str, body: bytes) -> str:
    """The signature header value SendGrid would send for ``timestamp`` and ``body``."""
    signature = private_key.sign(timestamp.encode() + body, _ALGORITHM)
    return base64.b64encode(signature).decode("ascii")
