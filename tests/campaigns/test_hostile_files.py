"""Campaign files built to crash or stall the loader are refused quickly, with the limit named."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailflow.campaigns.model import MAX_CAMPAIGN_BYTES, CampaignError, load_campaign

HEAD = """name: hostile
template: campaign_spring
variants: [{name: control, share: 1.0, subject: {en: Hello}}]
"""


def refused(tmp_path: Path, text: str, match: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    started = time.monotonic()
    with pytest.raises(CampaignError, match=match) as err:
        load_campaign(path)
    assert time.monotonic() - started < 1.0
    message = str(err.value)
    assert str(path) in message and len(message) < 1000  # never the whole value repeated
    return message


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for n in range(1, 9):
        refs = ",".join(f"*{chr(96 + n)}" for _ in range(9))
        lines.append(f"{chr(97 + n)}: &{chr(97 + n)} [{refs}]")
    refused(tmp_path, HEAD + "\n".join(lines) + "\nsegment: *i\n", r"aliases \(\*name\)")


def test_deeply_nested_yaml_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    deep = "segment: " + "[" * 5000 + "]" * 5000 + "\n"
    refused(tmp_path, HEAD + deep, r"nested more than 40 levels deep")


def test_a_segment_nested_too_deep_is_refused_by_the_loader(tmp_path: Path) -> None:
    segment = "{field: country, op: eq, value: DE}"
    for _ in range(11):
        segment = "{not: " + segment + "}"
    refused(tmp_path, HEAD + f"segment: {segment}\n", r"nests more than 10 levels deep")


def test_too_many_conditions_are_refused(tmp_path: Path) -> None:
    many = ", ".join("{field: country, op: eq, value: DE}" for _ in range(90))
    segment = "{any: [" + ", ".join(f"{{all: [{many}]}}" for _ in range(3)) + "]}"
    refused(tmp_path, HEAD + f"segment: {segment}\n", r"more than 200 conditions")


def test_an_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    big = HEAD + "description: " + "x" * MAX_CAMPAIGN_BYTES + "\n"
    refused(tmp_path, big, rf"over the {MAX_CAMPAIGN_BYTES} a campaign file may have")
