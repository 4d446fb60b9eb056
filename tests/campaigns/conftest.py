"""Campaign tests write previews under the test's tmp folder and poll approvals quickly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailflow.settings import get_settings


@pytest.fixture(autouse=True)
def _campaign_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("MAILFLOW_CAMPAIGN_PREVIEW_DIR", str(tmp_path / "previews"))
    monkeypatch.setenv("MAILFLOW_CAMPAIGN_APPROVAL_POLL_S", "1")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
