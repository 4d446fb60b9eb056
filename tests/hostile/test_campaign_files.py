"""Hostile campaign files through the real CLI (``mailflow campaign preview FILE``): refused
with exit 1 and a message naming the file and the problem, quickly, never a traceback; or
previewed (a value that looks like SQL is only a value)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.hostile.cli import run_cli, squeeze
from tests.hostile.conftest import Corpus

HEAD = "name: hostile\ntemplate: campaign_spring\n"
VARIANTS = "variants: [{name: control, share: 1.0, subject: {en: Hello}}]\n"
SEGMENT = "segment: {field: country, op: eq, value: DE}\n"
GOOD = HEAD + VARIANTS + SEGMENT
PREVIEWED = "previewed"


def alias_bomb() -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for n in range(1, 9):
        refs = ",".join(f"*{chr(96 + n)}" for _ in range(9))
        lines.append(f"{chr(97 + n)}: &{chr(97 + n)} [{refs}]")
    return HEAD + VARIANTS + "\n".join(lines) + "\nsegment: *i\n"


def nested_segment(levels: int) -> str:
    segment = "{field: country, op: eq, value: DE}"
    for _ in range(levels):
        segment = "{all: [" + segment + "]}"
    return HEAD + VARIANTS + f"segment: {segment}\n"


def many_conditions(groups: int, each: int) -> str:
    group = "{any: [" + ", ".join("{field: country, op: eq, value: DE}" for _ in range(each)) + "]}"
    return HEAD + VARIANTS + "segment: {all: [" + ", ".join([group] * groups) + "]}\n"


def subject(text: str) -> str:
    return HEAD + SEGMENT + f"variants: [{{name: control, share: 1.0, subject: {text}}}]\n"


# (case, file content (bytes: written as is; None: the path is a folder), what the message
#  must say, or PREVIEWED)
CASES: list[tuple[str, str | bytes | None, str]] = [
    ("alias bomb", alias_bomb(), "aliases"),
    ("nested YAML", HEAD + VARIANTS + "segment: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("segment 11 levels", nested_segment(11), "nestsmorethan10levels"),
    ("210 conditions", many_conditions(3, 70), "morethan200conditions"),
    ("101 in one group", many_conditions(1, 101), "atmost100items"),
    ("over 256 KB", GOOD + "#" + "x" * 300_000 + "\n", "bytes,overthe"),
    ("not YAML", "name: [unclosed\n", "notvalidYAML"),
    ("not UTF-8", b"name: \xff\xfe\x00bad\n", "notUTF-8"),
    ("a folder", None, "cannotberead"),
    ("empty", "", "expectedamapping"),
    ("a list", "- a\n- b\n", "expectedamapping"),
    ("python tag", HEAD + "x: !!python/object/apply:os.system ['echo pwned']\n", "notvalidYAML"),
    ("unknown field", GOOD + "sql: DROP TABLE mf_send_ledger\n", "sql"),
    (
        "unknown segment field",
        HEAD + VARIANTS + "segment: {field: 'email; drop', op: eq, value: x}\n",
        "segment",
    ),
    ("template path traversal", GOOD.replace("campaign_spring", "../../etc"), "template"),
    ("missing template", GOOD.replace("campaign_spring", "no_such_template"), "no_such_template"),
    ("NUL in subject", subject('"Hi\\0there"'), "controlcharacter"),
    ("subject 201 characters", subject("s" * 201), "over200characters"),
    ("empty subject", subject('""'), "empty"),
    ("share over 1", GOOD.replace("share: 1.0", "share: 7"), "share"),
    (
        "SQL in a value",
        HEAD
        + VARIANTS
        + 'segment: {field: country, op: eq, value: "DE\'; DROP TABLE mf_customers; --"}\n',
        "ISO3166",
    ),
    ("CRLF in subject", subject('"Hi\\r\\nBcc: victim@example.com"'), PREVIEWED),
    ("byte order mark", "\ufeff" + GOOD, PREVIEWED),
    ("unicode subject", subject('"Frühling — 20 % 🙂"'), PREVIEWED),
]


@pytest.mark.category("campaign files")
def test_hostile_campaign_files(
    env: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    corpus: Corpus,
) -> None:
    for i, (name, content, want) in enumerate(CASES):
        path = tmp_path / f"case{i}.yaml"
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        started = time.monotonic()
        code, output = run_cli(
            ["campaign", "preview", str(path), "--out", str(tmp_path / f"out{i}")],
            monkeypatch,
            capsys,
        )
        took = time.monotonic() - started
        problems = []
        if "Traceback" in output:
            problems.append("a traceback reached the user: " + output[-400:])
        elif want == PREVIEWED:
            if code != 0:
                problems.append(f"exit {code}: {output[-300:]}")
        else:
            flat = squeeze(output)
            if code != 1:
                problems.append(f"exit {code}, expected 1")
            if want not in flat:
                problems.append(f"the message does not say {want!r}: {output[-300:]}")
            if squeeze(str(path)) not in flat and name not in ("missing template",):
                problems.append("the message does not name the file")
        if took > 5:
            problems.append(f"took {took:.1f} s")
        corpus.check(name, problems)
    corpus.done()
