"""Run the real ``mailflow`` entry point (``mailflow.cli.main``) in this process, as a
shell would, and capture what the user sees."""

from __future__ import annotations

import traceback

import pytest

from mailflow.cli import main
from mailflow.settings import get_settings
from mailflow.warehouse.engine import dispose_engines


def run_cli(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """``mailflow ARGS`` with the environment ``monkeypatch`` set: (exit code, output).

    An exception that escapes ``main`` is what a user would see as a traceback; it is
    returned as output starting with "Traceback" and exit code 1.
    """
    monkeypatch.setattr("sys.argv", ["mailflow", *args])
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:  # noqa: BLE001 - the point: nothing may escape to the user
        return 1, "Traceback (escaped main)\n" + traceback.format_exc()
    finally:
        get_settings.cache_clear()
        dispose_engines()
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def squeeze(text: str) -> str:
    """``text`` without whitespace: the terminal wraps long messages at any space."""
    return "".join(text.split())
