"""``mailflow campaign preview`` and campaign files: what a marketer sees."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailflow.campaigns.model import CampaignError, load_campaign
from mailflow.cli import app
from mailflow.settings import PROJECT_ROOT
from mailflow.warehouse.engine import get_engine
from tests.campaigns.shop import Person, add_people


def test_example_campaign_files_are_valid() -> None:
    for path in sorted((PROJECT_ROOT / "campaigns").glob("*.yaml")):
        campaign = load_campaign(path)
        assert campaign.name and campaign.variants


def test_preview_prints_audience_exclusions_and_writes_samples(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    add_people(
        get_engine(),
        [Person(f"de{i}@example.com", ordered_days_ago=3) for i in range(20)]
        + [Person("no@example.com", consent=False, ordered_days_ago=3)],
    )
    out = tmp_path / "samples"
    result = CliRunner().invoke(
        app,
        [
            "campaign",
            "preview",
            str(PROJECT_ROOT / "campaigns" / "spring_sale.yaml"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "segment matches" in result.output and "no_consent" in result.output
    assert len(list(out.glob("*.html"))) == 6 and len(list(out.glob("*.txt"))) == 6
    text = next(iter(sorted(out.glob("*.txt")))).read_text()
    assert text.startswith("Subject: ")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: x\ntemplate: campaign_spring\nsegment: {field: country, op: eq, value: DE}\n"
         "variants: [{name: a, share: 0.7, subject: s}, {name: b, share: 0.7, subject: s}]\n",
         "shares add up to 1.4"),
        ("name: x\ntemplate: campaign_spring\nsegment: {field: country, op: eq, value: DE}\n"
         "variants: [{name: a, share: 1, subject: s}]\nsend_window: {start: 8:00, end: '21:00'}\n",
         "write the time in quotes"),
        ("name: Bad Name\ntemplate: t\nsegment: {field: country, op: eq, value: DE}\n"
         "variants: [{name: a, share: 1, subject: s}]\n", "not a valid campaign name"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_campaign_files_name_the_problem_and_the_fix(
    tmp_path: Path, body: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(body)
    with pytest.raises(CampaignError, match=message):
        load_campaign(path)
