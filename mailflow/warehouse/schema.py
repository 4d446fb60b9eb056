"""Warehouse schema (SQLAlchemy Core).

Conventions, so that the same SQL runs on SQLite and PostgreSQL:
- every timestamp is a naive ``DateTime`` holding UTC;
- money is ``Numeric(12, 2)``;
- booleans are ``Boolean``; free-form payloads are ``JSON``.

The source tables (customers … orders) model a typical shop; the ``mf_`` tables are
mailflow's own. Alembic migrations under ``mailflow/migrations`` create them.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    false,
)

# Naming convention so constraint names are the same on every dialect (Alembic needs names).
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# BigInteger ids that are still SQLite rowid aliases (autoincrement) on SQLite.
Id = BigInteger().with_variant(Integer(), "sqlite")

# --- the shop (source data) -------------------------------------------------------------

customers = Table(
    "customers",
    metadata,
    Column("id", Id, primary_key=True),
    Column("email", String(320), nullable=True),
    Column("first_name", String(200), nullable=True),
    Column("last_name", String(200), nullable=True),
    Column("locale", String(16), nullable=False, server_default="en"),
    Column("timezone", String(64), nullable=False, server_default="UTC"),
    Column("country", String(2), nullable=True),
    Column("marketing_consent", Boolean, nullable=False, server_default=false()),
    Column("lifetime_value", Numeric(12, 2), nullable=False, server_default="0"),
    Column("created_at", DateTime, nullable=False),
)

products = Table(
    "products",
    metadata,
    Column("id", Id, primary_key=True),
    Column("sku", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("category", String(64), nullable=True),
    Column("price", Numeric(12, 2), nullable=False),
    Column("image_url", String(500), nullable=True),
)

carts = Table(
    "carts",
    metadata,
    Column("id", Id, primary_key=True),
    Column("customer_id", Id, ForeignKey("customers.id"), nullable=False, index=True),
    Column("created_at", DateTime, nullable=False),
    # Last activity on the cart; "idle" is measured from here.
    Column("updated_at", DateTime, nullable=False, index=True),
)

cart_items = Table(
    "cart_items",
    metadata,
    Column("id", Id, primary_key=True),
    Column("cart_id", Id, ForeignKey("carts.id"), nullable=False, index=True),
    Column("product_id", Id, ForeignKey("products.id"), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price", Numeric(12, 2), nullable=False),
)

orders = Table(
    "orders",
    metadata,
    Column("id", Id, primary_key=True),
    Column("customer_id", Id, ForeignKey("customers.id"), nullable=False, index=True),
    # The cart this order was placed from, if any: such a cart is no longer abandoned.
    Column("cart_id", Id, ForeignKey("carts.id"), nullable=True, index=True),
    Column("status", String(32), nullable=False, server_default="placed"),
    Column("total", Numeric(12, 2), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

# --- mailflow's own tables ----------------------------------------------------------------

#: Every planned message, one row per dedupe key, written *before* the send.
#: ``status`` is a :class:`mailflow.ledger.Status`; ``mailflow/ledger.py`` owns every
#: write to this table. ``email`` is stored trimmed and lower-cased.
send_ledger = Table(
    "mf_send_ledger",
    metadata,
    Column("id", Id, primary_key=True),
    Column("dedupe_key", String(255), nullable=False, unique=True),
    Column("trigger", String(64), nullable=False),
    Column("customer_id", Id, nullable=True),
    Column("email", String(320), nullable=False),
    Column("variant", String(64), nullable=True),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("provider_message_id", String(128), nullable=True),
    # What the renderer needs, so a later run can resume without re-extracting.
    Column("context", JSON, nullable=False),
    Column("flow_run_id", String(64), nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("claimed_at", DateTime, nullable=True),
    Column("sent_at", DateTime, nullable=True),
    Index("ix_mf_send_ledger_trigger_status", "trigger", "status"),
    Index("ix_mf_send_ledger_flow_run_id", "flow_run_id"),
    # "Did this customer / this address get this trigger lately?" — the cooldown and
    # frequency-cap lookups of every extraction, one per candidate row. Without the
    # trigger in the key, SQLite's planner prefers (trigger, status) and scans every
    # message of the trigger for each candidate.
    Index("ix_mf_send_ledger_customer_trigger", "customer_id", "trigger", "created_at"),
    Index("ix_mf_send_ledger_email_trigger", "email", "trigger", "created_at"),
    Index("ix_mf_send_ledger_updated_at", "updated_at"),
)

#: Runs that stopped on a refused key: batches of the run in other processes (the Dask
#: runner) find the mark here before they send (``mailflow.ledger.mark_stopped``).
run_stops = Table(
    "mf_run_stops",
    metadata,
    Column("flow_run_id", String(64), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("stopped_at", DateTime, nullable=False),
)

#: What was decided about a ledger row after it was tried (``mailflow.ledger``): confirmed
#: by a provider event, handed back to be sent again, skipped or expired as stale.
ledger_history = Table(
    "mf_ledger_history",
    metadata,
    Column("id", Id, primary_key=True),
    Column("ledger_id", Id, nullable=False, index=True),
    Column("from_status", String(16), nullable=False),
    Column("to_status", String(16), nullable=False),
    Column("decision", String(32), nullable=False),
    Column("reason", Text, nullable=True),
    Column("flow_run_id", String(64), nullable=True),
    Column("at", DateTime, nullable=False, index=True),
)

#: Rows that failed validation, per run, with the expectation that failed.
quarantine = Table(
    "mf_quarantine",
    metadata,
    Column("id", Id, primary_key=True),
    Column("flow_run_id", String(64), nullable=True, index=True),
    Column("trigger", String(64), nullable=False),
    Column("dedupe_key", String(255), nullable=True),
    Column("customer_id", Id, nullable=True),
    Column("email", String(320), nullable=True),
    Column("expectation", String(128), nullable=False),
    Column("column_name", String(128), nullable=True),
    Column("reason", Text, nullable=False),
    Column("row", JSON, nullable=True),
    Column("created_at", DateTime, nullable=False),
)

#: Addresses nobody may email (bounces, complaints, unsubscribes, manual entries).
#: ``email`` is stored lower-cased and compared with ``lower(customers.email)``.
suppressions = Table(
    "mf_suppressions",
    metadata,
    Column("id", Id, primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("reason", String(64), nullable=False),
    Column("source", String(255), nullable=True),
    Column("created_at", DateTime, nullable=False),
)

#: Engagement events from SendGrid's Event Webhook, one row per event (deduplicated:
#: SendGrid delivers at least once). ``natural_key`` is a hash of (message id, event,
#: timestamp, email), for duplicates that arrive with another ``sg_event_id``.
events = Table(
    "mf_events",
    metadata,
    Column("id", Id, primary_key=True),
    Column("sg_event_id", String(128), nullable=True, unique=True),
    Column("natural_key", String(64), nullable=False, unique=True),
    Column("event", String(32), nullable=False),
    Column("email", String(320), nullable=True, index=True),
    Column("occurred_at", DateTime, nullable=False, index=True),
    Column("sg_message_id", String(128), nullable=True, index=True),
    Column("ledger_id", Id, nullable=True, index=True),
    Column("trigger", String(64), nullable=True),
    Column("url", Text, nullable=True),
    Column("reason", Text, nullable=True),
    Column("bounce_type", String(32), nullable=True),
    # An open SendGrid flags ``sg_machine_open`` (Apple Mail Privacy Protection and the
    # like fetch the pixel on delivery, whether or not anyone reads): migration 0013.
    Column("machine_open", Boolean, nullable=False, server_default=false()),
    Column("raw", JSON, nullable=False),
    Column("received_at", DateTime, nullable=False, index=True),
)

#: One row per flow run: what it found, excluded, quarantined, sent, failed.
run_log = Table(
    "mf_runs",
    metadata,
    Column("id", Id, primary_key=True),
    Column("flow_run_id", String(64), nullable=True, index=True),
    Column("trigger", String(64), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
    Column("summary", JSON, nullable=True),
)

# --- engagement metrics (built by flows/engagement_rollup.py; see the README's data dictionary)

#: Which message each converting order is credited to (last touch), so an incremental
#: rollup also recomputes the customer an order was credited to before it moved.
order_attribution = Table(
    "mf_order_attribution",
    metadata,
    Column("order_id", Id, primary_key=True, autoincrement=False),
    Column("ledger_id", Id, nullable=False, index=True),
    Column("customer_id", Id, nullable=False, index=True),
)

#: One row per sent message (ledger row in ``sent``): what happened to it afterwards.
message_facts = Table(
    "mf_message_facts",
    metadata,
    Column("ledger_id", Id, primary_key=True, autoincrement=False),
    Column("trigger", String(64), nullable=False),
    Column("variant", String(64), nullable=False),
    Column("customer_id", Id, nullable=True, index=True),
    Column("send_day", Date, nullable=False, index=True),
    Column("sent_at", DateTime, nullable=False),
    Column("delivered_at", DateTime, nullable=True),
    Column("bounced", Boolean, nullable=False),
    Column("blocked", Boolean, nullable=False),
    Column("dropped", Boolean, nullable=False),
    Column("deferred", Boolean, nullable=False),
    Column("opens", Integer, nullable=False),  # human opens (not ``machine_open``)
    Column("first_open_at", DateTime, nullable=True),  # first human open
    Column("clicks", Integer, nullable=False),
    Column("first_click_at", DateTime, nullable=True),
    Column("unsubscribed", Boolean, nullable=False),
    Column("spam_reported", Boolean, nullable=False),
    Column("orders", Integer, nullable=False),
    Column("first_order_id", Id, nullable=True),
    Column("revenue", Numeric(12, 2), nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("machine_opens", Integer, nullable=False, server_default="0"),  # migration 0013
)

#: One row per (trigger, variant, send day): the message facts added up (metrics contract
#: v2, docs/metrics.md; rebuilt with this shape by migration 0013).
metrics_daily = Table(
    "mf_metrics_daily",
    metadata,
    Column("trigger", String(64), primary_key=True),
    Column("variant", String(64), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("sent", Integer, nullable=False),
    Column("delivered", Integer, nullable=False),
    Column("bounced", Integer, nullable=False),
    Column("blocked", Integer, nullable=False),
    Column("dropped", Integer, nullable=False),
    Column("deferred", Integer, nullable=False),
    Column("unique_opens", Integer, nullable=False),
    Column("unique_clicks", Integer, nullable=False),
    Column("opens", Integer, nullable=False),
    Column("clicks", Integer, nullable=False),
    Column("unique_machine_opens", Integer, nullable=False),
    Column("machine_opens", Integer, nullable=False),
    Column("unsubscribes", Integer, nullable=False),
    Column("spam_reports", Integer, nullable=False),
    Column("conversions_last_touch", Integer, nullable=False),
    Column("orders", Integer, nullable=False),
    Column("revenue", Numeric(14, 2), nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("median_seconds_to_open", Float, nullable=True),
    Column("p90_seconds_to_open", Float, nullable=True),
    Column("median_seconds_to_click", Float, nullable=True),
    Column("p90_seconds_to_click", Float, nullable=True),
)

#: Where each incremental job got to (one row per job name).
rollup_state = Table(
    "mf_rollup_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("last_event_id", BigInteger, nullable=False),
    Column("last_started_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

LEDGER_STATES = ("planned", "sending", "sent", "failed", "skipped", "expired", "unknown")
TERMINAL_STATES = ("sent", "failed", "skipped", "expired", "unknown")

# --- more triggers (migration 0004) ---------------------------------------------------------

#: Source data: one row per change of an order's status (``placed``, ``shipped``,
#: ``delivered``, ``cancelled``, ...), as a shop's order system records it. ``orders.status``
#: is the latest of them; the ``order_status`` trigger reads this history.
order_status_history = Table(
    "order_status_history",
    metadata,
    Column("id", Id, primary_key=True),
    Column("order_id", Id, ForeignKey("orders.id"), nullable=False, index=True),
    Column("status", String(32), nullable=False),
    Column("changed_at", DateTime, nullable=False, index=True),
)

#: Where an event-based trigger got to: one row per trigger. ``watermark`` is the start
#: (naive UTC) of the last run that finished cleanly; the next run scans from it minus the
#: trigger's lookback. Set it back to replay; the dedupe key keeps a replay from resending.
watermarks = Table(
    "mf_watermarks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("watermark", DateTime, nullable=False),
    Column("flow_run_id", String(64), nullable=True),
    Column("updated_at", DateTime, nullable=False),
)

#: Addresses mailflow pushed to a provider's suppression list (``mailflow.provider_suppressions``,
#: migration 0012): one row per address and list, so each is pushed once. ``provider_list``
#: is e.g. ``sendgrid:unsubscribes`` (SendGrid's global unsubscribes).
suppression_pushes = Table(
    "mf_suppression_pushes",
    metadata,
    Column("email", String(320), primary_key=True),
    Column("provider_list", String(64), primary_key=True),
    Column("pushed_at", DateTime, nullable=False),
)

# The welcome trigger scans new sign-ups, the weekly digest the customers of due timezones.
Index("ix_customers_created_at", customers.c.created_at)
Index("ix_customers_timezone", customers.c.timezone)

# --- campaigns (mailflow/campaigns; migration 0005) --------------------------------------------

#: One row per campaign name: its latest definition. ``trigger`` (``campaign:<name>``) is
#: the ledger's ``trigger`` for the campaign's messages; ``kind`` decides consent, the
#: unsubscribe headers and the frequency cap.
campaigns = Table(
    "mf_campaigns",
    metadata,
    Column("name", String(48), primary_key=True),
    Column("trigger", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("template", String(64), nullable=False),
    Column("definition", JSON, nullable=False),
    Column("definition_hash", String(16), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

#: One row per approval request (a campaign run that reached its preview and paused):
#: ``decision`` is ``pending``, ``approved``, ``rejected`` or ``timed_out``; who decided,
#: when, their comment, and the preview's counts they saw.
campaign_approvals = Table(
    "mf_campaign_approvals",
    metadata,
    Column("id", Id, primary_key=True),
    Column("campaign", String(48), nullable=False, index=True),
    Column("flow_run_id", String(64), nullable=True, index=True),
    Column("definition_hash", String(16), nullable=False),
    Column("decision", String(16), nullable=False),
    Column("approver", String(200), nullable=True),
    Column("comment", Text, nullable=True),
    Column("preview", JSON, nullable=True),
    Column("requested_at", DateTime, nullable=False),
    Column("decided_at", DateTime, nullable=True),
)

#: One row per (campaign, customer) ever assigned: the arm (a variant name or
#: ``holdout``) and when. Holdout rows are never sent; they are the comparison group.
#: The variant rows' messages are in mf_send_ledger under ``campaign:<name>:<customer_id>``.
campaign_assignments = Table(
    "mf_campaign_assignments",
    metadata,
    Column("campaign", String(48), primary_key=True),
    Column("customer_id", Id, primary_key=True, autoincrement=False),
    Column("arm", String(32), nullable=False),
    Column("assigned_at", DateTime, nullable=False),
    Column("flow_run_id", String(64), nullable=True),
    Index("ix_mf_campaign_assignments_campaign_arm", "campaign", "arm"),
)

#: One row per (campaign, arm, metric): the experiment's results, rebuilt on demand.
#: ``arm`` is a variant, ``holdout``, or ``all_variants`` (the campaign as a whole);
#: ``metric`` is ``sent``, ``delivered``, ``open``, ``click``, ``click_to_open`` or
#: ``itt_conversion`` (docs/metrics.md; ``conversion`` before migration 0013). Rates are
#: numerator / denominator with a 95 % Wilson interval; the differences are against the
#: control arm (the first variant) and the holdout, with two-proportion z-test p-values.
campaign_results = Table(
    "mf_campaign_results",
    metadata,
    Column("campaign", String(48), primary_key=True),
    Column("arm", String(32), primary_key=True),
    Column("metric", String(16), primary_key=True),
    Column("numerator", Integer, nullable=False),
    Column("denominator", Integer, nullable=False),
    Column("rate", Float, nullable=True),
    Column("ci_low", Float, nullable=True),
    Column("ci_high", Float, nullable=True),
    Column("control_arm", String(32), nullable=True),
    Column("diff_vs_control", Float, nullable=True),
    Column("diff_ci_low", Float, nullable=True),
    Column("diff_ci_high", Float, nullable=True),
    Column("p_value_vs_control", Float, nullable=True),
    Column("lift_vs_holdout", Float, nullable=True),
    Column("p_value_vs_holdout", Float, nullable=True),
    Column("computed_at", DateTime, nullable=False),
    # Migration 0013: "not significant", "higher" or "lower" (two-sided, p < 0.05).
    Column("verdict_vs_control", String(16), nullable=True),
    Column("verdict_vs_holdout", String(16), nullable=True),
)

#: One row per (campaign, arm incl. ``holdout``): the configured split beside the observed
#: one and the campaign's sample-ratio-mismatch check (chi-square goodness of fit of the
#: assigned counts against the configured shares; ``srm`` when p < 0.001). Migration 0013.
campaign_split = Table(
    "mf_campaign_split",
    metadata,
    Column("campaign", String(48), primary_key=True),
    Column("arm", String(32), primary_key=True),
    Column("configured_share", Float, nullable=False),
    Column("assigned", Integer, nullable=False),
    Column("expected", Float, nullable=False),
    Column("observed_share", Float, nullable=True),
    Column("srm_chi2", Float, nullable=True),
    Column("srm_p_value", Float, nullable=True),
    Column("srm", Boolean, nullable=False),
    Column("computed_at", DateTime, nullable=False),
)
