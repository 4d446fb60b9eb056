"""Campaign preview over a synthetic shop, beside the bare audience query measured in the same run.

Seeds N customers (the DEFAULT shop profile: dirty data, ~25 % without consent) into a
fresh SQLite warehouse, then measures:

- baseline: the segment's bare query — the compiled filter, rows fetched into pandas —
  with no exclusions, validation, assignment or rendering;
- preview: what ``mailflow campaign preview`` does — segment, shared exclusions in SQL
  (suppressed, consent, frequency cap, already sent), the Great Expectations gate,
  deterministic arms for everyone, and 3 rendered samples per variant written to disk;
- flow: the ``campaign`` flow with ``dry_run=true`` (Prefect's temporary server is
  started before the clock), timed by its own mf_runs row.

Two campaigns: ``campaigns/spring_sale.yaml`` as written, and the same with a broad
segment (every customer with a country) to preview the largest audience.

    .venv/bin/python bench/campaign_preview.py --customers 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-flow", action="store_true", help="Skip the Prefect flow runs.")
    parser.add_argument(
        "--no-send", action="store_true", help="Skip the approved send of the broad campaign."
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mailflow-campaign-bench-"))
    os.environ["MAILFLOW_WAREHOUSE_URL"] = f"sqlite:///{workdir / 'warehouse.db'}"
    os.environ["MAILFLOW_CAMPAIGN_PREVIEW_DIR"] = str(workdir / "previews")
    os.environ["MAILFLOW_DEMO"] = "true"

    import pandas as pd
    from sqlalchemy import select

    from mailflow.campaigns.model import load_campaign, parse_campaign
    from mailflow.campaigns.preview import write_samples
    from mailflow.campaigns.segments import compile_segment
    from mailflow.clock import utcnow
    from mailflow.demo.seed import DEFAULT_PROFILE, seed_shop
    from mailflow.pipeline import resources
    from mailflow.pipeline.campaign import build_audience, make_preview
    from mailflow.settings import get_settings
    from mailflow.warehouse.engine import get_engine
    from mailflow.warehouse.migrate import upgrade
    from mailflow.warehouse.schema import customers

    get_settings.cache_clear()
    upgrade(get_settings().warehouse_url)
    stats = seed_shop(
        get_engine(), customers=args.customers, seed=args.seed, profile=DEFAULT_PROFILE
    )
    print(f"seeded {stats.customers:,} customers, {stats.orders:,} orders in {stats.seconds:.1f}s")

    spring = load_campaign(ROOT / "campaigns" / "spring_sale.yaml")
    broad = parse_campaign(
        {
            **spring.definition(),
            "name": "broad_sale",
            "segment": {"field": "lifetime_value", "op": "gte", "value": 0},
        }  # fmt: skip
    )
    # Warm the process once (GX import and context, template compile): a real preview
    # process pays it once too; printed separately.
    start = time.perf_counter()
    build_audience(
        resources.current(), spring, utcnow(), flow_run_id=None, max_bad_share=1.0, record=False
    )
    print(f"warm-up (imports, GX context): {time.perf_counter() - start:.2f}s")

    rows = []
    for campaign in (spring, broad):
        now = utcnow()
        start = time.perf_counter()
        with get_engine().connect() as conn:
            frame = pd.DataFrame(
                conn.execute(
                    select(customers).where(compile_segment(campaign.segment, now=now))
                ).all()
            )
        base = time.perf_counter() - start
        start = time.perf_counter()
        audience = build_audience(
            resources.current(), campaign, now, flow_run_id=None, max_bad_share=1.0, record=False
        )
        preview = make_preview(
            resources.current(), campaign, audience, samples_per_variant=3, now=now
        )
        write_samples(preview.samples, workdir / "previews" / campaign.name)
        took = time.perf_counter() - start
        rows.append((campaign.name, len(frame), preview, base, took))

    print()
    print(f"{'campaign':<12} {'matches':>8} {'eligible':>9} {'to send':>8} {'held out':>8} "
          f"{'baseline s':>10} {'preview s':>9} {'ratio':>6}")  # fmt: skip
    for name, matches, p, base, took in rows:
        held = p.arms.get("holdout", 0)
        print(f"{name:<12} {matches:>8,} {p.eligible:>9,} {p.recipients:>8,} {held:>8,} "
              f"{base:>10.2f} {took:>9.2f} {took / base:>5.1f}x")  # fmt: skip
        print(f"{'':<12} excluded: {p.excluded}")

    if args.no_flow:
        return
    from prefect.testing.utilities import prefect_test_harness
    from sqlalchemy import desc

    from flows.campaign import campaign as campaign_flow
    from mailflow.warehouse.schema import run_log

    with prefect_test_harness(server_startup_timeout=120):
        for campaign in (spring, broad):
            wall = time.perf_counter()
            campaign_flow(**campaign.definition(), dry_run=True)
            wall = time.perf_counter() - wall
            with get_engine().connect() as conn:
                run = conn.execute(select(run_log).order_by(desc(run_log.c.id)).limit(1)).one()
            inside = (run.finished_at - run.started_at).total_seconds()
            print(f"flow dry run {campaign.name}: {inside:.2f}s inside the flow, "
                  f"{wall:.2f}s wall (Prefect flow overhead included)")  # fmt: skip
        if not args.no_send:
            send_approved(broad, campaign_flow)


def send_approved(campaign: Any, campaign_flow: Any) -> None:
    """Approve the broad campaign, send it to the local API, rerun it: duplicates?"""
    from collections import Counter

    from sqlalchemy import func, select

    from mailflow.settings import get_settings
    from mailflow.sink.testing import running_sink
    from mailflow.warehouse.engine import get_engine
    from mailflow.warehouse.schema import send_ledger
    from tests.campaigns.approval import resume_when_paused

    answer = {"approve": True, "approver": "bench@example.com", "comment": "bench"}
    with running_sink(process=True) as sink:
        os.environ["MAILFLOW_SENDGRID_HOST"] = sink.url
        get_settings.cache_clear()
        runs = []
        for attempt in ("first", "rerun"):
            thread = resume_when_paused(campaign.name, answer, limit_s=600)
            start = time.perf_counter()
            summary = campaign_flow(**campaign.definition(), approval_timeout_s=600)
            runs.append((attempt, summary, time.perf_counter() - start))
            thread.join(10)
        accepted: list[dict[str, Any]] = []
        while page := sink.messages(limit=1000, offset=len(accepted)):
            accepted += page
    with get_engine().connect() as conn:
        rows, keys = conn.execute(
            select(func.count(), func.count(send_ledger.c.dedupe_key.distinct())).where(
                send_ledger.c.trigger == campaign.trigger
            )
        ).one()
    per_ledger_id = Counter(
        m["payload"]["personalizations"][0]["custom_args"]["ledger_id"] for m in accepted
    )
    for attempt, summary, took in runs:
        print(f"approved send {campaign.name} ({attempt}): sent {summary.sent:,}, pending "
              f"{summary.pending:,}, held out {summary.arms.get('holdout', 0):,}, "
              f"{took:.1f}s wall incl. approval")  # fmt: skip
    dup = sum(n - 1 for n in per_ledger_id.values() if n > 1)
    later = sum(1 for m in accepted if "send_at" in m["payload"])
    print(f"scheduled with send_at (outside the recipient's local send window): {later:,}")
    print(f"ledger rows {rows:,} for {keys:,} distinct keys; local API accepted "
          f"{len(accepted):,} messages for {len(per_ledger_id):,} ledger ids; "
          f"duplicates {dup}")  # fmt: skip


if __name__ == "__main__":
    main()
