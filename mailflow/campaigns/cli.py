"""``mailflow campaign``: preview, submit and approve campaigns from a terminal."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.console import Console
from rich.table import Table

campaign_app = typer.Typer(
    help="Campaigns for marketers: preview a campaign file, submit it, approve it.",
    no_args_is_help=True,
)
console = Console()

FileArg = Annotated[
    Path, typer.Argument(help="A campaign YAML file, e.g. campaigns/spring_sale.yaml.")
]


@campaign_app.command("preview")
def preview(
    file: FileArg,
    samples: Annotated[int, typer.Option(min=0, max=20, help="Sample messages per variant.")] = 3,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the sample files (default: data/previews).")
    ] = None,
) -> None:
    """Audience, exclusions by reason, arms and sample messages. Sends and writes nothing else."""
    from mailflow.campaigns.model import load_campaign
    from mailflow.campaigns.preview import write_samples
    from mailflow.clock import utcnow
    from mailflow.pipeline import resources
    from mailflow.pipeline.campaign import build_audience, make_preview, preview_dir

    campaign = load_campaign(file)
    res = resources.current()
    res.renderer.check(campaign.template)
    now = utcnow()
    audience = build_audience(res, campaign, now, flow_run_id=None, max_bad_share=1.0, record=False)
    result = make_preview(res, campaign, audience, samples_per_variant=samples, now=now)
    folder = out or preview_dir(res, campaign.name, f"cli-{now:%Y%m%dT%H%M%S}")
    write_samples(result.samples, folder)

    table = Table(title=f"campaign {campaign.name} — preview ({campaign.kind})")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("segment matches", f"{result.found:,}")
    for reason, n in sorted(result.excluded.items()):
        table.add_row(f"excluded: {reason}", f"{n:,}")
    table.add_row("eligible", f"{result.eligible:,}")
    for arm, n in sorted(result.arms.items()):
        table.add_row(f"arm: {arm}" + (" (not sent)" if arm == "holdout" else ""), f"{n:,}")
    table.add_row("[bold]messages to send[/bold]", f"[bold]{result.recipients:,}[/bold]")
    console.print(table)
    for s in result.samples:
        console.print(
            f"  {s.arm:<12} {s.locale:<5} {s.subject!r}\n    {s.html_path}\n    {s.text_path}"
        )
    if not result.samples:
        console.print("no sample messages (nobody eligible, or --samples 0)")


@campaign_app.command("submit")
def submit(
    file: FileArg,
    deployment: Annotated[str, typer.Option(help="The campaign deployment.")] = "campaign/campaign",
    dry_run: Annotated[bool, typer.Option(help="Preview only: stop before approval.")] = False,
) -> None:
    """Start a run of the campaign deployment; it previews, then waits for approval in the UI."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    from mailflow.campaigns.model import load_campaign
    from mailflow.errors import ConfigError

    campaign = load_campaign(file)  # refuse a bad file before anything is started
    parameters = {**campaign.definition(), "dry_run": dry_run}
    try:
        started = run_deployment(name=deployment, parameters=parameters, timeout=0)
    except Exception as exc:  # Prefect raises several types for "not found / no server"
        raise ConfigError(
            f"could not start deployment {deployment!r} ({type(exc).__name__}: {exc}); "
            "check PREFECT_API_URL and run `prefect deploy --all` from the project folder"
        ) from None
    run = cast(FlowRun, started)  # called from sync code: Prefect returns the run, not a coroutine
    console.print(
        f"submitted campaign [bold]{campaign.name}[/bold] as flow run {run.name} ({run.id}).\n"
        "It previews, then pauses: approve or reject it in the Prefect UI (the run's "
        f"'Resume' form), or `mailflow campaign approve {run.id} --by YOU`."
    )


@campaign_app.command("approve")
def approve(
    run_id: Annotated[str, typer.Argument(help="The paused campaign flow run's id.")],
    by: Annotated[str, typer.Option("--by", help="Your name or email (recorded).")],
    reject: Annotated[bool, typer.Option(help="Reject instead: nothing is sent.")] = False,
    comment: Annotated[str, typer.Option(help="Why (recorded).")] = "",
) -> None:
    """Answer a paused campaign run's approval form."""
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    from mailflow.errors import ConfigError

    try:
        flow_run_id = UUID(run_id)
    except ValueError:
        raise ConfigError(
            f"{run_id!r} is not a flow run id; copy it from the UI or `submit`"
        ) from None
    resume_flow_run(
        flow_run_id, run_input={"approve": not reject, "approver": by, "comment": comment}
    )
    console.print(f"{'rejected' if reject else 'approved'} by {by} at {datetime.now():%H:%M:%S}")
