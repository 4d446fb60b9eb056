"""The local SendGrid API: a faithful stand-in for ``POST /v3/mail/send``.

Same endpoint, bearer auth, validation against SendGrid's official OpenAPI
schema and documented limits, SendGrid's error bodies, plus latency and faults
on demand and an inspection API under ``/_sink``. Used for the demo,
development, tests and benchmarks; ``mailflow sink`` runs it.

Public API:

- ``create_app(config) -> Starlette`` and ``sink_state(app)``
- ``serve(config, host, port)`` (in ``mailflow.sink.server``)
- ``running_sink(process=False, **overrides)`` (in ``mailflow.sink.testing``)
- ``validate_mail_send(payload) -> list[dict]``
"""

from mailflow.sink.app import SinkState, create_app, sink_state
from mailflow.sink.config import FaultSettings, ScriptStep, SinkConfig
from mailflow.sink.store import MessageRecord, MessageStore, Recipient
from mailflow.sink.validation import validate_mail_send

__all__ = [
    "FaultSettings",
    "MessageRecord",
    "MessageStore",
    "Recipient",
    "ScriptStep",
    "SinkConfig",
    "SinkState",
    "create_app",
    "sink_state",
    "validate_mail_send",
]
