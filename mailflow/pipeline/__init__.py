"""The one pipeline every trigger and every campaign runs, without Prefect.

extract ──> validate ──> plan ──> render ──> send ──> record

Rooms (each a module here):

- ``resources``: what the pipeline talks to — settings, the warehouse engine, the
  renderer, the mailer factory — built from the environment in one place.
- ``preflight``: checks before anything is planned (keys, guardrail, templates).
- ``audience``: extract (the trigger's SQL with exclusions, :mod:`mailflow.extract`),
  validate (the trigger's suite) and quarantine the bad rows.
- ``plan``: a ``planned`` ledger row per message, then batches of ledger ids.
- ``message``: one claimed ledger row → one rendered :class:`OutboundMessage`.
- ``send``: one batch — claim, render, send through the ``Mailer``, settle.
- ``summary``: what one run did, completed from the ledger and stored in ``mf_runs``.
- ``options``: the options every sending flow takes (batch size, bad-row share).
- ``campaign``: a campaign's hooks around the same stages (arms and holdout, preview,
  approval decisions).

Prefect tasks (``tasks/``) are thin wrappers around these functions; flows only put the
tasks in order. The ledger (:mod:`mailflow.ledger`) decides what may be sent.
"""
