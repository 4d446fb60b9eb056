"""The ``mailflow`` command on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from typer.testing import CliRunner

from mailflow.cli import app
from mailflow.warehouse.engine import make_engine
from mailflow.warehouse.migrate import current
from mailflow.warehouse.schema import customers


def test_db_upgrade_then_seed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    runner = CliRunner()
    result = runner.invoke(app, ["db", "upgrade", "--warehouse", url])
    assert result.exit_code == 0, result.output
    assert current(url) is not None and current(url) in result.output

    result = runner.invoke(app, ["seed", "--customers", "300", "--warehouse", url])
    assert result.exit_code == 0, result.output
    assert "seeded 300 customers" in result.output
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(customers)).scalar() == 300
    engine.dispose()


def test_unknown_seed_profile_is_refused_with_the_choices(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    result = CliRunner().invoke(app, ["seed", "--profile", "huge", "--warehouse", url])
    assert result.exit_code != 0
    assert "default, bench" in result.output
