"""Operator mistakes in the warehouse URL get a message that names the setting and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from mailflow.errors import ConfigError
from mailflow.pipeline import preflight, resources
from mailflow.settings import get_settings
from mailflow.warehouse.engine import make_engine

ROOT = Path(__file__).resolve().parents[2]


def res_for(url: str) -> resources.Resources:
    settings = get_settings().model_copy(update={"warehouse_url": url})
    return resources.Resources(
        settings=settings, engine=make_engine(url), renderer=resources.current().renderer
    )


def test_an_unparsable_url_names_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"MAILFLOW_WAREHOUSE_URL is not a database URL"):
        make_engine("warehouse.db")


def test_a_sqlite_file_in_a_missing_folder_is_refused_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "warehouse.db"
    with pytest.raises(ConfigError, match=r"folder that does not exist .*typo"):
        make_engine(f"sqlite:///{missing}")
    assert not missing.parent.exists()


def test_an_unmigrated_warehouse_says_to_run_db_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    with pytest.raises(ConfigError, match=r"no mailflow tables: run `mailflow db upgrade`"):
        preflight.check_warehouse(res_for(url))


def test_an_unreachable_server_is_named_without_its_password() -> None:
    url = "postgresql+psycopg://mailflow:s3cret-pw@127.0.0.1:1/warehouse?connect_timeout=2"
    with pytest.raises(ConfigError) as err:
        preflight.check_warehouse(res_for(url))
    message = str(err.value)
    assert "cannot be reached" in message and "MAILFLOW_WAREHOUSE_URL" in message
    assert "127.0.0.1:1" in message and "s3cret-pw" not in message


def test_a_migrated_warehouse_passes(warehouse_url: str) -> None:
    from mailflow.warehouse.migrate import upgrade

    upgrade(warehouse_url)
    preflight.check_warehouse(res_for(warehouse_url))
    create_engine(warehouse_url).dispose()


def test_the_cli_prints_the_message_not_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "w.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailflow.cli",
            "db",
            "upgrade",
            "--warehouse",
            f"sqlite:///{missing}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    said = " ".join((done.stdout + done.stderr).split())  # the console wraps long lines
    assert (
        "error: MAILFLOW_WAREHOUSE_URL names a SQLite file in a folder that does not exist" in said
    )
    assert "Traceback" not in said
    assert not missing.parent.exists()
