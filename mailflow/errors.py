"""The error hierarchy, in one place, so callers catch by category.

- ``TransientError``: worth retrying (429, 5xx, connection refused, a busy database).
- ``PermanentMessageError``: one message cannot go (400, a render error); record it, go on.
- ``FatalRunError``: the whole run must stop now (401/403, a misconfigured key).
- ``ConfigError``: a setting is missing or wrong; raised before anything is sent.
- ``DataQualityError``: the validation gate failed (too many bad rows).

Every message names the field or value, what is wrong with it, and the fix.
"""

from __future__ import annotations

from typing import Any


class MailflowError(Exception):
    """Base class of every error mailflow raises on purpose."""


class ConfigError(MailflowError):
    """A setting is missing or invalid; names the setting and how to fix it."""


class TransientError(MailflowError):
    """A failure that may succeed when retried later."""


class PermanentMessageError(MailflowError):
    """One message cannot be sent as it is; record it and continue with the rest."""


class FatalRunError(MailflowError):
    """The run must stop at once (for example, the API key is refused).

    ``settled`` holds what a mailer had already settled when it stopped (results of
    messages answered before the refusal), so the caller can record them.
    """

    def __init__(self, message: str, settled: list[Any] | None = None) -> None:
        super().__init__(message)
        self.settled: list[Any] = list(settled or [])


class DataQualityError(MailflowError):
    """The validation gate failed: the share of bad rows is above the threshold."""


class TemplateError(PermanentMessageError):
    """A template is missing, broken, or refers to a field the row does not have."""
