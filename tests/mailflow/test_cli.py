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


def test_webhook_command_serves_and_stores_signed_events(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import orjson

    from mailflow.health import wait_healthy
    from mailflow.warehouse.schema import events
    from mailflow.webhook.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, generate_keypair, sign

    url = f"sqlite:///{tmp_path / 'w.db'}"
    private_key, public_b64 = generate_keypair()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Production mode: the service needs its own unsubscribe signing key.
    env = {
        **os.environ,
        "MAILFLOW_DEMO": "false",
        "MAILFLOW_WEBHOOK_PUBLIC_KEY": public_b64,
        "MAILFLOW_UNSUBSCRIBE_SECRET": "test-only-unsubscribe-secret-0123456789",
    }
    log = tmp_path / "webhook.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailflow.cli", "webhook", "--port", str(port)]
            + ["--warehouse", url],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, trust_env=False) as client:
            try:
                wait_healthy(
                    client, what="mailflow webhook", alive=lambda: proc.poll() is None, timeout=60
                )
            except Exception as exc:
                raise AssertionError(f"{exc}\n--- its output ---\n{log.read_text()}") from exc
        body = orjson.dumps(
            [
                {
                    "email": "a@example.com",
                    "event": "delivered",
                    "timestamp": int(time.time()),
                    "sg_event_id": "ev-1",
                    "sg_message_id": "m-1",
                    "ledger_id": "7",
                }
            ]
        )
        ts = str(int(time.time()))
        headers = {SIGNATURE_HEADER: sign(private_key, ts, body), TIMESTAMP_HEADER: ts}
        ok = httpx.post(f"{base}/webhooks/sendgrid/events", content=body, headers=headers)
        assert ok.status_code == 200 and ok.json()["stored"] == 1
        forged = httpx.post(
            f"{base}/webhooks/sendgrid/events", content=body + b" ", headers=headers
        )
        assert forged.status_code == 403
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = list(conn.execute(select(events.c.event, events.c.ledger_id)))
    engine.dispose()
    assert rows == [("delivered", 7)]
