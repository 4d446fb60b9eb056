"""The suppression-sync flow under Prefect's test harness, against the local SendGrid API
and both warehouses; and ``mailflow run suppressions``."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from flows.suppression_sync import suppression_sync
from mailflow import suppressions as manual
from mailflow.cli import app
from mailflow.sink.testing import SinkHandle
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import suppressions

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_the_flow_pulls_pages_and_pushes_once(env: pytest.MonkeyPatch, sink: SinkHandle) -> None:
    sink.seed_suppressions(
        bounces=[{"email": f"b{i}@example.com", "created": 1_700_000_000 + i} for i in range(25)],
        spam_reports=["spam-old@example.com"],
    )
    with get_engine().begin() as conn:
        manual.add(conn, [("t", "asked@example.com", "manual")], source="cli")

    first = suppression_sync(page_size=10)
    assert first["pulled"]["bounces"]["pages"] == 3
    assert first["pulled"]["bounces"]["added"] == 25
    assert first["pulled"]["spam_reports"]["added"] == 1
    assert first["pushed"] == 1
    assert "asked@example.com" in {
        u["email"]
        for u in sink.client.get(
            "/v3/suppression/unsubscribes", headers={"Authorization": f"Bearer {sink.api_key}"}
        ).json()
    }

    second = suppression_sync(page_size=10)
    assert (second["added"], second["pushed"]) == (0, 0)
    with get_engine().connect() as conn:
        assert conn.execute(select(func.count()).select_from(suppressions)).scalar_one() == 27


def test_mailflow_run_suppressions(env: pytest.MonkeyPatch, sink: SinkHandle) -> None:
    sink.seed_suppressions(invalid_emails=["bad@example.com"])
    result = CliRunner().invoke(app, ["run", "suppressions"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # the console wraps long lines
    assert "invalid_emails 1" in output
    assert "0 local unsubscribes pushed" in output
