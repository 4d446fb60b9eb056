"""SendGrid Signed Event Webhook ingest: signature check, storage, suppressions."""

from __future__ import annotations

from mailflow.webhook.app import EVENTS_PATH, create_app
from mailflow.webhook.ingest import IngestResult, store_events
from mailflow.webhook.signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    generate_keypair,
    load_public_key,
    sign,
    verify,
)

__all__ = [
    "EVENTS_PATH",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "IngestResult",
    "SignatureError",
    "create_app",
    "generate_keypair",
    "load_public_key",
    "sign",
    "store_events",
    "verify",
]
