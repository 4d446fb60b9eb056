"""Adding a trigger: what the convention asks for, checked for every registered trigger.

A trigger is a module in ``mailflow/triggers`` (registered there), a template folder per
supported locale, a flow ``flows/<name>.py:<name>`` with a ``demo_run``, and a deployment
of that entrypoint in ``prefect.yaml`` that never overlaps itself. The CLI (``run`` and
``demo``) finds it from the registry; nothing else lists triggers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect import Flow

from mailflow import entrypoints
from mailflow.triggers import registry
from mailflow.validation import SUPPORTED_LOCALES

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = {
    d["entrypoint"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
}


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_trigger_keeps_the_convention(name: str) -> None:
    trigger = registry()[name]
    flow = entrypoints.load(name)
    assert isinstance(flow, Flow), f"flows/{name}.py must define the flow function {name}"
    assert callable(entrypoints.load(name, "demo_run")), f"flows/{name}.py needs demo_run()"
    deployment = DEPLOYMENTS.get(entrypoints.entrypoint(name))
    assert deployment is not None, (
        f"prefect.yaml has no deployment of {entrypoints.entrypoint(name)}"
    )
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    folders = {p.name for p in (ROOT / "templates" / trigger.template).iterdir() if p.is_dir()}
    assert folders == set(SUPPORTED_LOCALES), f"templates/{trigger.template}: one folder a locale"


def test_the_rollup_is_found_the_same_way() -> None:
    assert isinstance(entrypoints.load(entrypoints.ROLLUP), Flow)
    assert entrypoints.entrypoint(entrypoints.ROLLUP) in DEPLOYMENTS


def test_the_core_imports_nothing_from_flows_or_tasks() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "mailflow").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.lstrip().startswith(("from flows", "from tasks", "import flows", "import tasks"))
    ]
    assert offenders == []


def test_the_suppression_sync_is_found_the_same_way() -> None:
    assert isinstance(entrypoints.load(entrypoints.SUPPRESSION_SYNC), Flow)
    deployment = DEPLOYMENTS[entrypoints.entrypoint(entrypoints.SUPPRESSION_SYNC)]
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert deployment["schedules"][0]["cron"] == "0 * * * *"
