"""Rendering: the real abandoned_cart templates, fallback, escaping, errors, money."""

from __future__ import annotations

import copy
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from mailflow.errors import PermanentMessageError, TemplateError
from mailflow.render import Renderer, format_money
from mailflow.settings import TEMPLATES_DIR

NBSP = "\u00a0"


def cart_context(**customer: Any) -> dict[str, Any]:
    """The context the abandoned_cart trigger hands to the renderer."""
    return {
        "customer": {
            "id": 17,
            "first_name": "Zoë",
            "email": "zoe@example.com",
            "locale": "de",
            "lifetime_value": "1520.00",
            **customer,
        },
        "cart": {
            "id": 123,
            "url": "https://shop.example.com/cart/123",
            "total": "1284.50",
            "currency": "EUR",
            "item_count": 3,
            "items": [
                {
                    "name": "Linen shirt",
                    "quantity": 1,
                    "unit_price": "49.00",
                    "line_total": "49.00",
                    "image_url": "https://shop.example.com/img/1.jpg",
                },
                {
                    "name": "Wool coat",
                    "quantity": 2,
                    "unit_price": "617.75",
                    "line_total": "1235.50",
                    "image_url": "https://shop.example.com/img/2.jpg",
                },
            ],
        },
        "shop": {
            "name": "Example Shop",
            "url": "https://shop.example.com",
            "support_email": "help@example.com",
            "address": "1 Example Street, Springfield",
        },
        "links": {"unsubscribe": "https://shop.example.com/u/TOKEN"},
    }


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(TEMPLATES_DIR)


@pytest.fixture
def tmp_templates(tmp_path: Path) -> Path:
    """A private copy of the real templates, free to break."""
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, target)
    return target


def line_of(path: Path, needle: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, start=1) if needle in line)


# -- languages and fallback ---------------------------------------------------------


@pytest.mark.parametrize(
    ("locale", "subject", "html_words", "text_words"),
    [
        (
            "en",
            "Zoë, your cart at Example Shop is waiting",
            ['lang="en"', "Return to your cart", "Qty 2", "€1,284.50"],
            ["Hi Zoë,", "Total: €1,284.50", "Wool coat (qty 2): €1,235.50"],
        ),
        (
            "de",
            "Zoë, Ihr Warenkorb bei Example Shop wartet",
            ['lang="de"', "Zum Warenkorb", "Menge 2", f"1.284,50{NBSP}€", "Abmelden"],
            ["Hallo Zoë,", f"Gesamt: 1.284,50{NBSP}€", "Fragen?"],
        ),
        (
            "fr",
            "Zoë, votre panier chez Example Shop vous attend",
            ['lang="fr"', "Revenir à mon panier", "Qté 2", f"1\u202f284,50{NBSP}€"],
            ["Bonjour Zoë,", f"Total : 1\u202f284,50{NBSP}€", "Se désabonner"],
        ),
        (
            "es",
            "Zoë, tu carrito en Example Shop te espera",
            ['lang="es"', "Volver a mi carrito", "Cant. 2", f"1284,50{NBSP}€"],
            ["Hola Zoë,", f"Total: 1284,50{NBSP}€", "Darse de baja"],
        ),
    ],
)
def test_each_locale_renders_in_its_language(
    renderer: Renderer, locale: str, subject: str, html_words: list[str], text_words: list[str]
) -> None:
    message = renderer.render("abandoned_cart", cart_context(), locale=locale)

    assert message.subject == subject
    assert message.locale == locale
    assert message.variant is None
    for word in html_words:
        assert word in message.html
    for word in text_words:
        assert word in message.text
    for part in (message.html, message.text):
        assert "https://shop.example.com/cart/123" in part
        assert "Linen shirt" in part
        assert "1 Example Street, Springfield" in part
    assert "https://shop.example.com/img/1.jpg" in message.html
    assert 2_000 <= len(message.html.encode()) <= 5_000


@pytest.mark.parametrize("locale", [None, "", "pt", "PT-br", "../../etc", "x" * 300])
def test_unknown_or_malformed_locale_falls_back_to_english(
    renderer: Renderer, locale: str | None
) -> None:
    message = renderer.render("abandoned_cart", cart_context(), locale=locale)

    assert message.locale == "en"
    assert message.subject == "Zoë, your cart at Example Shop is waiting"
    assert "Hi Zoë," in message.text


@pytest.mark.parametrize("locale", ["de-AT", "de_at", "DE", " de "])
def test_regional_locale_uses_its_language(renderer: Renderer, locale: str) -> None:
    message = renderer.render("abandoned_cart", cart_context(), locale=locale)

    assert message.locale == "de"
    assert "Hallo Zoë," in message.text


def test_regional_folder_wins_and_falls_back_to_its_language(tmp_templates: Path) -> None:
    folder = tmp_templates / "abandoned_cart" / "de_at"
    folder.mkdir()
    (folder / "subject.txt").write_text("Servus, Ihr Warenkorb wartet\n", encoding="utf-8")
    text = (tmp_templates / "abandoned_cart" / "de" / "body.txt").read_text(encoding="utf-8")
    (folder / "body.txt").write_text(text.replace("Hallo", "Servus"), encoding="utf-8")
    renderer = Renderer(tmp_templates)

    message = renderer.render("abandoned_cart", cart_context(), locale="de-AT", variant="vip")

    # The most specific locale wins over the variant, part by part.
    assert message.subject == "Servus, Ihr Warenkorb wartet"  # de_at/subject.txt
    assert (message.locale, message.variant) == ("de", "vip")  # de/vip.body.html
    assert message.text.startswith("Servus Zoë,")  # de_at/body.txt
    assert f"Gesamt: 1.284,50{NBSP}€" in message.text  # money in German for de_at
    assert "Abmelden" in message.text  # the layout's words fall back from de_at to de


def test_missing_first_name_gets_a_greeting_without_a_name(renderer: Renderer) -> None:
    english = renderer.render("abandoned_cart", cart_context(first_name=None))
    german = renderer.render("abandoned_cart", cart_context(first_name=None), locale="de")

    assert english.subject == "Your cart at Example Shop is waiting"
    assert english.text.startswith("Hi there,")
    assert german.subject == "Ihr Warenkorb bei Example Shop wartet"
    assert german.text.startswith("Hallo,")


# -- variants -----------------------------------------------------------------------


def test_vip_variant_has_its_own_subject_and_perk(renderer: Renderer) -> None:
    default = renderer.render("abandoned_cart", cart_context())
    vip = renderer.render("abandoned_cart", cart_context(), variant="vip")

    assert vip.variant == "vip"
    assert vip.subject != default.subject
    assert "free express shipping" in vip.subject
    for part in (vip.html, vip.text):
        assert "express shipping is on us" in part
        assert "Linen shirt" in part  # the rest of the body is still there
    assert "express shipping" not in default.html + default.text


def test_vip_variant_in_german(renderer: Renderer) -> None:
    vip = renderer.render("abandoned_cart", cart_context(), locale="de", variant="vip")

    assert (vip.locale, vip.variant) == ("de", "vip")
    assert "Expressversand" in vip.subject
    assert "Expressversand" in vip.html and "Expressversand" in vip.text


@pytest.mark.parametrize("locale", ["fr", "es"])
def test_vip_falls_back_to_the_default_variant_in_the_readers_language(
    renderer: Renderer, locale: str
) -> None:
    vip = renderer.render("abandoned_cart", cart_context(), locale=locale, variant="vip")
    default = renderer.render("abandoned_cart", cart_context(), locale=locale)

    # Language beats variant: no English VIP text for a French reader.
    assert (vip.locale, vip.variant) == (locale, None)
    assert vip == default


@pytest.mark.parametrize("variant", ["gold", ""])
def test_unknown_or_empty_variant_renders_the_default(renderer: Renderer, variant: str) -> None:
    message = renderer.render("abandoned_cart", cart_context(), variant=variant)

    assert message.variant is None
    assert message == renderer.render("abandoned_cart", cart_context())


def test_variant_of_another_locale_is_used_when_the_readers_locale_has_no_folder(
    tmp_templates: Path,
) -> None:
    shutil.rmtree(tmp_templates / "abandoned_cart" / "fr")
    message = Renderer(tmp_templates).render(
        "abandoned_cart", cart_context(), locale="fr", variant="vip"
    )

    assert (message.locale, message.variant) == ("en", "vip")


# -- escaping, subject, unsubscribe -------------------------------------------------------


def test_html_is_autoescaped_and_text_is_not(renderer: Renderer) -> None:
    name = "<script>alert(1)</script>"
    message = renderer.render("abandoned_cart", cart_context(first_name=name))

    assert "<script>" not in message.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in message.html
    assert f"Hi {name}," in message.text
    assert message.subject.startswith(name)


def test_subject_is_collapsed_to_one_line(renderer: Renderer) -> None:
    message = renderer.render("abandoned_cart", cart_context(first_name="Zoë\r\nBcc: x@y.z"))

    assert message.subject == "Zoë Bcc: x@y.z, your cart at Example Shop is waiting"


def test_empty_subject_is_an_error(tmp_templates: Path) -> None:
    (tmp_templates / "abandoned_cart" / "en" / "subject.txt").write_text(
        "{{ customer.first_name or '' }}\n\n", encoding="utf-8"
    )
    renderer = Renderer(tmp_templates)

    with pytest.raises(TemplateError, match=r"templates/abandoned_cart/en/subject.txt: .*empty"):
        renderer.render("abandoned_cart", cart_context(first_name=None))


def test_unsubscribe_link_is_shown_when_given(renderer: Renderer) -> None:
    message = renderer.render("abandoned_cart", cart_context())

    assert '<a href="https://shop.example.com/u/TOKEN"' in message.html
    assert "Unsubscribe: https://shop.example.com/u/TOKEN" in message.text


@pytest.mark.parametrize("links", [{}, {"unsubscribe": None}, "absent"])
def test_missing_unsubscribe_link_renders_without_it(
    renderer: Renderer, links: dict[str, Any] | str
) -> None:
    context = cart_context()
    if links == "absent":
        del context["links"]
    else:
        context["links"] = links

    for locale in ("en", "de", "fr", "es"):
        message = renderer.render("abandoned_cart", context, locale=locale, variant="vip")
        assert "/u/" not in message.html + message.text
        assert "Unsubscribe" not in message.html + message.text
        assert "help@example.com" in message.html and "help@example.com" in message.text


def test_context_is_not_modified(renderer: Renderer) -> None:
    context = cart_context()
    before = copy.deepcopy(context)

    renderer.render("abandoned_cart", context, locale="de", variant="vip")

    assert context == before


# -- errors ---------------------------------------------------------------------------


def test_missing_field_names_the_file_line_and_field(renderer: Renderer) -> None:
    context = cart_context()
    del context["cart"]["total"]
    body = TEMPLATES_DIR / "abandoned_cart" / "en" / "body.html"
    line = line_of(body, "cart.total | money")

    with pytest.raises(TemplateError) as caught:
        renderer.render("abandoned_cart", context)

    message = str(caught.value)
    assert message.startswith(f"templates/abandoned_cart/en/body.html line {line}: ")
    assert "'cart' has no attribute 'total'" in message
    assert "check the field name" in message
    assert isinstance(caught.value, PermanentMessageError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_misspelt_field_in_a_template_is_reported(tmp_templates: Path) -> None:
    body = tmp_templates / "abandoned_cart" / "en" / "body.html"
    body.write_text(body.read_text(encoding="utf-8").replace("cart.total |", "cart.totl |"))
    line = line_of(body, "cart.totl")

    with pytest.raises(TemplateError) as caught:
        Renderer(tmp_templates).render("abandoned_cart", cart_context())

    message = str(caught.value)
    assert f"templates/abandoned_cart/en/body.html line {line}: 'cart' has no attribute 'totl'" in (
        message
    )


def test_missing_field_in_the_layout_names_the_layout(renderer: Renderer) -> None:
    context = cart_context()
    del context["shop"]["address"]

    with pytest.raises(TemplateError, match=r"templates/_layouts/base\.\w+ line \d+: 'shop'"):
        renderer.render("abandoned_cart", context)


def test_error_message_does_not_carry_the_rows_data(renderer: Renderer) -> None:
    context = cart_context()
    context["cart"]["total"] = {"secret": "zoe@example.com " * 100}

    with pytest.raises(TemplateError) as caught:
        renderer.render("abandoned_cart", context)

    message = str(caught.value)
    assert "zoe@example.com" not in message
    assert "money" in message and "dict" in message
    assert len(message) < 400


def test_syntax_error_names_file_and_line_at_render_and_in_check(tmp_templates: Path) -> None:
    broken = tmp_templates / "abandoned_cart" / "de" / "body.txt"
    broken.write_text(
        '{% extends "_layouts/base.txt" %}\n{% block content %}\n{{ cart.url }\n{% endblock %}\n',
        encoding="utf-8",
    )
    renderer = Renderer(tmp_templates)

    with pytest.raises(TemplateError, match=r"templates/abandoned_cart/de/body\.txt line 3: "):
        renderer.render("abandoned_cart", cart_context(), locale="de")
    renderer.render("abandoned_cart", cart_context(), locale="fr")  # other locales still work

    with pytest.raises(TemplateError) as caught:
        renderer.check("abandoned_cart")
    message = str(caught.value)
    assert message.startswith("template 'abandoned_cart' has 1 problem:")
    assert "templates/abandoned_cart/de/body.txt line 3: unexpected '}'" in message


def test_check_lists_every_problem(tmp_templates: Path) -> None:
    folder = tmp_templates / "abandoned_cart"
    (folder / "fr" / "body.html").write_text(
        '{% extends "_layouts/base.html" %}\n{% block content %}{% for x in cart.items %}'
        "{{ x.name }}{% endblock %}\n",
        encoding="utf-8",
    )
    (folder / "es" / "body.txt").write_text('{% extends "_layouts/bse.txt" %}\n', encoding="utf-8")
    (folder / "de" / "vip.subjet.txt").write_text("typo\n", encoding="utf-8")
    (folder / "de" / "body.txt").unlink()
    (tmp_templates / "_layouts" / "base.html").write_text(
        "{{ shop.name | no_such_filter }}\n", encoding="utf-8"
    )

    with pytest.raises(TemplateError) as caught:
        Renderer(tmp_templates).check("abandoned_cart")

    message = str(caught.value)
    assert "has 6 problems" in message
    assert "templates/abandoned_cart/de/ lacks body.txt" in message
    # de/vip.body.txt extends the deleted de/body.txt
    assert (
        "templates/abandoned_cart/de/vip.body.txt line 1: the template 'abandoned_cart/de/bo"
        in (message)
    )
    assert "templates/abandoned_cart/de/vip.subjet.txt: not a part name" in message
    assert "templates/abandoned_cart/fr/body.html line 2: " in message
    assert "templates/abandoned_cart/es/body.txt line 1: the template '_layouts/bse.txt'" in message
    assert "templates/_layouts/base.html line 1: No filter named 'no_such_filter' — " in message


def test_check_passes_on_the_real_templates(renderer: Renderer) -> None:
    renderer.check("abandoned_cart")
    renderer.check("abandoned_cart", sample=cart_context())
    renderer.check("abandoned_cart", sample=cart_context(first_name=None))


def test_check_with_a_sample_finds_runtime_errors(tmp_templates: Path) -> None:
    subject = tmp_templates / "abandoned_cart" / "es" / "subject.txt"
    subject.write_text("{{ customer.nombre }}\n", encoding="utf-8")
    renderer = Renderer(tmp_templates)

    renderer.check("abandoned_cart")  # it compiles
    with pytest.raises(TemplateError, match=r"es/subject\.txt line 1: 'customer' has no attr"):
        renderer.check("abandoned_cart", sample=cart_context())


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cart.__class__ }}",
        "{{ cart.url.__class__.__base__.__subclasses__() }}",
        "{{ cart['items'].append(1) }}",
        "{{ cart.update({'total': 0}) }}",
    ],
)
def test_sandbox_blocks_python_internals_and_mutation(tmp_templates: Path, expression: str) -> None:
    subject = tmp_templates / "abandoned_cart" / "en" / "subject.txt"
    subject.write_text(f"Hi\n{expression}\n", encoding="utf-8")
    context = cart_context()

    with pytest.raises(TemplateError) as caught:
        Renderer(tmp_templates).render("abandoned_cart", context)

    message = str(caught.value)
    assert message.startswith("templates/abandoned_cart/en/subject.txt line 2: ")
    assert "unsafe" in message
    assert "remove the access to Python internals" in message
    assert context == cart_context()


def test_missing_template_folder_or_part(renderer: Renderer, tmp_templates: Path) -> None:
    with pytest.raises(TemplateError, match=r"no template folder templates/no_such_trigger/"):
        renderer.render("no_such_trigger", cart_context())
    with pytest.raises(TemplateError, match=r"not valid"):
        renderer.render("../abandoned_cart", cart_context())
    with pytest.raises(TemplateError, match=r"not valid"):
        renderer.render("abandoned_cart", cart_context(), variant="../vip")

    (tmp_templates / "abandoned_cart" / "en" / "body.txt").unlink()
    broken = Renderer(tmp_templates)
    with pytest.raises(TemplateError, match=r"templates/abandoned_cart/en/body\.txt is missing"):
        broken.render("abandoned_cart", cart_context(), locale="pt")
    # A locale that has the part still renders.
    assert broken.render("abandoned_cart", cart_context(), locale="de").locale == "de"


def test_mapping_keys_win_over_methods(renderer: Renderer) -> None:
    # `cart.items` in the templates is the list of items, not dict.items.
    message = renderer.render("abandoned_cart", cart_context())

    assert "Wool coat" in message.text


# -- money ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "locale", "expected"),
    [
        ("1234.5", "USD", None, "$1,234.50"),
        ("1234.50", "USD", "en", "$1,234.50"),
        (Decimal("1234.5"), "EUR", "de", f"1.234,50{NBSP}€"),
        (1234.5, "EUR", "fr", f"1\u202f234,50{NBSP}€"),
        (1234, "EUR", "es", f"1234,00{NBSP}€"),
        ("12345.5", "EUR", "es", f"12.345,50{NBSP}€"),
        ("84.50", "USD", "de-DE", f"84,50{NBSP}$"),
        ("84.50", "USD", "fr", f"84,50{NBSP}$US"),
        ("84.50", "GBP", "en", "£84.50"),
        ("0.005", "usd", "en", "$0.01"),  # half up
        (0.1, "USD", "en", "$0.10"),
        ("-5", "EUR", "en", "-€5.00"),
        ("-1234.5", "EUR", "de", f"-1.234,50{NBSP}€"),
        ("1234567.891", "USD", "en", "$1,234,567.89"),
        ("12.5", "CHF", "en", f"CHF{NBSP}12.50"),
        ("12.5", "CHF", "de", f"12,50{NBSP}CHF"),
        ("1500", "JPY", "en", "JPY\u00a01,500"),
        ("9.99", "EUR", "pt", "€9.99"),
    ],
)
def test_format_money(amount: Any, currency: str, locale: str | None, expected: str) -> None:
    assert format_money(amount, currency, locale) == expected


@pytest.mark.parametrize("amount", ["abc", "", None, True, "NaN", float("inf"), [1]])
def test_format_money_refuses_what_is_not_an_amount(amount: Any) -> None:
    with pytest.raises(ValueError, match="money: "):
        format_money(amount, "USD", "en")


def test_money_filter_uses_the_parts_locale_unless_told(tmp_templates: Path) -> None:
    subject = tmp_templates / "abandoned_cart" / "de" / "subject.txt"
    subject.write_text(
        "{{ cart.total | money(cart.currency) }} / {{ cart.total | money('GBP', 'en') }}\n",
        encoding="utf-8",
    )

    message = Renderer(tmp_templates).render("abandoned_cart", cart_context(), locale="de")

    assert message.subject == f"1.284,50{NBSP}€ / £1,284.50"


def test_money_filter_with_a_bad_amount_names_file_and_line(tmp_templates: Path) -> None:
    context = cart_context()
    context["cart"]["total"] = "about 80"
    body = tmp_templates / "abandoned_cart" / "de" / "body.html"
    line = line_of(body, "cart.total | money")

    with pytest.raises(TemplateError) as caught:
        Renderer(tmp_templates).render("abandoned_cart", context, locale="de")

    assert str(caught.value).startswith(
        f"templates/abandoned_cart/de/body.html line {line}: money: 'about 80' is not an amount"
    )
