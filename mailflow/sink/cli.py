"""``mailflow sink``: run the local SendGrid API, inspect it, change its faults.

``mailflow sink [OPTIONS]`` starts the server; the other
commands talk to a running one over HTTP (``--url``, default
``$MAILFLOW_SENDGRID_HOST`` or http://127.0.0.1:3030).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from mailflow.errors import ConfigError
from mailflow.settings import DEMO_API_KEY
from mailflow.sink.config import SinkConfig

__all__ = ["sink_app"]

sink_app = typer.Typer(
    name="sink",
    help="The local SendGrid API (POST /v3/mail/send): run it, inspect it, inject faults.",
    invoke_without_command=True,
    no_args_is_help=False,
)
_console = Console()
_DEFAULT_URL = "http://127.0.0.1:3030"

Url = Annotated[
    str,
    typer.Option(
        "--url", envvar="MAILFLOW_SENDGRID_HOST", help="Base URL of the running local SendGrid API."
    ),
]
Host = Annotated[str, typer.Option(help="Interface to listen on.")]
Port = Annotated[int, typer.Option(help="Port to listen on.")]
LatencyMs = Annotated[float, typer.Option(help="Latency added to every mail send, in ms.")]
JitterMs = Annotated[float, typer.Option(help="Random ± spread around the latency, in ms.")]
RateLimit = Annotated[int, typer.Option(help="Requests per window before 429 (0: no limit).")]
RateWindow = Annotated[float, typer.Option(help="Rate-limit window, in seconds.")]
Rate500 = Annotated[float, typer.Option(help="Share of mail sends answered 500.")]
Rate503 = Annotated[float, typer.Option(help="Share of mail sends answered 503.")]
DropRate = Annotated[float, typer.Option(help="Share of mail sends dropped without an answer.")]
SlowRate = Annotated[float, typer.Option(help="Share of mail sends delayed by --slow-ms more.")]
SlowMs = Annotated[float, typer.Option(help="Extra delay of a slow mail send, in ms.")]
Seed = Annotated[int | None, typer.Option(help="Seed of the fault RNG (reproducible runs).")]
Keep = Annotated[int, typer.Option(help="Accepted messages kept in memory (oldest dropped).")]
ApiKeys = Annotated[
    list[str] | None,
    typer.Option("--api-key", help="An accepted API key (repeatable; default: the demo key)."),
]
ForbiddenKeys = Annotated[
    list[str] | None,
    typer.Option("--forbidden-key", help="A key without the mail.send scope: 403 (repeatable)."),
]
Validate = Annotated[bool, typer.Option(help="Validate payloads against SendGrid's schema.")]
Script = Annotated[
    str | None,
    typer.Option(help='Scripted answers as JSON, e.g. \'[{"status": 503, "count": 3}]\'.'),
]
FailRecipients = Annotated[
    str | None,
    typer.Option(help="Per-recipient answers as JSON, e.g. '{\"bad@example.com\": 400}'."),
]
WebhookUrl = Annotated[
    str | None,
    typer.Option(help="Post signed engagement events here, like SendGrid's Event Webhook."),
]
WebhookKey = Annotated[
    Path | None,
    typer.Option(
        "--webhook-private-key",
        help="PEM file of the P-256 signing key (default: a new key pair; its public "
        "half at GET /_sink/webhook-key).",
    ),
]
OpenRate = Annotated[float, typer.Option(help="Share of delivered messages opened.")]
MachineOpenRate = Annotated[
    float,
    typer.Option(help="Share of delivered messages with a machine open (sg_machine_open)."),
]
ClickRate = Annotated[float, typer.Option(help="Share of opens that click.")]
UnsubscribeRate = Annotated[float, typer.Option(help="Share of deliveries that unsubscribe.")]
SpamRate = Annotated[float, typer.Option(help="Share of deliveries reported as spam.")]
BounceRate = Annotated[float, typer.Option(help="Share of recipients that bounce.")]
DuplicateRate = Annotated[float, typer.Option(help="Share of event batches posted twice.")]
EventBatchSize = Annotated[int, typer.Option(help="Most events per webhook post.")]
EventFlushMs = Annotated[float, typer.Option(help="Longest wait to fill an event batch, ms.")]
EventsSeed = Annotated[int | None, typer.Option(help="Seed of the event-outcome RNG.")]


def _json_option(name: str, raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON ({exc.msg})", param_hint=name) from None


def _serve(**options: Any) -> None:
    from mailflow.sink.server import serve  # uvicorn only when serving

    host, port = options.pop("host"), options.pop("port")
    options["api_keys"] = options.pop("api_key") or [DEMO_API_KEY]
    options["forbidden_keys"] = options.pop("forbidden_key") or []
    for name in ("script", "fail_recipients"):
        value = _json_option(f"--{name.replace('_', '-')}", options.pop(name))
        if value is not None:
            options[name] = value
    for name in ("seed", "events_seed", "webhook_url"):
        if options[name] is None:
            del options[name]
    key_file = options.pop("webhook_private_key")
    if key_file is not None:
        try:
            options["webhook_private_key"] = key_file.read_text()
        except OSError as exc:
            raise typer.BadParameter(
                f"cannot read {key_file} ({exc.strerror})", param_hint="--webhook-private-key"
            ) from None
    try:
        config = SinkConfig.build(**options)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    keys = "the demo key " + DEMO_API_KEY if config.api_keys == (DEMO_API_KEY,) else "your keys"
    _console.print(
        f"Local SendGrid API on [bold]http://{host}:{port}[/bold] "
        f"(POST /v3/mail/send with {keys}); Ctrl+C to stop."
    )
    if config.webhook_url:
        _console.print(
            f"Events to [bold]{config.webhook_url}[/bold]; verification key at "
            f"http://{host}:{port}/_sink/webhook-key."
        )
    serve(config, host, port)


@sink_app.callback()
def main(
    ctx: typer.Context,
    host: Host = "127.0.0.1",
    port: Port = 3030,
    latency_ms: LatencyMs = 0.0,
    jitter_ms: JitterMs = 0.0,
    rate_limit: RateLimit = 0,
    rate_limit_window_s: RateWindow = 1.0,
    error_rate_500: Rate500 = 0.0,
    error_rate_503: Rate503 = 0.0,
    drop_rate: DropRate = 0.0,
    slow_rate: SlowRate = 0.0,
    slow_ms: SlowMs = 30_000.0,
    seed: Seed = None,
    keep: Keep = 200_000,
    api_key: ApiKeys = None,
    forbidden_key: ForbiddenKeys = None,
    validate: Validate = True,
    script: Script = None,
    fail_recipients: FailRecipients = None,
    webhook_url: WebhookUrl = None,
    webhook_private_key: WebhookKey = None,
    open_rate: OpenRate = 0.4,
    machine_open_rate: MachineOpenRate = 0.25,
    click_rate: ClickRate = 0.15,
    unsubscribe_rate: UnsubscribeRate = 0.01,
    spam_rate: SpamRate = 0.002,
    bounce_rate: BounceRate = 0.01,
    duplicate_rate: DuplicateRate = 0.0,
    event_batch_size: EventBatchSize = 500,
    event_flush_ms: EventFlushMs = 200.0,
    events_seed: EventsSeed = None,
) -> None:
    """Run the local SendGrid API until Ctrl+C (unless a subcommand is given)."""
    options = dict(locals())  # before anything else is bound
    del options["ctx"]
    if ctx.invoked_subcommand is None:
        _serve(**options)


def _call(method: str, url: str, path: str, **kwargs: Any) -> Any:
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=10.0) as client:
            response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        _console.print(
            f"[red]No local SendGrid API answers at {url} ({exc.__class__.__name__}).[/red] "
            "Start one with `mailflow sink`, or pass --url / set MAILFLOW_SENDGRID_HOST."
        )
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        try:
            message = response.json()["errors"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            message = response.text
        _console.print(f"[red]{response.status_code}: {message}[/red]")
        raise typer.Exit(2)
    return response.json()


@sink_app.command("list")
def list_messages(
    to: Annotated[str | None, typer.Option(help="Only messages to this address.")] = None,
    category: Annotated[str | None, typer.Option(help="Only messages in this category.")] = None,
    limit: Annotated[int, typer.Option(help="How many of the newest to show.")] = 20,
    offset: Annotated[int, typer.Option(help="Skip this many of the newest.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw JSON.")] = False,
    url: Url = _DEFAULT_URL,
) -> None:
    """List accepted messages, newest last."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if to:
        params["to"] = to
    if category:
        params["category"] = category
    messages = _call("GET", url, "/_sink/messages", params=params)
    if as_json:
        _console.print_json(data=messages)
        return
    table = Table(title=f"{len(messages)} message(s) at {url}")
    table.add_column("message id", no_wrap=True)
    table.add_column("received (UTC)")
    table.add_column("recipients", no_wrap=True)
    table.add_column("subject")
    table.add_column("categories")
    for m in messages:
        recipients = m["recipients"]
        shown = recipients[0] if recipients else ""
        if len(recipients) > 1:
            shown += f" (+{len(recipients) - 1})"
        table.add_row(
            m["message_id"],
            m["received_at"][:23].replace("T", " "),
            shown,
            m["subject"] or "",
            ", ".join(m["categories"]),
        )
    _console.print(table)


@sink_app.command()
def show(
    message_id: Annotated[str, typer.Argument(help="The X-Message-Id of an accepted message.")],
    url: Url = _DEFAULT_URL,
) -> None:
    """Show one accepted message, with its full payload."""
    _console.print_json(data=_call("GET", url, f"/_sink/messages/{message_id}"))


@sink_app.command()
def stats(url: Url = _DEFAULT_URL) -> None:
    """Show counters: accepted, rejected by status, dropped, in flight, uptime."""
    data = _call("GET", url, "/_sink/stats")
    table = Table(title=f"local SendGrid API at {url}", show_header=False)
    table.add_column("counter")
    table.add_column("value", justify="right")
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
        table.add_row(key, str(value))
    _console.print(table)


@sink_app.command()
def clear(url: Url = _DEFAULT_URL) -> None:
    """Forget the stored messages (counters stay)."""
    cleared = _call("DELETE", url, "/_sink/messages")["cleared"]
    _console.print(f"Cleared {cleared} message(s).")


@sink_app.command()
def faults(
    latency_ms: Annotated[float | None, typer.Option(help="Latency in ms.")] = None,
    jitter_ms: Annotated[float | None, typer.Option(help="± jitter in ms.")] = None,
    rate_limit: Annotated[int | None, typer.Option(help="Requests per window (0: off).")] = None,
    rate_limit_window_s: Annotated[float | None, typer.Option(help="Window in s.")] = None,
    error_rate_500: Annotated[float | None, typer.Option(help="Share answered 500.")] = None,
    error_rate_503: Annotated[float | None, typer.Option(help="Share answered 503.")] = None,
    drop_rate: Annotated[float | None, typer.Option(help="Share dropped.")] = None,
    slow_rate: Annotated[float | None, typer.Option(help="Share slowed by slow-ms.")] = None,
    slow_ms: Annotated[float | None, typer.Option(help="Extra delay when slow, ms.")] = None,
    seed: Annotated[int | None, typer.Option(help="Reseed the fault RNG.")] = None,
    script: Script = None,
    fail_recipients: FailRecipients = None,
    reset: Annotated[bool, typer.Option(help="Back to the start-up settings first.")] = False,
    url: Url = _DEFAULT_URL,
) -> None:
    """Show the fault settings, or change the ones given (the others stay)."""
    given = dict(locals())  # before anything else is bound
    changes = {
        k: v
        for k, v in given.items()
        if k not in ("url", "reset", "script", "fail_recipients") and v is not None
    }
    for name, raw in (("script", script), ("fail_recipients", fail_recipients)):
        value = _json_option(f"--{name.replace('_', '-')}", raw)
        if value is not None:
            changes[name] = value
    if reset:
        data = _call("DELETE", url, "/_sink/faults")
    if changes:
        data = _call("POST", url, "/_sink/faults", json=changes)
    elif not reset:
        data = _call("GET", url, "/_sink/faults")
    _console.print_json(data=data)
