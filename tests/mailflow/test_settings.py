"""Settings fail fast on missing or placeholder secrets and never show them."""

from __future__ import annotations

import pytest

from mailflow.errors import ConfigError
from mailflow.settings import DEMO_API_KEY, Settings


def test_demo_mode_uses_the_local_demo_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILFLOW_SENDGRID_API_KEY", raising=False)
    assert Settings(demo=True).api_key().get_secret_value() == DEMO_API_KEY


def test_production_without_a_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILFLOW_SENDGRID_API_KEY", raising=False)
    monkeypatch.delenv("MAILFLOW_SENDGRID_API_KEY_BLOCK", raising=False)
    with pytest.raises(ConfigError, match="MAILFLOW_SENDGRID_API_KEY"):
        Settings(demo=False).api_key()


@pytest.mark.parametrize("placeholder", ["", "  ", "changeme", "SG.xxx"])
def test_placeholder_keys_are_refused(placeholder: str) -> None:
    with pytest.raises(ConfigError, match="placeholder"):
        Settings(demo=False, sendgrid_api_key=placeholder).api_key()


def test_the_key_never_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILFLOW_SENDGRID_API_KEY", "SG.very-secret")
    settings = Settings(demo=False)
    assert settings.api_key().get_secret_value() == "SG.very-secret"
    assert "SG.very-secret" not in repr(settings) and "SG.very-secret" not in str(settings)


@pytest.mark.usefixtures("prefect_harness")
def test_key_from_a_prefect_secret_block_in_sync_and_async_code() -> None:
    import asyncio

    from prefect.blocks.system import Secret

    Secret(value="SG.from-a-block").save("mailflow-test-sendgrid-key", overwrite=True)
    settings = Settings(demo=False, sendgrid_api_key_block="mailflow-test-sendgrid-key")
    assert settings.api_key().get_secret_value() == "SG.from-a-block"

    async def from_async_code() -> str:  # e.g. the send task
        return settings.api_key().get_secret_value()

    assert asyncio.run(from_async_code()) == "SG.from-a-block"


@pytest.mark.usefixtures("prefect_harness")
def test_a_missing_secret_block_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="MAILFLOW_SENDGRID_API_KEY_BLOCK"):
        Settings(demo=False, sendgrid_api_key_block="no-such-block").api_key()


def test_a_process_is_not_in_demo_mode_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Production by default: no demo key, no public demo signing secret.
    monkeypatch.delenv("MAILFLOW_DEMO", raising=False)
    monkeypatch.delenv("MAILFLOW_SENDGRID_API_KEY", raising=False)
    monkeypatch.delenv("MAILFLOW_SENDGRID_API_KEY_BLOCK", raising=False)
    monkeypatch.delenv("MAILFLOW_UNSUBSCRIBE_SECRET", raising=False)
    settings = Settings()
    assert settings.demo is False
    with pytest.raises(ConfigError, match="MAILFLOW_SENDGRID_API_KEY"):
        settings.api_key()
    with pytest.raises(ConfigError, match="MAILFLOW_UNSUBSCRIBE_SECRET"):
        settings.unsubscribe_key()
