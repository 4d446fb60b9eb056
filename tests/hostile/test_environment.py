"""Hostile or mistaken ``MAILFLOW_*`` settings, through the real CLI: exit 1 with a message
naming the variable, never a traceback, never a secret's value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile.cli import run_cli, squeeze
from tests.hostile.conftest import Corpus

OK = "ok"
LIST = ["suppress", "list"]
WEBHOOK = ["webhook", "--port", "1"]  # refused before it would listen

# (case, environment, command, OK or the variable the message must name, text never shown)
CASES: list[tuple[str, dict[str, str], list[str], str, str | None]] = [
    (
        "unknown dialect",
        {"MAILFLOW_WAREHOUSE_URL": "nonsense://"},
        LIST,
        "MAILFLOW_WAREHOUSE_URL",
        None,
    ),
    (
        "not a URL",
        {"MAILFLOW_WAREHOUSE_URL": "warehouse please"},
        LIST,
        "MAILFLOW_WAREHOUSE_URL",
        None,
    ),
    (
        "missing folder",
        {"MAILFLOW_WAREHOUSE_URL": "sqlite:////nonexistent-mf/w.db"},
        LIST,
        "MAILFLOW_WAREHOUSE_URL",
        None,
    ),
    (
        "unreachable server",
        {"MAILFLOW_WAREHOUSE_URL": "postgresql+psycopg://mf:hunter2secret@127.0.0.1:1/mf"},
        LIST,
        "MAILFLOW_WAREHOUSE_URL",
        "hunter2secret",
    ),
    ("concurrency 0", {"MAILFLOW_HTTP_CONCURRENCY": "0"}, LIST, "MAILFLOW_HTTP_CONCURRENCY", None),
    (
        "concurrency text",
        {"MAILFLOW_HTTP_CONCURRENCY": "lots"},
        LIST,
        "MAILFLOW_HTTP_CONCURRENCY",
        None,
    ),
    (
        "tolerance negative",
        {"MAILFLOW_WEBHOOK_TOLERANCE_S": "-5"},
        LIST,
        "MAILFLOW_WEBHOOK_TOLERANCE_S",
        None,
    ),
    (
        "bounce rate nan",
        {"MAILFLOW_GUARDRAIL_MAX_BOUNCE_RATE": "nan"},
        LIST,
        "MAILFLOW_GUARDRAIL_MAX_BOUNCE_RATE",
        None,
    ),
    ("demo maybe", {"MAILFLOW_DEMO": "maybe"}, LIST, "MAILFLOW_DEMO", None),
    ("runner unknown", {"MAILFLOW_TASK_RUNNER": "spark"}, LIST, "MAILFLOW_TASK_RUNNER", None),
    (
        "delays not JSON",
        {"MAILFLOW_SEND_TASK_RETRY_DELAYS_S": "[2, 10"},
        LIST,
        "MAILFLOW_SEND_TASK_RETRY_DELAYS_S",
        None,
    ),
    (
        "header injection in unsubscribe URL",
        {"MAILFLOW_UNSUBSCRIBE_BASE_URL": "https://x.example/\r\nBcc: victim@example.com"},
        LIST,
        "MAILFLOW_UNSUBSCRIBE_BASE_URL",
        None,
    ),
    (
        "javascript unsubscribe URL",
        {"MAILFLOW_UNSUBSCRIBE_BASE_URL": "javascript:alert(1)"},
        LIST,
        "MAILFLOW_UNSUBSCRIBE_BASE_URL",
        None,
    ),
    (
        "shop URL without scheme",
        {"MAILFLOW_PUBLIC_BASE_URL": "shop.example.com"},
        LIST,
        "MAILFLOW_PUBLIC_BASE_URL",
        None,
    ),
    (
        "API host without host",
        {"MAILFLOW_SENDGRID_HOST": "https://"},
        LIST,
        "MAILFLOW_SENDGRID_HOST",
        None,
    ),
    ("sender not an address", {"MAILFLOW_FROM_EMAIL": "shop"}, LIST, "MAILFLOW_FROM_EMAIL", None),
    (
        "sender with a line break",
        {"MAILFLOW_FROM_EMAIL": "shop@example.com\r\nBcc: v@example.com"},
        LIST,
        "MAILFLOW_FROM_EMAIL",
        None,
    ),
    (
        "placeholder unsubscribe secret",
        {"MAILFLOW_UNSUBSCRIBE_SECRET": "changeme"},
        WEBHOOK,
        "MAILFLOW_UNSUBSCRIBE_SECRET",
        "changeme",
    ),
    (
        "webhook key garbage",
        {"MAILFLOW_DEMO": "true", "MAILFLOW_WEBHOOK_PUBLIC_KEY": "not-a-key"},
        WEBHOOK,
        "MAILFLOW_WEBHOOK_PUBLIC_KEY",
        None,
    ),
    (
        "webhook key missing",
        {"MAILFLOW_DEMO": "true"},
        WEBHOOK,
        "MAILFLOW_WEBHOOK_PUBLIC_KEY",
        None,
    ),
    ("spaces around a number", {"MAILFLOW_HTTP_CONCURRENCY": " 5 "}, LIST, OK, None),
    (
        "trailing slash on URLs",
        {"MAILFLOW_UNSUBSCRIBE_BASE_URL": "https://mail.example.com/"},
        LIST,
        OK,
        None,
    ),
]


@pytest.mark.category("environment settings")
def test_hostile_environment_settings(
    warehouse_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    corpus: Corpus,
) -> None:
    for key in [k for k in os.environ if k.startswith("MAILFLOW_")]:
        monkeypatch.delenv(key)
    for name, environment, command, want, secret in CASES:
        with monkeypatch.context() as m:
            m.setenv("MAILFLOW_WAREHOUSE_URL", warehouse_url)
            for key, value in environment.items():
                m.setenv(key, value)
            code, output = run_cli(command, m, capsys)
        problems = []
        if "Traceback" in output:
            problems.append("a traceback reached the user: " + output[-300:])
        elif want == OK:
            if code != 0:
                problems.append(f"exit {code}: {output[-300:]}")
        else:
            if code != 1:
                problems.append(f"exit {code}, expected 1")
            if want not in squeeze(output):
                problems.append(f"the message does not name {want}: {output[-300:]}")
        if secret is not None and secret in output:
            problems.append("a secret was shown")
        corpus.check(name, problems)
    corpus.done()


@pytest.mark.category("environment settings")
def test_a_bad_setting_in_a_real_process_is_one_message(tmp_path: Path, corpus: Corpus) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MAILFLOW_")}
    environment["MAILFLOW_HTTP_CONCURRENCY"] = "0"
    mailflow = Path(sys.executable).with_name("mailflow")
    done = subprocess.run(
        [str(mailflow), *LIST],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    problems = [] if done.returncode == 1 else [f"exit {done.returncode}"]
    if "Traceback" in output or "MAILFLOW_HTTP_CONCURRENCY" not in squeeze(output):
        problems.append(output[-400:])
    corpus.check("concurrency 0 (subprocess)", problems)
    corpus.done()
