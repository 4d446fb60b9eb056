"""Where each job's Prefect flow lives, by convention, so the core never imports ``flows/``.

A trigger called ``name`` (see :mod:`mailflow.triggers`) runs as the flow function
``name`` in ``flows/<name>.py``; that module also has ``demo_run()``, what the demo
runs. ``prefect.yaml`` deploys the same entrypoint. The CLI finds flows here; a test
checks that every registered trigger keeps the convention.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: The jobs that are not triggers: the engagement rollup and the suppression sync.
ROLLUP = "engagement_rollup"
SUPPRESSION_SYNC = "suppression_sync"


def entrypoint(name: str) -> str:
    """``flows/<name>.py:<name>``, as written in ``prefect.yaml``."""
    return f"flows/{name}.py:{name}"


def load(name: str, attribute: str | None = None) -> Callable[..., Any]:
    """The flow ``name`` (or another ``attribute`` of its module, e.g. ``demo_run``)."""
    module = importlib.import_module(f"flows.{name}")
    found: Callable[..., Any] = getattr(module, attribute or name)
    return found
