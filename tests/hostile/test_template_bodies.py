"""Hostile template bodies and subjects through the real renderer (Jinja2's immutable
sandbox): each is refused with a TemplateError naming the file and the problem, quickly
and without building a huge value, or rendered safely (one-line subject, escaped HTML)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from mailflow.errors import TemplateError
from mailflow.render import Renderer
from mailflow.settings import TEMPLATES_DIR
from tests.hostile.conftest import Corpus
from tests.mailflow.test_render import cart_context

RENDERED = "rendered"

# (case, part file under abandoned_cart/en/, its content, text the error must hold or RENDERED)
CASES: list[tuple[str, str, str, str]] = [
    ("mro walk", "body.html", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("globals via cycler", "body.html", "{{ cycler.__init__.__globals__ }}", "unsafe"),
    ("globals via lipsum", "body.txt", "{{ lipsum.__globals__['os'] }}", "unsafe"),
    ("attr filter", "body.txt", "{{ customer.first_name|attr('__class__') }}", "unsafe"),
    ("dunder on data", "body.txt", "{{ customer.__dict__ }}", "no attribute '__dict__'"),
    ("mutate a list", "body.txt", "{% set x = [] %}{{ x.append(1) }}", "unsafe"),
    ("huge range", "body.txt", "{% for i in range(10**7) %}x{% endfor %}", "Range too big"),
    ("string repetition", "body.txt", "{{ 'a' * 10**9 }}", "repeating a value"),
    ("list repetition", "body.txt", "{{ ([1] * 10**9)|length }}", "repeating a value"),
    ("huge exponent", "body.txt", "{{ 9 ** 9999999 }}", "exponent"),
    ("printf width", "body.txt", "{{ '%999999999d' % 1 }}", "format width"),
    ("format filter precision", "body.txt", "{{ '%.999999999f'|format(1) }}", "format width"),
    ("center method", "body.txt", "{{ 'x'.center(10**9) }}", "width"),
    ("center filter", "body.txt", "{{ 'x'|center(10**9) }}", "width"),
    ("indent filter", "body.txt", "{{ 'x\ny'|indent(10**9) }}", "width"),
    (
        "nested loops over long strings",
        "body.txt",
        "{% for a in 'x' * 100000 %}{% for b in 'y' * 100000 %}{% endfor %}{% endfor %}",
        "loops took more than",
    ),
    (
        "loop inside a recursive-free macro",
        "body.txt",
        "{% macro m() %}{% for a in 'x' * 99999 %}{% endfor %}{% endmacro %}{{ m() }}{{ m() }}",
        "loops took more than",
    ),
    ("str.format width", "body.txt", "{{ '{:999999999}'.format(1) }}", "format width"),
    ("str.format width argument", "body.txt", "{{ '{:{}}'.format(1, 10**9) }}", "width"),
    (
        "replace filter",
        "body.txt",
        "{{ ('x' * 100000)|replace('x', 'y' * 1000) }}",
        "a replace building",
    ),
    ("replace method", "body.txt", "{{ ('x' * 1000).replace('x', 'y' * 1000) }}", "a replace"),
    (
        "loops over the cart",
        "body.txt",
        "{% for i in cart['items'] %}{% for c in i.name %}{{ loop.index }}{% endfor %}{% endfor %}"
        " {{ '{:>5}'.format('ok') }} {{ 'abc'|replace('b', 'x') }}",
        RENDERED,
    ),
    ("unknown field", "body.txt", "{{ customer.password_hash }}", "password_hash"),
    ("include a system file", "body.txt", "{% include '/etc/passwd' %}", "does not exist"),
    ("include outside", "body.txt", "{% include '../../../etc/passwd' %}", "does not exist"),
    ("syntax error", "body.html", "{% if %}", "line 1"),
    ("unclosed block", "body.txt", "{% for x in cart.items %}", "line"),
    ("subject over 998", "subject.txt", "{{ 'x' * 999 }}", "over the 998"),
    ("empty subject", "subject.txt", "{{ '' }}", "subject is empty"),
    ("subject line break", "subject.txt", "Hi\r\nBcc: victim@example.com {{ '\x00' }}", RENDERED),
    (
        "format on markup",
        "body.html",
        "{{ '<b>%s</b>'|safe|format(customer.first_name) }}",
        RENDERED,
    ),
    ("small arithmetic", "body.txt", "{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ '%5d' % 3 }}", RENDERED),
]


@pytest.mark.category("template bodies")
def test_hostile_template_bodies(tmp_path: Path, corpus: Corpus) -> None:
    for i, (name, part, source, want) in enumerate(CASES):
        root = tmp_path / f"t{i}"
        shutil.copytree(TEMPLATES_DIR, root)
        target = root / "abandoned_cart" / "en" / part
        target.write_text(source, encoding="utf-8")
        context = cart_context(first_name="<script>alert(1)</script>", locale="en")
        started = time.monotonic()
        problems = []
        try:
            message = Renderer(root).render("abandoned_cart", context)
        except TemplateError as exc:
            text = str(exc)
            if want == RENDERED:
                problems.append(f"refused: {text[:200]}")
            else:
                if want not in text:
                    problems.append(f"the error does not say {want!r}: {text[:200]}")
                if f"abandoned_cart/en/{part}" not in text:
                    problems.append(f"the error does not name the file: {text[:200]}")
        except Exception as exc:  # noqa: BLE001 - anything else is a crash
            problems.append(f"{type(exc).__name__} escaped: {str(exc)[:200]}")
        else:
            if want != RENDERED:
                problems.append("rendered, expected a refusal")
            elif any(c in message.subject for c in "\r\n\x00"):
                problems.append(f"subject not one line: {message.subject!r}")
            elif "<script>alert" in message.html:
                problems.append("the name reached the HTML unescaped")
            elif "&amp;lt;" in message.html or "&lt;b&gt;" in message.html:
                problems.append("escaped twice")
        took = time.monotonic() - started
        if took > 2:
            problems.append(f"took {took:.1f} s")
        corpus.check(name, problems)
    corpus.done()
