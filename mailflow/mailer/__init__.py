"""The mailer: a small interface and its SendGrid implementation."""

from mailflow.mailer.base import Mailer, OutboundMessage, Outcome, SendResult

__all__ = ["Mailer", "OutboundMessage", "Outcome", "SendResult"]
