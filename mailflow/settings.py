"""One settings object for the whole project (environment prefix ``MAILFLOW_``).

Secrets are ``SecretStr`` so they never print. Outside demo mode a missing or
placeholder secret fails fast with a message that names the variable to set.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from mailflow.addresses import email_problem, is_address
from mailflow.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"
TEMPLATES_DIR = PROJECT_ROOT / "templates"

#: The key the local SendGrid API accepts by default. It is a demo value, not a
#: secret: it only ever opens the local stand-in, never the real service.
DEMO_API_KEY = "SG.local-demo-key"

#: Signs unsubscribe links in demo mode only; production requires its own secret.
DEMO_UNSUBSCRIBE_SECRET = "local-demo-unsubscribe-secret"

_UNSAFE_IN_URL = re.compile(r"[\x00-\x20\x7f-\x9f]")
_PLACEHOLDERS = {"", "changeme", "change-me", "your-api-key", "SG.xxx", "xxx"}


class Settings(BaseSettings):
    """Runtime configuration, read from ``MAILFLOW_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="MAILFLOW_", extra="ignore")

    demo: bool = Field(
        default=False,
        description="Demo mode: the local SendGrid API's demo key and a public demo signing "
        "secret stand in for missing secrets. Only `mailflow demo`, the tests and the "
        "benchmarks turn it on (MAILFLOW_DEMO=true); a production process never has it.",
    )
    warehouse_url: str = Field(
        default=f"sqlite:///{DATA_DIR / 'warehouse.db'}",
        description="SQLAlchemy URL of the warehouse.",
    )
    sendgrid_host: str = Field(
        default="http://127.0.0.1:3030",
        description="Base URL of the SendGrid API (https://api.sendgrid.com in production).",
    )
    sendgrid_api_key: SecretStr | None = Field(
        default=None, description="SendGrid API key (or a Prefect Secret block, see below)."
    )
    sendgrid_api_key_block: str | None = Field(
        default=None, description="Name of a Prefect Secret block holding the SendGrid API key."
    )
    from_email: str = "shop@example.com"
    from_name: str = "Example Shop"
    support_email: str = "help@example.com"
    shop_address: str = Field(
        default="1 Example Street, Springfield",
        description="Postal address shown in every footer (required for marketing email).",
    )
    public_base_url: str = Field(
        default="https://shop.example.com",
        description="Base URL of the shop, used for links back to carts.",
    )
    webhook_public_key: str | None = Field(
        default=None,
        description="SendGrid's Event Webhook verification key (base64 DER, from its settings).",
    )
    webhook_verify: bool = Field(
        default=True,
        description="Verify event signatures. Turning this off is for local development only.",
    )
    webhook_tolerance_s: int = Field(
        default=300,
        ge=1,
        le=10 * 365 * 86400,
        description="How far (seconds) a signed event's timestamp may be from the clock "
        "before the request is refused as a replay. Keep the default in production; a large "
        "value only serves to check recorded requests (e.g. SendGrid's published test vector).",
    )
    unsubscribe_base_url: str = Field(
        default="http://127.0.0.1:8040",
        description="Public base URL of `mailflow webhook`, where one-click unsubscribes land.",
    )
    unsubscribe_secret: SecretStr | None = Field(
        default=None, description="HMAC key signing unsubscribe tokens (32+ random bytes)."
    )
    guardrail_window_days: float = Field(default=7.0, gt=0, le=90)
    guardrail_max_bounce_rate: float = Field(default=0.04, ge=0, le=1)
    guardrail_max_complaint_rate: float = Field(
        default=0.003, ge=0, le=1, description="Mailbox providers want complaints below 0.3 %."
    )
    guardrail_min_sent: int = Field(
        default=1000, ge=0, description="Below this many recent sends the rates are not judged."
    )
    templates_dir: Path = TEMPLATES_DIR
    http_timeout_s: float = Field(default=15.0, gt=0, le=300)
    http_concurrency: int = Field(
        default=100, ge=1, le=1000, description="Requests in flight per send batch."
    )
    http_max_attempts: int = Field(
        default=4, ge=1, le=20, description="Tries per message inside a batch (429/5xx)."
    )
    http_backoff_base_s: float = Field(default=0.25, ge=0, le=60)
    send_task_retries: int = Field(
        default=3, ge=0, le=20, description="Prefect retries of a batch with pending messages."
    )
    send_task_retry_delays_s: list[float] = Field(
        default=[2.0, 10.0, 30.0], description="Delay before each batch retry (seconds)."
    )
    # --- resolving ambiguous sends (mailflow/ledger.py, mailflow/pipeline/reconcile.py) ---
    event_webhook: bool = Field(
        default=False,
        description="SendGrid's Event Webhook posts to mailflow's webhook service (`mailflow "
        "webhook`). Only then is an ambiguous send that no event confirms within "
        "MAILFLOW_RECONCILE_GRACE_S sent again; without it such a send stays `unknown`.",
    )
    reconcile_grace_s: float = Field(
        default=1800,
        ge=0,
        le=7 * 86400,
        description="How long after its last attempt an ambiguous send waits for a provider "
        "event before it counts as never accepted (SendGrid posts `processed` within seconds).",
    )
    claim_lease_s: float = Field(
        default=1800,
        gt=0,
        le=86400,
        description="How long a claimed row may stay `sending` before a later run treats the "
        "run that claimed it as gone (a crash).",
    )
    settle_every: int = Field(
        default=25,
        ge=1,
        le=1000,
        description="Provider answers written to the ledger per group while a batch is "
        "sending, so a crash leaves only the requests in flight ambiguous.",
    )
    run_max_failure_share: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Error budget of one run: once more than this share of its answered "
        "messages were refused for good (4xx) or bounced, the run stops sending and the "
        "rest stays planned.",
    )
    run_failure_min: int = Field(
        default=50,
        ge=1,
        description="The fewest answered messages of a run the error budget judges.",
    )
    # --- campaigns (mailflow/campaigns) and the frequency cap (mailflow/extract.py) ---
    frequency_cap: int = Field(
        default=3,
        ge=0,
        le=100,
        description="At most this many marketing messages per customer per rolling 7 days, "
        "across every flow (0 = no cap). Transactional messages are never capped.",
    )
    campaign_preview_dir: Path = Field(
        default=DATA_DIR / "previews",
        description="Where campaign previews write their sample messages (HTML and text).",
    )
    campaign_approval_poll_s: int = Field(
        default=10, ge=1, le=300, description="How often a paused campaign checks for approval."
    )
    # --- where send batches run (mailflow/runners.py) ---
    task_runner: Literal["thread", "dask"] = Field(
        default="thread",
        description="Where a sending flow runs its render/send batches: 'thread' (threads "
        "of the flow's process) or 'dask' (a Dask cluster, see MAILFLOW_DASK_ADDRESS).",
    )
    task_threads: int = Field(
        default=4, ge=1, le=64, description="Batches in flight at once with the thread runner."
    )
    dask_address: str | None = Field(
        default=None,
        description="Scheduler of an existing Dask cluster (tcp://host:8786). Unset: each "
        "flow run starts a local cluster of MAILFLOW_DASK_WORKERS processes.",
    )
    dask_workers: int = Field(
        default=2, ge=1, le=256, description="Worker processes of the local Dask cluster."
    )
    dask_threads_per_worker: int = Field(
        default=2, ge=1, le=64, description="Batches in flight per local Dask worker process."
    )

    @field_validator("sendgrid_host", "public_base_url", "unsubscribe_base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        # These end up in requests and in message headers (List-Unsubscribe): a control
        # character or space there would be a header injection, not a URL.
        parts = urlsplit(v.strip())
        if _UNSAFE_IN_URL.search(v.strip()) or parts.scheme not in ("http", "https"):
            raise ValueError(
                "must be an http:// or https:// URL without spaces or control "
                "characters, e.g. https://mail.example.com"
            )
        if not parts.hostname:
            raise ValueError("the URL has no host name; e.g. https://mail.example.com")
        return v.strip().rstrip("/")

    @field_validator("from_email", "support_email")
    @classmethod
    def _address(cls, v: str) -> str:
        if not is_address(v.strip()):
            raise ValueError(f"not a well-formed address ({email_problem(v.strip())})")
        return v.strip()

    def api_key(self) -> SecretStr:
        """The SendGrid API key: env var, then Prefect Secret block, then the demo key.

        Raises:
            ConfigError: no usable key outside demo mode.
        """
        if self.sendgrid_api_key is not None:
            key = self.sendgrid_api_key.get_secret_value().strip()
            if key in _PLACEHOLDERS:
                raise ConfigError(
                    "MAILFLOW_SENDGRID_API_KEY is empty or a placeholder; "
                    "set it to a real SendGrid API key (it starts with 'SG.')."
                )
            return SecretStr(key)
        if self.sendgrid_api_key_block:
            from prefect.blocks.system import Secret

            try:
                # _sync: also called from async tasks, where load() would return a coroutine.
                block = Secret.load(self.sendgrid_api_key_block, _sync=True)  # type: ignore[call-arg]
                value = block.get()  # type: ignore[union-attr]
            except ValueError as exc:
                raise ConfigError(
                    f"Prefect Secret block {self.sendgrid_api_key_block!r} could not be loaded; "
                    "create it in the Prefect UI (Blocks → Secret) or unset "
                    "MAILFLOW_SENDGRID_API_KEY_BLOCK."
                ) from exc
            return SecretStr(str(value))
        if self.demo:
            return SecretStr(DEMO_API_KEY)
        raise ConfigError(
            "No SendGrid API key: set MAILFLOW_SENDGRID_API_KEY, or "
            "MAILFLOW_SENDGRID_API_KEY_BLOCK to the name of a Prefect Secret block."
        )

    def unsubscribe_key(self) -> SecretStr:
        """The key that signs unsubscribe tokens.

        Raises:
            ConfigError: missing or too short outside demo mode.
        """
        if self.unsubscribe_secret is not None:
            key = self.unsubscribe_secret.get_secret_value().strip()
            if len(key) < 16 or key in _PLACEHOLDERS:
                raise ConfigError(
                    "MAILFLOW_UNSUBSCRIBE_SECRET is too short or a placeholder; set it to 32+ "
                    "random characters (e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`)."
                )
            return SecretStr(key)
        if self.demo:
            return SecretStr(DEMO_UNSUBSCRIBE_SECRET)
        raise ConfigError(
            "No unsubscribe signing key: set MAILFLOW_UNSUBSCRIBE_SECRET to 32+ random "
            "characters (the same value for the flows and `mailflow webhook`)."
        )


def settings_error(exc: ValidationError) -> ConfigError:
    """A pydantic error about the environment as one line per variable: its name, the
    value (never a secret's), the problem and the fix."""
    secret = {
        name
        for name, info in Settings.model_fields.items()
        if info.annotation in (SecretStr, SecretStr | None)
    }
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        variable = f"MAILFLOW_{name.upper()}"
        problem = err["msg"].removeprefix("Value error, ")
        shown = "" if name in secret else f"={str(err.get('input'))[:80]!r}"
        lines.append(f"{variable}{shown}: {problem}; fix the variable or unset it")
    return ConfigError("invalid setting: " + "\n".join(lines))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once).

    Raises:
        ConfigError: a ``MAILFLOW_*`` variable holds a value its setting refuses.
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise settings_error(exc) from None
    except SettingsError as exc:  # a list or dict setting that is not JSON
        found = re.search(r'field "(\w+)"', str(exc))
        variable = f"MAILFLOW_{found.group(1).upper()}" if found else "a MAILFLOW_ variable"
        raise ConfigError(
            f"invalid setting: {variable} is not valid JSON (e.g. [2, 10, 30]); fix the "
            "variable or unset it"
        ) from None
