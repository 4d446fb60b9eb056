"""The options every sending flow takes, with their bounds and defaults defined once.

Flows keep them as flat parameters (one field each in the Prefect UI's run form, and
``prefect.yaml`` sets them by name); their types come from here. Prefect takes a
parameter's description from the flow's docstring, so each flow's ``Args`` names them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: Messages per send task (one Prefect task, retried as a unit).
BatchSize = Annotated[int, Field(ge=1, le=1000)]
BATCH_SIZE = 500

#: Fail the run when more than this share of new rows is bad (they are quarantined).
MaxBadShare = Annotated[float, Field(ge=0, le=1)]
MAX_BAD_SHARE = 0.05
