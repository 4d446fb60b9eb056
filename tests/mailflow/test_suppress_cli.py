"""``mailflow suppress``: add, list, import (with bad rows), remove, against a real warehouse."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from mailflow import cli
from mailflow.cli import app
from mailflow.errors import MailflowError
from mailflow.warehouse.engine import make_engine
from mailflow.warehouse.schema import suppressions


def stored(url: str) -> dict[str, tuple[str, str]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(suppressions)).all()
    finally:
        engine.dispose()
    return {r.email: (r.reason, r.source) for r in rows}


@pytest.fixture
def run(warehouse_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cli.console, "width", 200)

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, [*args, "--warehouse", warehouse_url])
        if isinstance(result.exception, MailflowError):
            # What `mailflow` (cli.main) prints for it, with exit status 1.
            return 1, f"error: {result.exception}"
        return result.exit_code, result.output

    return invoke


def test_add_list_remove(run, warehouse_url: str) -> None:
    code, out = run("suppress", "add", " Ann@Example.COM ", "bob@example.com", "--reason", "phone")
    assert code == 0 and "2 suppressed, 0 already suppressed" in out
    code, out = run("suppress", "add", "ann@example.com")
    assert code == 0 and "0 suppressed, 1 already suppressed" in out
    assert stored(warehouse_url) == {
        "ann@example.com": ("phone", "cli"),
        "bob@example.com": ("phone", "cli"),
    }

    code, out = run("suppress", "list", "--contains", "ANN")
    assert code == 0 and "1 suppressions" in out and "ann@example.com" in out
    assert "bob@example.com" not in out

    code, out = run("suppress", "remove", "ANN@example.com", "nobody@example.com")
    assert code == 0 and "1 of 2 addresses lifted" in out
    assert set(stored(warehouse_url)) == {"bob@example.com"}


def test_a_malformed_address_is_refused_with_the_problem(run, warehouse_url: str) -> None:
    code, out = run("suppress", "add", "ok@example.com", "not-an-address")
    assert code == 1
    assert "argument 2: 'not-an-address' is not an address (no '@')" in out
    assert set(stored(warehouse_url)) == {"ok@example.com"}


def test_import_keeps_good_rows_reports_bad_ones_and_is_idempotent(
    run, warehouse_url: str, tmp_path: Path
) -> None:
    csv = tmp_path / "old-provider.csv"
    csv.write_text(
        "Email Address,Type,Created\n"  # header names vary between providers
        "a@example.com,bounce,2025-01-02\n"
        "b@example.com,,2025-01-03\n"
        "c@@example.com,spam,2025-01-04\n"
        "d@example.com,spamreport,2025-01-05\n",
        encoding="utf-8",
    )
    # "Email Address" is not one of the known headers on its own: say which are.
    code, out = run("suppress", "import", str(csv))
    assert code == 1 and "no address column" in out and "email_address" in out

    csv.write_text(csv.read_text().replace("Email Address", "email_address"))
    code, out = run("suppress", "import", str(csv), "--reason", "previous_provider")
    assert code == 0, out
    assert "3 suppressed" in out
    assert "old-provider.csv:4: 'c@@example.com' is not an address (more than one '@')" in out
    assert stored(warehouse_url) == {
        "a@example.com": ("bounce", "import:old-provider.csv"),
        "b@example.com": ("previous_provider", "import:old-provider.csv"),
        "d@example.com": ("spamreport", "import:old-provider.csv"),
    }
    code, out = run("suppress", "import", str(csv))
    assert code == 0 and "0 suppressed, 3 already suppressed" in out
