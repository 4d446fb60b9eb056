"""Campaigns: segmented batch sends for marketers, through the one pipeline.

- :mod:`~mailflow.campaigns.model` — the definition (YAML under ``campaigns/`` or flow form);
- :mod:`~mailflow.campaigns.segments` — filters compiled to SQLAlchemy, never SQL text;
- :mod:`~mailflow.campaigns.assign` — deterministic arms and holdout;
- :mod:`~mailflow.campaigns.trigger` — the campaign as a trigger for the shared pipeline;
- :mod:`~mailflow.campaigns.window` — quiet hours in the recipient's timezone;
- :mod:`~mailflow.campaigns.preview` — audience, exclusions, samples before approval;
- :mod:`~mailflow.campaigns.stats` — experiment results for analysts;
- :mod:`~mailflow.campaigns.cli` — ``mailflow campaign preview|submit|approve``.
"""

from mailflow.campaigns.model import Campaign, CampaignError, load_campaign, parse_campaign

__all__ = ["Campaign", "CampaignError", "load_campaign", "parse_campaign"]
