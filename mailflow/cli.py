"""The ``mailflow`` command line (Typer)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mailflow import entrypoints
from mailflow.pipeline.options import BATCH_SIZE
from mailflow.settings import DATA_DIR, get_settings
from mailflow.triggers import registry

app = typer.Typer(
    help="mailflow: warehouse-native email notifications orchestrated by Prefect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Warehouse schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()

WarehouseOpt = Annotated[
    str | None,
    typer.Option("--warehouse", help="SQLAlchemy URL (default: MAILFLOW_WAREHOUSE_URL)."),
]


_in_use: dict[str, str] = {}  # the warehouse URL this command works on, for main()'s errors


def _url(warehouse: str | None) -> str:
    _in_use["url"] = warehouse or get_settings().warehouse_url
    return _in_use["url"]


def _mount_subcommands() -> None:
    from mailflow.campaigns.cli import campaign_app
    from mailflow.sink.cli import sink_app

    app.add_typer(sink_app, name="sink", help="The local SendGrid API (serve and inspect).")
    app.add_typer(campaign_app, name="campaign")


_mount_subcommands()


@db_app.command("upgrade")
def db_upgrade(warehouse: WarehouseOpt = None) -> None:
    """Apply every migration to the warehouse."""
    from mailflow.warehouse.migrate import current, upgrade

    url = _url(warehouse)
    upgrade(url)
    console.print(f"warehouse schema at revision [bold]{current(url)}[/bold]")


@db_app.command("current")
def db_current(warehouse: WarehouseOpt = None) -> None:
    """Show the warehouse's schema revision."""
    from mailflow.warehouse.migrate import current

    console.print(current(_url(warehouse)) or "not migrated (run: mailflow db upgrade)")


@app.command()
def seed(
    customers: Annotated[int, typer.Option(min=1, help="How many customers.")] = 5_000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same shop).")] = 42,
    profile: Annotated[str, typer.Option(help="default or bench.")] = "default",
    warehouse: WarehouseOpt = None,
) -> None:
    """Fill the warehouse with a deterministic synthetic shop (replaces shop rows)."""
    from mailflow.demo.seed import BENCH_PROFILE, DEFAULT_PROFILE, seed_shop
    from mailflow.warehouse.engine import make_engine
    from mailflow.warehouse.migrate import upgrade

    profiles = {"default": DEFAULT_PROFILE, "bench": BENCH_PROFILE}
    if profile not in profiles:
        raise typer.BadParameter(f"unknown profile {profile!r}; use one of: default, bench")
    url = _url(warehouse)
    upgrade(url)
    engine = make_engine(url)
    try:
        stats = seed_shop(engine, customers=customers, seed=seed, profile=profiles[profile])
    finally:
        engine.dispose()
    console.print(
        f"seeded {stats.customers:,} customers, {stats.products:,} products, "
        f"{stats.carts:,} carts ({stats.abandoned_candidates:,} abandoned), "
        f"{stats.orders:,} orders in {stats.seconds:.1f}s"
    )


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when inside it (shorter, no machine paths)."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def print_summary(title: str, summary: object) -> None:
    """A run summary as a table."""
    table = Table(title=title, show_lines=False)
    table.add_column("stage")
    table.add_column("what")
    table.add_column("count", justify="right")
    for row in summary.rows():  # type: ignore[attr-defined]
        table.add_row(row["stage"], row["what"], f"{row['count']:,}")
    console.print(table)


def print_trigger_summaries(summaries: list[Any]) -> None:
    """One line per run: what it found, left out and sent."""
    table = Table(title="one run of each")
    for col in ("trigger", "found", "excluded", "quarantined", "sent", "failed"):
        table.add_column(col, justify="left" if col in ("trigger", "excluded") else "right")
    for s in summaries:
        excluded = ", ".join(f"{k} {v:,}" for k, v in sorted(s.excluded.items())) or "–"
        table.add_row(
            s.trigger,
            f"{s.found:,}",
            excluded,
            f"{s.quarantined_rows:,}",
            f"{s.sent:,}",
            f"{s.failed_total:,}",
        )
    console.print(table)


def _wait_for_events(sink: Any, timeout: float = 60.0) -> None:
    """Until the local SendGrid API has posted every engagement event it generated."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = sink.stats().get("events", {})
        if ev.get("generated", 0) and not ev.get("pending", 0):
            return
        time.sleep(0.2)


def print_counts(engine: object) -> None:
    """Events by type and suppressions by reason, as stored in the warehouse."""
    from sqlalchemy import Engine, func, select

    from mailflow.warehouse.schema import events, suppressions

    assert isinstance(engine, Engine)
    with engine.connect() as conn:
        by_event = conn.execute(
            select(events.c.event, func.count()).group_by(events.c.event).order_by(events.c.event)
        ).all()
        by_reason = conn.execute(
            select(suppressions.c.reason, func.count()).group_by(suppressions.c.reason)
        ).all()
    table = Table(title="mf_events and mf_suppressions")
    table.add_column("table")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, n in by_event:
        table.add_row("mf_events", name, f"{n:,}")
    for reason, n in by_reason:
        table.add_row("mf_suppressions", reason, f"{n:,}")
    console.print(table)


#: Printed under every metric table: where the definitions are.
CONTRACT_NOTE = (
    "definitions: docs/metrics.md (metrics contract v2) — opens are human (machine opens "
    "apart), each % names its denominator"
)


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=100, help="Size of the synthetic shop.")] = 5_000,
    seed: Annotated[int, typer.Option(help="Random seed of the shop.")] = 42,
    latency_ms: Annotated[int, typer.Option(help="Latency of the local SendGrid API.")] = 20,
) -> None:
    """Everything end to end on embedded defaults: no account, no network.

    Seeds a fresh SQLite warehouse (data/demo.db), starts the local SendGrid API and
    the signed event webhook, runs the abandoned-cart flow through Prefect, shows the
    events and suppressions that came back, runs it again to show that nothing is sent
    twice, runs the welcome, order-status and weekly-digest flows once, then rolls
    everything up into the metric tables and charts the funnel.
    """
    db_path = DATA_DIR / "demo.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{db_path}"
    os.environ["MAILFLOW_WAREHOUSE_URL"] = url
    os.environ["MAILFLOW_DEMO"] = "true"  # the demo is the one place demo mode is asked for
    # The demo runs offline: no usage telemetry from the temporary Prefect server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server can take a while to start on a small, busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    get_settings.cache_clear()

    from mailflow.demo.seed import seed_shop
    from mailflow.sink.testing import running_sink
    from mailflow.warehouse.engine import dispose_engines, make_engine
    from mailflow.warehouse.migrate import upgrade
    from mailflow.webhook.server import running_webhook
    from mailflow.webhook.signing import generate_keypair, private_key_pem

    console.rule("[bold]1. warehouse")
    upgrade(url)
    engine = make_engine(url)
    stats = seed_shop(engine, customers=customers, seed=seed)
    engine.dispose()
    console.print(
        f"{_shown(db_path)}: "
        f"{stats.customers:,} customers, {stats.carts:,} carts, "
        f"{stats.abandoned_candidates:,} idle long enough to remind ({stats.seconds:.1f}s)"
    )

    console.rule("[bold]2. local SendGrid API and the event webhook")
    private_key, public_key_b64 = generate_keypair()
    webhook_engine = make_engine(url)
    with (
        running_webhook(
            webhook_engine, public_key_b64, unsubscribe_key=get_settings().unsubscribe_key()
        ) as events_url,
        running_sink(
            process=True,
            latency_ms=latency_ms,
            webhook_url=events_url,
            webhook_private_key=private_key_pem(private_key),
            events_seed=seed,
        ) as sink,
    ):
        os.environ["MAILFLOW_SENDGRID_HOST"] = sink.url
        get_settings.cache_clear()
        console.print(
            f"SendGrid API on {sink.url} ({latency_ms} ms latency), posting signed events "
            f"to {events_url}"
        )

        abandoned_cart = entrypoints.load("abandoned_cart", "demo_run")

        console.rule("[bold]3. abandoned-cart flow (Prefect)")
        t0 = time.perf_counter()
        first = abandoned_cart()
        took = time.perf_counter() - t0
        print_summary(f"first run ({took:.1f}s)", first)

        console.rule("[bold]4. engagement events: SendGrid API → signed webhook → warehouse")
        _wait_for_events(sink)
        print_counts(webhook_engine)
        from mailflow.demo.returns import shoppers_return

        came_back = shoppers_return(webhook_engine, seed=seed)
        console.print(
            f"{came_back.orders:,} reminded shoppers came back and ordered their cart "
            f"(simulated, {came_back.revenue:,.2f} in all)"
        )

        console.rule("[bold]5. the same flow again: nothing is sent twice")
        second = abandoned_cart()
        print_summary("second run", second)

        console.rule("[bold]6. more triggers: welcome, order status, weekly digest")
        others = [
            entrypoints.load(name, "demo_run")() for name in registry() if name != "abandoned_cart"
        ]
        _wait_for_events(sink)
        print_trigger_summaries(others)
        accepted = sink.stats().get("accepted", 0)

    console.rule("[bold]7. engagement metrics: the rollup adds it all up")
    from datetime import timedelta

    from mailflow.clock import utcnow
    from mailflow.report import Period, funnel_chart, metrics_tables, period_metrics

    entrypoints.load(entrypoints.ROLLUP)()
    today = utcnow().date()
    # Yesterday too, in case the demo ran across midnight UTC.
    period = Period(today - timedelta(days=1), today)
    rows = period_metrics(webhook_engine, period)
    title = "engagement of the demo's messages (mailflow report, view mf_engagement_daily)"
    console.print(title)
    console.print(*metrics_tables(rows))
    console.print(CONTRACT_NOTE)
    chart = funnel_chart(rows, DATA_DIR / "demo-funnel.png", title=title)
    console.print(f"funnel chart: {_shown(chart)}")
    webhook_engine.dispose()
    dispose_engines()

    console.rule("[bold]where to look next")
    console.print(
        f"- the local SendGrid API accepted {accepted:,} messages in all (abandoned cart: "
        f"first run {first.sent:,}, second run {second.sent:,})\n"
        "- ledger, one row per message:  sqlite3 data/demo.db "
        '"select status, count(*) from mf_send_ledger group by status"\n'
        "- engagement events and suppressions: tables mf_events, mf_suppressions\n"
        "- metrics for analysts:          views mf_engagement_daily, mf_engagement_totals; "
        "mailflow report (table + funnel chart)\n"
        "- quarantined rows and why:      sqlite3 data/demo.db "
        '"select expectation, count(*) from mf_quarantine group by 1"\n'
        "- run summaries:                 table mf_runs; in the Prefect UI, the artifact "
        "'abandoned-cart-summary'\n"
        "- serve the local API yourself:  mailflow sink --latency-ms 50, then "
        "mailflow sink list"
    )


@app.command()
def webhook(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8040,
    warehouse: WarehouseOpt = None,
) -> None:
    """Receive SendGrid's signed Event Webhook at POST /webhooks/sendgrid/events.

    The verification key comes from MAILFLOW_WEBHOOK_PUBLIC_KEY; MAILFLOW_WEBHOOK_VERIFY=false
    turns verification off (local development only, logged loudly);
    MAILFLOW_WEBHOOK_TOLERANCE_S sets how old a signed timestamp may be (default 300 s).
    """
    import uvicorn

    from mailflow.warehouse.engine import make_engine
    from mailflow.warehouse.migrate import upgrade
    from mailflow.webhook.app import create_app

    settings = get_settings()
    url = _url(warehouse)
    upgrade(url)
    engine = make_engine(url)
    try:
        api = create_app(
            engine=engine,
            public_key_b64=settings.webhook_public_key,
            verify=settings.webhook_verify,
            tolerance_s=settings.webhook_tolerance_s,
            unsubscribe_key=settings.unsubscribe_key(),
        )
        uvicorn.run(api, host=host, port=port, log_level="info")
    finally:
        engine.dispose()


@app.command("run")
def run(
    trigger: Annotated[
        str,
        typer.Argument(help=f"{', '.join(registry())}, rollup or suppressions."),
    ],
    batch_size: Annotated[int, typer.Option(min=1, max=1000)] = BATCH_SIZE,
) -> None:
    """Run one flow now, with its default parameters, against the configured warehouse."""
    if trigger == "rollup":
        result = entrypoints.load(entrypoints.ROLLUP)()
        console.print(
            f"rollup ({'full' if result['full'] else 'incremental'}): {result['messages']:,} "
            f"messages over {len(result['days'])} send days; see mailflow report"
        )
        return
    if trigger == "suppressions":
        counts = entrypoints.load(entrypoints.SUPPRESSION_SYNC)()
        pulled = ", ".join(f"{name} {c['added']:,}" for name, c in counts["pulled"].items())
        console.print(
            f"suppressions from SendGrid added: {pulled}; "
            f"{counts['pushed']:,} local unsubscribes pushed"
        )
        return
    if trigger not in registry():
        raise typer.BadParameter(
            f"unknown trigger {trigger!r}; known: {', '.join(registry())}, rollup, suppressions",
            param_hint="TRIGGER",
        )
    summary = entrypoints.load(trigger)(batch_size=batch_size)
    print_summary(trigger, summary)


suppress_app = typer.Typer(
    help="Addresses nobody may email: add, remove, list, import.", no_args_is_help=True
)
app.add_typer(suppress_app, name="suppress")


def _report_suppress(outcome: object, source: str) -> None:
    from mailflow.suppressions import Outcome

    assert isinstance(outcome, Outcome)
    console.print(
        f"{outcome.added:,} suppressed, {outcome.already:,} already suppressed (source: {source})"
    )
    for where, raw, problem in outcome.invalid:
        console.print(f"[yellow]skipped[/yellow] {where}: {raw!r} is not an address ({problem})")
    if outcome.invalid:
        console.print(
            f"{len(outcome.invalid):,} rows skipped; fix them and run the command again "
            "(the rows already added stay)"
        )


@suppress_app.command("add")
def suppress_add(
    emails: Annotated[list[str], typer.Argument(help="One or more addresses.")],
    reason: Annotated[str, typer.Option(help="Why (free text, up to 64 characters).")] = "manual",
    warehouse: WarehouseOpt = None,
) -> None:
    """Suppress addresses by hand (e.g. a complaint that reached support)."""
    from mailflow import suppressions
    from mailflow.warehouse.engine import make_engine

    engine = make_engine(_url(warehouse))
    try:
        with engine.begin() as conn:
            outcome = suppressions.add(
                conn, [(f"argument {i}", e, reason) for i, e in enumerate(emails, 1)], source="cli"
            )
    finally:
        engine.dispose()
    _report_suppress(outcome, "cli")
    if outcome.invalid:
        raise typer.Exit(1)


@suppress_app.command("remove")
def suppress_remove(
    emails: Annotated[list[str], typer.Argument(help="One or more addresses.")],
    warehouse: WarehouseOpt = None,
) -> None:
    """Lift suppressions (only when the person asked to hear from you again)."""
    from mailflow import suppressions
    from mailflow.warehouse.engine import make_engine

    engine = make_engine(_url(warehouse))
    try:
        with engine.begin() as conn:
            lifted = suppressions.remove(conn, emails)
    finally:
        engine.dispose()
    console.print(f"{lifted:,} of {len(set(emails)):,} addresses lifted")


@suppress_app.command("list")
def suppress_list(
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    contains: Annotated[str | None, typer.Option(help="Only addresses containing this.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 50,
    warehouse: WarehouseOpt = None,
) -> None:
    """The newest suppressions, with their reason and source."""
    from mailflow import suppressions
    from mailflow.warehouse.engine import make_engine

    engine = make_engine(_url(warehouse))
    try:
        with engine.connect() as conn:
            total, rows = suppressions.listing(conn, reason=reason, contains=contains, limit=limit)
    finally:
        engine.dispose()
    table = Table(title=f"{total:,} suppressions (newest {len(rows):,} shown)")
    for col in ("email", "reason", "source", "since (UTC)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.email, r.reason, r.source or "", f"{r.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


@suppress_app.command("import")
def suppress_import(
    path: Annotated[Path, typer.Argument(help="CSV with a header row and an email column.")],
    reason: Annotated[
        str, typer.Option(help="Reason for rows without a reason column.")
    ] = "imported",
    warehouse: WarehouseOpt = None,
) -> None:
    """Import a suppression list (e.g. exported from a previous provider); idempotent."""
    from mailflow import suppressions
    from mailflow.warehouse.engine import make_engine

    entries = suppressions.read_csv(path, default_reason=reason)
    engine = make_engine(_url(warehouse))
    try:
        with engine.begin() as conn:
            outcome = suppressions.add(conn, entries, source=f"import:{path.name}")
    finally:
        engine.dispose()
    _report_suppress(outcome, f"import:{path.name}")


@app.command()
def report(
    days: Annotated[int, typer.Option(min=1, help="The last N send days (UTC).")] = 30,
    since: Annotated[
        str | None, typer.Option(help="First send day, YYYY-MM-DD (instead of --days).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Last send day, YYYY-MM-DD.")] = None,
    trigger: Annotated[str | None, typer.Option(help="Only this trigger.")] = None,
    campaign: Annotated[
        str | None,
        typer.Option(help="A campaign's experiment results (per variant and holdout) instead."),
    ] = None,
    chart: Annotated[Path, typer.Option(help="Where to write the funnel chart (PNG).")] = DATA_DIR
    / "funnel.png",
    rollup_first: Annotated[
        bool, typer.Option("--rollup/--no-rollup", help="Update the metric tables first.")
    ] = True,
    warehouse: WarehouseOpt = None,
) -> None:
    """Print the engagement metrics per trigger and variant and chart the funnel."""
    from datetime import date, timedelta

    from mailflow.clock import utcnow
    from mailflow.metrics import rollup
    from mailflow.report import Period, funnel_chart, metrics_tables, period_metrics
    from mailflow.warehouse.engine import make_engine

    def day(value: str, option: str) -> date:
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise typer.BadParameter(
                f"{value!r} is not a date like 2026-11-27", param_hint=option
            ) from None

    end = day(until, "--until") if until else utcnow().date()
    start = day(since, "--since") if since else end - timedelta(days=days - 1)
    try:
        period = Period(start, end)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    engine = make_engine(_url(warehouse))
    try:
        if rollup_first:
            rollup(engine)
        if campaign is not None:
            _experiment_report(engine, campaign)
            return
        rows = period_metrics(engine, period, trigger=trigger)
    finally:
        engine.dispose()
    title = f"engagement, messages sent {period.since} – {period.until} (UTC)"
    if not rows:
        console.print(f"{title}: no messages sent in this period")
        return
    console.print(title)
    console.print(*metrics_tables(rows))
    console.print(CONTRACT_NOTE)
    written = funnel_chart(rows, chart, title=title)
    console.print(f"funnel chart: {_shown(written)}")


def _experiment_report(engine: Any, campaign: str) -> None:
    from mailflow.campaigns.stats import experiment_table, render_table, split_check

    rows = experiment_table(engine, campaign)
    if not rows:
        raise typer.BadParameter(
            f"campaign {campaign!r} has no recipients yet; check the name "
            "(mailflow campaign preview FILE shows it) or send it first",
            param_hint="--campaign",
        )
    check = split_check(engine, campaign)
    if check is not None:
        style = "bold red" if check.mismatch else "green"
        console.print(f"[{style}]{check.summary()}[/{style}]", highlight=False)
    console.print(render_table(rows, title=f"campaign {campaign}: results per arm"))
    console.print(
        "stored in tables mf_campaign_results and mf_campaign_split; definitions: "
        "docs/metrics.md (metrics contract v2)"
    )


def main() -> None:
    """Entry point: a MailflowError is printed as its message (it names the fix), and so is
    a warehouse that cannot be used (unreachable, not migrated), naming the setting."""
    from sqlalchemy.exc import SQLAlchemyError

    from mailflow.errors import MailflowError
    from mailflow.warehouse.engine import unreachable

    try:
        try:
            app()
        except SQLAlchemyError as exc:
            url = _in_use.get("url") or get_settings().warehouse_url
            raise unreachable(url, exc) from None
    except MailflowError as exc:
        # escape: a message may quote "[...]" (SQL, YAML) that is not rich markup.
        console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
