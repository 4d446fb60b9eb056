"""What a marketer sees before approving: audience, exclusions, arms, sample messages.

Pure pieces: the counts as data, sample files on disk, and the Markdown shown in the
Prefect UI (an artifact, and the description of the approval form).
"""

from __future__ import annotations

import html
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mailflow.campaigns.assign import HOLDOUT
from mailflow.campaigns.model import Campaign
from mailflow.campaigns.segments import describe_segment

_SAFE = re.compile(r"[^a-z0-9_-]+")


@dataclass
class Sample:
    """One rendered message of the preview."""

    arm: str
    customer_id: int
    email: str
    locale: str
    template_variant: str | None
    subject: str
    html: str
    text: str
    send_at: int | None = None
    html_path: str | None = None
    text_path: str | None = None


@dataclass
class Preview:
    """The preview's numbers (stored with the approval request) and its samples."""

    campaign: str
    definition_hash: str
    found: int  # customers the segment matches
    excluded: dict[str, int]  # by reason, SQL exclusions and ``quarantined``
    eligible: int  # after exclusions and validation: recipients plus holdout
    arms: dict[str, int]  # per variant and ``holdout``
    samples: list[Sample] = field(default_factory=list)
    gate_error: str | None = None

    @property
    def recipients(self) -> int:
        """Messages that would be sent (the holdout is not)."""
        return sum(n for arm, n in self.arms.items() if arm != HOLDOUT)

    def line(self) -> str:
        """One log line: who matches, who is left out and why, the arms."""
        return (
            f"campaign {self.campaign}: {self.found} match, excluded "
            f"{self.excluded or 'none'}, arms {self.arms}"
        )

    def counts(self) -> dict[str, Any]:
        """JSON-friendly numbers, without the samples."""
        data = asdict(self)
        data.pop("samples")
        data["recipients"] = self.recipients
        return data


def write_samples(samples: list[Sample], directory: Path) -> None:
    """Write each sample's HTML and text next to each other; fills their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    for n, s in enumerate(samples, 1):
        stem = f"{n:02d}-{_SAFE.sub('_', s.arm)}-{s.locale}-customer{s.customer_id}"
        html_file = directory / f"{stem}.html"
        text_file = directory / f"{stem}.txt"
        html_file.write_text(s.html, encoding="utf-8")
        text_file.write_text(f"Subject: {s.subject}\n\n{s.text}", encoding="utf-8")
        s.html_path, s.text_path = str(html_file.resolve()), str(text_file.resolve())


def _md_cell(text: object) -> str:
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def preview_markdown(campaign: Campaign, preview: Preview) -> str:
    """The preview as Markdown: the numbers, the segment, links to the sample files."""
    lines = [
        f"# Campaign `{campaign.name}` — preview",
        "",
        f"{_md_cell(campaign.description)}" if campaign.description else "",
        f"**{preview.recipients:,} messages would be sent** ({campaign.kind}); "
        f"{preview.arms.get(HOLDOUT, 0):,} held out (recorded, not sent). "
        f"Definition `{preview.definition_hash}`.",
        "",
        "| step | count |",
        "|---|---:|",
        f"| segment matches | {preview.found:,} |",
    ]
    lines += [f"| excluded: {_md_cell(k)} | {v:,} |" for k, v in sorted(preview.excluded.items())]
    lines.append(f"| eligible | {preview.eligible:,} |")
    lines += [""]
    lines += ["| arm | share | recipients | subject (default locale) |", "|---|---:|---:|---|"]
    for v in campaign.variants:
        share = v.share * (1 - campaign.holdout_share)
        subject = v.subject_for(campaign.default_locale, campaign.default_locale)
        lines.append(
            f"| {v.name} | {share:.1%} | {preview.arms.get(v.name, 0):,} | {_md_cell(subject)} |"
        )
    if campaign.holdout_share:
        lines.append(
            f"| holdout | {campaign.holdout_share:.1%} | {preview.arms.get(HOLDOUT, 0):,} | "
            "(not sent) |"
        )
    window = campaign.send_window
    lines += [
        "",
        "**Send window:** "
        + (
            f"{window.start:%H:%M}–{window.end:%H:%M} in each recipient's timezone, "
            f"on {', '.join(window.days)}; outside it a message is scheduled for the next "
            "opening (SendGrid send_at, at most 72 h ahead) or left for a later run."
            if window
            else "none (sent at once)."
        ),
        f"**Locales:** default `{campaign.default_locale}`, unknown locales: "
        f"{campaign.unknown_locale}.",
        "",
        "**Segment:**",
        "",
        "```",
        describe_segment(campaign.segment),
        "```",
    ]
    if preview.gate_error:
        lines += ["", f"**Validation gate failed:** {_md_cell(preview.gate_error)}"]
    if preview.samples:
        lines += ["", "## Sample messages", "", "| arm | locale | variant | subject | files |"]
        lines.append("|---|---|---|---|---|")
        for s in preview.samples:
            files = (
                f"[HTML]({Path(s.html_path).as_uri()}) · [text]({Path(s.text_path).as_uri()})"
                if s.html_path and s.text_path
                else "–"
            )
            lines.append(
                f"| {s.arm} | {s.locale} | {s.template_variant or 'default'} | "
                f"{_md_cell(s.subject)} | {files} |"
            )
    return "\n".join(line for line in lines if line is not None)
