"""Fixtures that build real things: a migrated warehouse on SQLite and on PostgreSQL,
a running local SendGrid API, and Prefect's test harness (a temporary Prefect server)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import warnings  # noqa: E402

from sqlalchemy import Engine  # noqa: E402
from starlette.exceptions import StarletteDeprecationWarning  # noqa: E402

# Starlette's TestClient announces httpx as deprecated (in favour of httpx2) once, at
# import; the lock pins httpx. Import it here first so that notice, and only it, is
# silenced for every test module; everything else stays an error.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    import starlette.testclient  # noqa: E402, F401

from mailflow.settings import get_settings  # noqa: E402
from mailflow.warehouse.engine import dispose_engines, make_engine  # noqa: E402
from mailflow.warehouse.migrate import upgrade  # noqa: E402
from tests.pgserver import (  # noqa: E402
    DatabaseFactory,
    PostgresUnavailable,
    postgres_admin_url,
    postgres_required,
)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[DatabaseFactory]:
    """Fresh migrated PostgreSQL databases, on a throwaway server started for the session.

    ``MAILFLOW_TEST_POSTGRES_URL`` points at an existing server instead. Without either,
    PostgreSQL tests are skipped, or fail when ``MAILFLOW_REQUIRE_POSTGRES=1`` (CI).
    """
    with contextlib.ExitStack() as stack:
        try:
            admin_url = stack.enter_context(postgres_admin_url())
            factory = DatabaseFactory(admin_url, upgrade)
        except PostgresUnavailable as exc:
            if postgres_required():
                pytest.fail(
                    f"PostgreSQL is required (MAILFLOW_REQUIRE_POSTGRES=1): {exc}", pytrace=False
                )
            pytest.skip(f"no PostgreSQL: {exc}")
        stack.callback(factory.close)
        yield factory


@pytest.fixture(params=["sqlite", "postgresql"])
def warehouse_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a freshly migrated warehouse, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'warehouse.db'}"
        upgrade(url)
        yield url
        dispose_engines()
        return
    databases: DatabaseFactory = request.getfixturevalue("postgres_databases")
    url = databases.create()
    try:
        yield url
    finally:
        # Pooled connections first, so the drop rarely has anyone to force out.
        dispose_engines()
        databases.drop(url)


@pytest.fixture
def engine(warehouse_url: str) -> Iterator[Engine]:
    """An engine of its own on ``warehouse_url``, disposed afterwards."""
    eng = make_engine(warehouse_url)
    yield eng
    eng.dispose()


@pytest.fixture
def sink() -> Iterator[object]:
    """The local SendGrid API, running on a free port in this process."""
    from mailflow.sink.testing import running_sink

    with running_sink() as handle:
        yield handle


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, warehouse_url: str, sink: object
) -> Iterator[pytest.MonkeyPatch]:
    """Settings pointing at the test warehouse and the local API, with fast retries."""
    monkeypatch.setenv("MAILFLOW_DEMO", "true")
    monkeypatch.setenv("MAILFLOW_WAREHOUSE_URL", warehouse_url)
    monkeypatch.setenv("MAILFLOW_SENDGRID_HOST", sink.url)  # type: ignore[attr-defined]
    monkeypatch.setenv("MAILFLOW_HTTP_BACKOFF_BASE_S", "0.01")
    monkeypatch.setenv("MAILFLOW_SEND_TASK_RETRY_DELAYS_S", "[0, 0, 0]")
    monkeypatch.setenv("MAILFLOW_HTTP_TIMEOUT_S", "5")
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()
    dispose_engines()
