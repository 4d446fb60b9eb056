"""prefect.yaml against a real Prefect server, the way the data team runs it.

`prefect server start` (own PREFECT_HOME, UI and analytics off) → the work pools
prefect.yaml names → `prefect deploy --all` from the project folder → every
deployment in prefect.yaml is checked through the API (entrypoint, pool, schedules,
concurrency, a parameter form with types and descriptions that accepts the declared
parameters) → a process worker runs the abandoned-cart deployment against a seeded
SQLite warehouse and the local SendGrid API, with the key in a Prefect Secret block;
once with the batches in the flow run's threads, once on a local Dask cluster.

The deployments are read from prefect.yaml itself, so a new entry is covered here
as soon as it is added. The server's scheduler service is off: schedules are
stored and checked, but only the run this test starts is executed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import SecretStr
from sqlalchemy import select

from mailflow.settings import Settings
from mailflow.unsubscribe import unsubscribe_url
from mailflow.warehouse.engine import get_engine
from mailflow.warehouse.schema import send_ledger
from tests.shop import Shopper, build_shop

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
# Generous: a 2-core CI box with other work on it.
SERVER_START_S = 240.0
COMMAND_S = 600.0
RUN_S = 600.0


def declared_deployments() -> list[dict[str, Any]]:
    """The deployments of prefect.yaml, aliases resolved (as `prefect deploy` reads them)."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = config.get("deployments") or []
    assert deployments, "prefect.yaml declares no deployments"
    return deployments


@dataclass
class Service:
    """A process this test started, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 8000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} log (last {chars} chars of {self.log}) ---\n{text[-chars:]}"


@contextlib.contextmanager
def service(name: str, args: list[str], env: dict[str, str], log: Path) -> Iterator[Service]:
    """Run ``args`` in its own process group for the block; stop the whole group after."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield Service(name, process, log)
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group this test started (server workers, flow-run children),
    then SIGKILL what is left of it."""
    group = process.pid  # start_new_session: the group id is the leader's pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(args: list[str], env: dict[str, str], *services: Service) -> str:
    """Run a `prefect` command to completion; a failure shows its output and the logs."""
    done = subprocess.run(
        PREFECT + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=COMMAND_S
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        logs = "\n".join(s.tail() for s in services)
        pytest.fail(f"`prefect {' '.join(args)}` exited {done.returncode}:\n{output}\n{logs}")
    return output


def wait_for_health(server: Service, api_url: str) -> None:
    deadline = time.monotonic() + SERVER_START_S
    with httpx.Client(trust_env=False, timeout=5.0) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                code = server.process.returncode
                pytest.fail(f"the Prefect server exited ({code})\n{server.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{api_url}/health").status_code == 200:
                    return
            time.sleep(0.5)
    pytest.fail(f"no answer from the Prefect server in {SERVER_START_S}s\n{server.tail()}")


def base_env(prefect_home: Path, api_url: str) -> dict[str, str]:
    """This process's environment without its Prefect and mailflow settings, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MAILFLOW_"))}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_API_URL=api_url,
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # Schedules are stored and checked, but no run is created from them here.
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        GX_ANALYTICS_ENABLED="false",
    )
    return env


def check_schedules(name: str, declared: list[dict[str, Any]], stored: list[Any]) -> None:
    assert len(stored) == len(declared), f"{name}: {len(stored)} schedules, declared {declared}"
    remaining = list(stored)
    for want in declared:
        match = None
        for got in remaining:
            s = got.schedule
            if "interval" in want:
                ok = getattr(s, "interval", None) == timedelta(seconds=float(want["interval"]))
            else:
                ok = getattr(s, "cron", None) == want["cron"]
            ok = ok and s.timezone == want.get("timezone", "UTC")
            ok = ok and got.active == want.get("active", True)
            ok = ok and (got.parameters or {}) == want.get("parameters", {})
            if ok:
                match = got
                break
        assert match is not None, f"{name}: no stored schedule matches {want}; stored: {stored}"
        remaining.remove(match)


def check_parameter_form(name: str, declared: dict[str, Any], schema: dict[str, Any]) -> None:
    from prefect.utilities.schema_tools import validate

    props = schema.get("properties") or {}
    # Every field of the run form says what it is for (a field without a JSON type,
    # e.g. a recursive filter, is shown as a JSON editor: allowed).
    for param, spec in props.items():
        assert spec.get("description"), f"{name}: parameter {param!r} has no description"
    unknown = set(declared) - set(props)
    assert not unknown, f"{name}: prefect.yaml sets parameters the flow lacks: {unknown}"
    # The same check the server makes when a run starts (enforce_parameter_schema).
    validate(declared, schema, raise_on_error=True, preprocess=True, ignore_required=True)


def check_deployment(want: dict[str, Any], got: Any) -> None:
    name = want["name"]
    assert got.entrypoint == want["entrypoint"], name
    assert got.work_pool_name == want["work_pool"]["name"], name
    assert got.work_queue_name == want["work_pool"].get("work_queue_name", "default"), name
    assert got.job_variables == want["work_pool"].get("job_variables", {}), name
    assert sorted(got.tags) == sorted(want.get("tags", [])), name
    assert got.parameters == want.get("parameters", {}), name
    assert got.enforce_parameter_schema, f"{name}: parameters are not checked against the form"
    check_schedules(name, want.get("schedules") or [], got.schedules)
    limit = want.get("concurrency_limit")
    if limit is None:
        assert got.global_concurrency_limit is None, name
    else:
        spec = limit if isinstance(limit, dict) else {"limit": limit}
        assert got.global_concurrency_limit is not None, f"{name}: no concurrency limit"
        assert got.global_concurrency_limit.limit == spec["limit"], name
        if "collision_strategy" in spec:
            assert got.concurrency_options is not None, name
            assert got.concurrency_options.collision_strategy.value == spec["collision_strategy"]
    check_parameter_form(name, want.get("parameters", {}), got.parameter_openapi_schema)


@pytest.mark.parametrize("task_runner", ["thread", "dask"])
@pytest.mark.parametrize("warehouse_url", ["sqlite"], indirect=True)
def test_deploy_all_then_a_worker_runs_abandoned_cart(
    warehouse_url: str, task_runner: str, tmp_path: Path
) -> None:
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from mailflow.sink.testing import running_sink

    deployments = declared_deployments()
    cart = next(d for d in deployments if d["name"] == "abandoned-cart")
    flow_env = cart["work_pool"].get("job_variables", {}).get("env", {})
    key_block = flow_env.get("MAILFLOW_SENDGRID_API_KEY_BLOCK")
    assert key_block, "abandoned-cart should name the Secret block holding the SendGrid key"

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    prefect_home = tmp_path / "prefect-home"
    env = base_env(prefect_home, api_url)
    # A key only the Secret block knows: the run can only send by loading it.
    api_key = f"SG.integration-{secrets.token_urlsafe(12)}"
    unsubscribe_secret = secrets.token_urlsafe(32)
    people = [Shopper(email=f"user{i}@example.com", first_name=f"User{i}") for i in range(12)]
    build_shop(get_engine(warehouse_url), people)

    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(running_sink(api_keys=(api_key,)))
        server = stack.enter_context(
            service(
                "prefect server",
                [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env,
                tmp_path / "server.log",
            )
        )
        wait_for_health(server, api_url)
        stack.enter_context(
            temporary_settings({PREFECT_API_URL: api_url, PREFECT_HOME: str(prefect_home)})
        )

        pools = sorted({d["work_pool"]["name"] for d in deployments})
        for pool in pools:
            run_cli(["work-pool", "create", pool, "--type", "process"], env, server)
        Secret(value=api_key).save(key_block)
        run_cli(["--no-prompt", "deploy", "--all"], env, server)

        client = stack.enter_context(get_client(sync_client=True))
        stored = {d.name: d for d in client.read_deployments()}
        missing = [d["name"] for d in deployments if d["name"] not in stored]
        assert not missing, f"deployments in prefect.yaml but not on the server: {missing}"
        for want in deployments:
            check_deployment(want, stored[want["name"]])

        worker_env = {
            **env,
            "MAILFLOW_PROJECT_DIR": str(ROOT),
            "MAILFLOW_WAREHOUSE_URL": warehouse_url,
            "MAILFLOW_SENDGRID_HOST": sink.url,
            "MAILFLOW_UNSUBSCRIBE_SECRET": unsubscribe_secret,
            "MAILFLOW_SEND_TASK_RETRY_DELAYS_S": "[0, 0, 0]",
            # The worker's environment picks where the batches run (mailflow/runners.py).
            "MAILFLOW_TASK_RUNNER": task_runner,
            "MAILFLOW_CAMPAIGN_PREVIEW_DIR": str(tmp_path / "previews"),
            "MAILFLOW_CAMPAIGN_APPROVAL_POLL_S": "1",
        }
        worker = stack.enter_context(
            service(
                "prefect worker",
                [*PREFECT, "worker", "start", "--pool", cart["work_pool"]["name"]],
                worker_env,
                tmp_path / "worker.log",
            )
        )
        deployment = stored["abandoned-cart"]
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"batch_size": 5}
        )

        deadline = time.monotonic() + RUN_S
        while True:
            flow_run = client.read_flow_run(flow_run.id)
            state = flow_run.state
            if state is not None and state.is_final():
                break
            if worker.process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1.0)

        def diagnosis() -> str:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
            )
            run_log = "\n".join(f"{entry.level} {entry.message}" for entry in logs)
            return (
                f"flow run state: {state!r}\n--- flow run log ---\n{run_log}\n"
                f"{worker.tail()}\n{server.tail()}"
            )

        assert state is not None and state.is_completed(), diagnosis()
        if task_runner == "dask":
            # The flow run (a child of the worker, its output in the worker's log) started
            # a local Dask cluster for its batches.
            assert "Creating a new Dask cluster" in worker.log.read_text(), diagnosis()

        with get_engine(warehouse_url).connect() as conn:
            rows = list(conn.execute(select(send_ledger).order_by(send_ledger.c.id)))
        assert len(rows) == len(people), diagnosis()
        assert {r.status for r in rows} == {"sent"}
        assert {r.flow_run_id for r in rows} == {str(flow_run.id)}
        accepted = sink.messages()
        per_ledger_id = Counter(
            m["payload"]["personalizations"][0]["custom_args"]["ledger_id"] for m in accepted
        )
        assert per_ledger_id == Counter({str(r.id): 1 for r in rows})
        # Signed with the worker's unsubscribe secret (production mode, no demo values).
        base = Settings.model_fields["unsubscribe_base_url"].default
        for m in accepted:
            ledger_id = int(m["payload"]["personalizations"][0]["custom_args"]["ledger_id"])
            link = unsubscribe_url(base, SecretStr(unsubscribe_secret), ledger_id)
            assert m["payload"]["headers"]["List-Unsubscribe"] == f"<{link}>"

        if task_runner == "thread":
            # The marketer's path: submit a campaign file, approve it from the CLI.
            sent_before = len(sink.messages())
            sent = submit_and_approve_campaign(client, env, tmp_path, warehouse_url, worker, server)
            assert len(sink.messages()) == sent_before + sent


def mailflow_cli(args: list[str], env: dict[str, str], *services: Service) -> str:
    """Run a `mailflow` command to completion; a failure shows its output and the logs."""
    done = subprocess.run(
        [sys.executable, "-m", "mailflow.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_S,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        logs = "\n".join(s.tail() for s in services)
        pytest.fail(f"`mailflow {' '.join(args)}` exited {done.returncode}:\n{output}\n{logs}")
    return output


def wait_for_state(client: Any, run_id: Any, done: Any, *services: Service) -> Any:
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and (done(run.state) or run.state.is_final()):
            return run.state
        time.sleep(1.0)
    logs = "\n".join(s.tail() for s in services)
    pytest.fail(f"flow run {run_id} still {run.state!r} after {RUN_S}s\n{logs}")


def submit_and_approve_campaign(
    client: Any, env: dict[str, str], tmp_path: Path, warehouse_url: str, *services: Service
) -> int:
    """`mailflow campaign submit FILE`, wait for the pause, `approve`; the messages sent."""
    import re
    from uuid import UUID

    file = tmp_path / "us_spring.yaml"
    file.write_text(
        yaml.safe_dump(
            {
                "name": "us_spring",
                "template": "campaign_spring",
                "segment": {"field": "country", "op": "in", "value": ["US"]},
                "variants": [
                    {"name": "control", "share": 0.5, "subject": "Spring is here"},
                    {"name": "urgency", "share": 0.5, "subject": "Only until Sunday"},
                ],
                "holdout_share": 0.25,
            }
        )
    )
    out = mailflow_cli(["campaign", "submit", str(file)], env, *services)
    found = re.search(r"\(([0-9a-f-]{36})\)", out)
    assert found, out
    run_id = UUID(found.group(1))
    paused = wait_for_state(client, run_id, lambda st: st.is_paused(), *services)
    assert paused.is_paused(), f"expected the run to wait for approval, got {paused!r}"
    mailflow_cli(["campaign", "approve", str(run_id), "--by", "marketer@example.com"], env)
    final = wait_for_state(client, run_id, lambda st: False, *services)
    assert final.is_completed(), f"{final!r}\n" + "\n".join(s.tail() for s in services)

    with get_engine(warehouse_url).connect() as conn:
        rows = list(
            conn.execute(select(send_ledger).where(send_ledger.c.trigger == "campaign:us_spring"))
        )
    assert rows and {r.status for r in rows} == {"sent"}
    assert {r.flow_run_id for r in rows} == {str(run_id)}
    return len(rows)
