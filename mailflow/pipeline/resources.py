"""The outside world the pipeline talks to, chosen in one place from the environment.

:func:`current` builds a :class:`Resources` from the process settings
(``MAILFLOW_*``): the warehouse engine (shared per URL), the renderer (shared per
templates folder) and a factory of mailers. Stages take a ``Resources`` instead of
reaching for globals, so a test or a benchmark can hand them its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy import Engine

from mailflow.mailer.base import Mailer
from mailflow.mailer.sendgrid import SendGridMailer
from mailflow.render import Renderer
from mailflow.settings import Settings, get_settings
from mailflow.triggers.base import ContextDefaults, Trigger
from mailflow.warehouse.engine import get_engine


@lru_cache(maxsize=4)
def _renderer(templates_dir: str) -> Renderer:
    return Renderer(Path(templates_dir))


@dataclass(frozen=True)
class Resources:
    """Settings, warehouse, renderer and mailer factory for one run (or one process)."""

    settings: Settings
    engine: Engine
    renderer: Renderer

    def mailer(self, *, shared: bool = False) -> Mailer:
        """A new mailer for the configured provider (the local API in demo mode).

        ``shared``: for several batches at once (:mod:`mailflow.mailer.pool`); each batch
        still has at most ``http_concurrency`` requests in flight, so its connection
        pool is not bounded again.

        Raises:
            ConfigError: no usable API key (outside demo mode).
        """
        s = self.settings
        return SendGridMailer(
            s.sendgrid_host,
            s.api_key(),
            from_email=s.from_email,
            from_name=s.from_name,
            concurrency=s.http_concurrency,
            pool_size=0 if shared else None,
            timeout_s=s.http_timeout_s,
            max_attempts=s.http_max_attempts,
            backoff_base_s=s.http_backoff_base_s,
        )

    def mailer_key(self) -> tuple[object, ...]:
        """What makes two of :meth:`mailer` interchangeable (a shared one is reused)."""
        s = self.settings
        return (
            s.sendgrid_host,
            s.api_key().get_secret_value(),
            s.from_email,
            s.from_name,
            s.http_concurrency,
            s.http_timeout_s,
            s.http_max_attempts,
            s.http_backoff_base_s,
        )

    def unsubscribe(self, trigger: Trigger) -> tuple[str, SecretStr] | None:
        """Where one-click unsubscribes go and the key signing them (marketing only)."""
        if trigger.kind != "marketing":
            return None
        return self.settings.unsubscribe_base_url, self.settings.unsubscribe_key()

    def shop(self) -> ContextDefaults:
        """Shop-wide context values every message carries."""
        s = self.settings
        return ContextDefaults(
            shop_name=s.from_name,
            shop_url=s.public_base_url.rstrip("/"),
            support_email=s.support_email,
            shop_address=s.shop_address,
        )


def from_settings(settings: Settings) -> Resources:
    """The resources ``settings`` describe (engine and renderer shared per process)."""
    return Resources(
        settings=settings,
        engine=get_engine(settings.warehouse_url),
        renderer=_renderer(str(settings.templates_dir)),
    )


def current() -> Resources:
    """The resources of this process's environment."""
    return from_settings(get_settings())
