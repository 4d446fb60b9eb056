"""The validation gate, run through real Great Expectations on tiny frames (and one large one)."""

from __future__ import annotations

import re
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

from mailflow.errors import ConfigError, DataQualityError
from mailflow.validation import (
    EMAIL_REGEX,
    SUPPORTED_LOCALES,
    Rule,
    Suite,
    ValidationOutcome,
    check_gate,
    recipient_suite,
    validate_frame,
)

KEY = "dedupe_key"

CART_SUITE = Suite(
    "abandoned_cart",
    (
        Rule.not_null("email"),
        Rule.email("email"),
        Rule.unique("email", normalise="lower"),
        Rule.length_between("first_name", None, 100),
        Rule.in_set("locale", SUPPORTED_LOCALES),
        Rule.greater_than("cart_total", 0),
    ),
)


def cart_rows(rows: list[tuple[str, object, object, object, object]]) -> pd.DataFrame:
    """A frame shaped like the abandoned-cart extract: key, email, first_name, locale, total."""
    return pd.DataFrame(rows, columns=[KEY, "email", "first_name", "locale", "cart_total"]).astype(
        {"email": object, "first_name": object, "cart_total": object}
    )


def clean_rows() -> pd.DataFrame:
    return cart_rows(
        [
            ("cart:1", "ann@example.com", "Ann", "en", Decimal("19.99")),
            ("cart:2", "bo.b+tag@mail.example.co.uk", "Bob", "de", 5.5),
            ("cart:3", "cy@example.org", None, "fr", Decimal("0.01")),
        ]
    )


def test_clean_frame_has_no_violations_and_keeps_every_row() -> None:
    df = clean_rows()

    outcome = validate_frame(df, CART_SUITE, key_column=KEY)

    assert outcome.violations == []
    assert outcome.bad_rows == 0
    assert outcome.total_rows == 3
    assert outcome.bad_share == 0.0
    assert outcome.counts == {rule.name: 0 for rule in CART_SUITE.rules}
    pd.testing.assert_frame_equal(outcome.good, df)


def test_one_bad_row_per_rule_is_quarantined_with_its_expectation() -> None:
    df = cart_rows(
        [
            ("cart:ok", "ok@example.com", "Ok", "en", Decimal("10")),
            ("cart:null", None, "Nul", "en", Decimal("10")),
            ("cart:regex", "bob@@example.com", "Bob", "en", Decimal("10")),
            ("cart:dupe", "OK@Example.com", "Dup", "en", Decimal("10")),
            ("cart:long", "long@example.com", "x" * 101, "en", Decimal("10")),
            ("cart:locale", "loc@example.com", "Loc", "pt", Decimal("10")),
            ("cart:zero", "zero@example.com", "Zed", "en", Decimal("0")),
        ]
    )

    outcome = validate_frame(df, CART_SUITE, key_column=KEY)

    found = {(v.row_key, v.expectation, v.column) for v in outcome.violations}
    assert found == {
        ("cart:null", "expect_column_values_to_not_be_null", "email"),
        ("cart:regex", "expect_column_values_to_match_regex", "email"),
        ("cart:dupe", "expect_column_values_to_be_unique", "email"),
        ("cart:long", "expect_column_value_lengths_to_be_between", "first_name"),
        ("cart:locale", "expect_column_values_to_be_in_set", "locale"),
        ("cart:zero", "expect_column_values_to_be_between", "cart_total"),
    }
    for violation in outcome.violations:
        assert violation.reason.startswith(violation.column), violation.reason
        assert violation.rule == f"{violation.column}:{violation.rule.split(':')[1]}"
        assert df.iloc[violation.position][KEY] == violation.row_key
    assert outcome.bad_rows == 6
    assert outcome.counts == {
        "email:not_null": 1,
        "email:email": 1,
        "email:unique": 1,
        "first_name:length_between": 1,
        "locale:in_set": 1,
        "cart_total:greater_than": 1,
    }
    assert outcome.good[KEY].tolist() == ["cart:ok"]

    by_key = {v.row_key: v for v in outcome.violations}
    assert by_key["cart:regex"].reason == (
        "email 'bob@@example.com' is not a well-formed address (more than one '@'); "
        "fix the address in the warehouse"
    )
    assert by_key["cart:regex"].value == "bob@@example.com"
    assert "repeats row 'cart:ok'" in by_key["cart:dupe"].reason
    assert "101 characters" in by_key["cart:long"].reason
    assert "'pt' is not one of en, de, fr, es" in by_key["cart:locale"].reason
    assert by_key["cart:zero"].value == Decimal("0")
    assert "cart_total 0 is not greater than 0" in by_key["cart:zero"].reason


def test_null_email_is_reported_by_not_null_only() -> None:
    df = cart_rows([("cart:1", None, "Ann", "en", 1.0), ("cart:2", np.nan, "Bo", "en", 2.0)])

    outcome = validate_frame(df, CART_SUITE, key_column=KEY)

    assert [(v.row_key, v.rule) for v in outcome.violations] == [
        ("cart:1", "email:not_null"),
        ("cart:2", "email:not_null"),
    ]
    assert all(v.value is None for v in outcome.violations)
    assert "email is missing" in outcome.violations[0].reason


def test_duplicates_keep_the_first_row_case_insensitively() -> None:
    df = cart_rows(
        [
            ("cart:1", "Ann@Example.com", "Ann", "en", 3),
            ("cart:2", "bob@example.com", "Bob", "en", 3),
            ("cart:3", "ann@example.COM", "Ann", "en", 2),
            ("cart:4", "ANN@EXAMPLE.COM", "Ann", "en", 1),
        ]
    )

    outcome = validate_frame(df, CART_SUITE, key_column=KEY)

    assert outcome.good[KEY].tolist() == ["cart:1", "cart:2"]
    assert [(v.row_key, v.rule) for v in outcome.violations] == [
        ("cart:3", "email:unique"),
        ("cart:4", "email:unique"),
    ]
    assert all("repeats row 'cart:1'" in v.reason for v in outcome.violations)
    assert outcome.counts["email:unique"] == 2


def test_exact_uniqueness_treats_case_as_different() -> None:
    df = cart_rows(
        [("cart:1", "a@example.com", "A", "en", 1), ("cart:2", "A@example.com", "A", "en", 1)]
    )
    suite = Suite("exact", (Rule.unique("email"),))

    assert validate_frame(df, suite, key_column=KEY).violations == []


def test_a_duplicate_whose_first_row_is_bad_is_still_sent_once() -> None:
    # The priority row has a broken locale; the recipient still gets the next row, once.
    df = cart_rows(
        [
            ("cart:1", "ann@example.com", "Ann", "xx", 9),
            ("cart:2", "Ann@example.com", "Ann", "en", 5),
            ("cart:3", "ann@example.com", "Ann", "en", 1),
        ]
    )

    outcome = validate_frame(df, CART_SUITE, key_column=KEY)

    assert outcome.good[KEY].tolist() == ["cart:2"]
    assert [(v.row_key, v.rule) for v in outcome.violations] == [
        ("cart:1", "locale:in_set"),
        ("cart:3", "email:unique"),
    ]
    assert "repeats row 'cart:2'" in outcome.violations[1].reason


def test_a_row_failing_two_rules_is_two_violations_but_one_bad_row() -> None:
    df = cart_rows(
        [
            ("cart:1", "ok@example.com", "Ok", "en", 1),
            ("cart:2", "not an email", "Two", "klingon", -5),
        ]
    )

    outcome = validate_frame(df, CART_SUITE, key_column=KEY)

    assert [(v.row_key, v.rule) for v in outcome.violations] == [
        ("cart:2", "email:email"),
        ("cart:2", "locale:in_set"),
        ("cart:2", "cart_total:greater_than"),
    ]
    assert outcome.bad_rows == 1
    assert outcome.bad_share == 0.5
    assert outcome.good[KEY].tolist() == ["cart:1"]


def test_greater_than_handles_decimal_float_int_and_null() -> None:
    df = pd.DataFrame(
        {
            KEY: ["a", "b", "c", "d", "e", "f", "g"],
            "total": [Decimal("0.01"), Decimal("0"), 0.5, -0.5, 7, None, Decimal("-3.10")],
        }
    )
    suite = Suite("totals", (Rule.greater_than("total", 0),))

    outcome = validate_frame(df, suite, key_column=KEY)

    assert [v.row_key for v in outcome.violations] == ["b", "d", "g"]
    assert [v.value for v in outcome.violations] == [Decimal("0"), -0.5, Decimal("-3.10")]

    floats = pd.DataFrame({KEY: ["a", "b", "c"], "total": [1.5, 0.0, np.nan]})
    assert [v.row_key for v in validate_frame(floats, suite, key_column=KEY).violations] == ["b"]


def test_allow_null_false_requires_the_value() -> None:
    df = pd.DataFrame({KEY: ["a", "b", "c"], "first_name": ["Ann", None, ""]}, dtype=object)
    suite = Suite("names", (Rule.length_between("first_name", 1, 100, allow_null=False),))

    outcome = validate_frame(df, suite, key_column=KEY)

    assert [(v.row_key, v.expectation) for v in outcome.violations] == [
        ("b", "expect_column_values_to_not_be_null"),
        ("c", "expect_column_value_lengths_to_be_between"),
    ]
    assert outcome.counts == {"first_name:length_between": 2}


def test_good_keeps_the_original_index_and_columns() -> None:
    df = clean_rows()
    df.index = pd.Index([30, 10, 20], name="source_row")
    df.loc[10, "locale"] = "xx"

    outcome = validate_frame(df, CART_SUITE, key_column=KEY)

    pd.testing.assert_frame_equal(outcome.good, df.loc[[30, 20]])
    assert outcome.violations[0].position == 1


def test_empty_frame_validates_to_nothing() -> None:
    outcome = validate_frame(clean_rows().iloc[:0], CART_SUITE, key_column=KEY)

    assert (outcome.total_rows, outcome.bad_rows, outcome.bad_share) == (0, 0, 0.0)
    check_gate(outcome, max_bad_share=0.0)


def test_missing_columns_are_a_config_error_naming_them() -> None:
    df = clean_rows().drop(columns=["locale"])

    with pytest.raises(ConfigError, match=r"\['locale'\].*trigger query"):
        validate_frame(df, CART_SUITE, key_column=KEY)
    with pytest.raises(ConfigError, match="key_column 'cart_id'"):
        validate_frame(clean_rows(), CART_SUITE, key_column="cart_id")


def test_a_rule_gx_cannot_evaluate_fails_loudly() -> None:
    df = pd.DataFrame({KEY: ["a", "b"], "total": ["12.50", Decimal("3")]})
    suite = Suite("totals", (Rule.greater_than("total", 0),))

    with pytest.raises(DataQualityError, match=r"'total:greater_than' could not be evaluated"):
        validate_frame(df, suite, key_column=KEY)


def test_suite_rejects_a_rule_declared_twice() -> None:
    with pytest.raises(ConfigError, match="'email:email' twice"):
        Suite("twice", (Rule.email("email"), Rule.email("email")))


def test_recipient_suite_is_the_standard_checks_plus_extras() -> None:
    suite = recipient_suite("abandoned_cart", extra=(Rule.greater_than("cart_total", 0),))

    assert suite == CART_SUITE


def test_an_empty_or_blank_first_name_is_not_quarantined() -> None:
    # Every template greets without a name; only a name too long to be one is bad data.
    df = cart_rows(
        [
            ("cart:1", "a@example.com", "", "en", Decimal("1")),
            ("cart:2", "b@example.com", "   ", "en", Decimal("1")),
            ("cart:3", "c@example.com", "x" * 101, "en", Decimal("1")),
        ]
    )
    outcome = validate_frame(df, recipient_suite("abandoned_cart"), key_column=KEY)
    assert [(v.row_key, v.rule) for v in outcome.violations] == [
        ("cart:3", "first_name:length_between")
    ]


def outcome_with(bad: int, total: int) -> ValidationOutcome:
    df = pd.DataFrame({KEY: [f"k{i}" for i in range(total)]})
    return ValidationOutcome(df, [], bad, total, {"email:email": bad}, "abandoned_cart")


def test_gate_passes_at_or_below_the_threshold() -> None:
    check_gate(outcome_with(0, 100), max_bad_share=0.0)
    check_gate(outcome_with(4, 100), max_bad_share=0.05)
    check_gate(outcome_with(5, 100), max_bad_share=0.05)


def test_gate_raises_above_the_threshold_with_share_threshold_and_where_to_look() -> None:
    df = cart_rows(
        [
            ("cart:1", "ok@example.com", "Ok", "en", 1),
            ("cart:2", "broken@", "Bad", "en", 1),
            ("cart:3", "also broken", "Bad", "en", 1),
            ("cart:4", "fine@example.com", "Ok", "pt", 1),
        ]
    )
    outcome = validate_frame(df, CART_SUITE, key_column=KEY)

    with pytest.raises(DataQualityError) as caught:
        check_gate(outcome, max_bad_share=0.5)

    message = str(caught.value)
    assert "3 of 4 rows are bad (75.00%)" in message
    assert "max_bad_share 50.00%" in message
    assert "email:email 2 rows" in message
    assert "locale:in_set 1 rows" in message
    assert "mf_quarantine" in message
    assert "'abandoned_cart'" in message


def test_gate_rejects_a_threshold_that_is_not_a_share() -> None:
    with pytest.raises(ConfigError, match="write 5% as 0.05"):
        check_gate(outcome_with(0, 1), max_bad_share=5)


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("ann@example.com", True),
        ("First.Last+promo@mail.example.co.uk", True),
        ("o'brien@example.ie", True),
        ("x@example.xn--p1ai", True),
        ("bob@@example.com", False),
        ("bob@example", False),
        ("bob@example.c", False),
        ("bob..smith@example.com", False),
        (".bob@example.com", False),
        ("bob.@example.com", False),
        ("bob@example..com", False),
        ("bob@-example.com", False),
        ("bob smith@example.com", False),
        (" bob@example.com", False),
        ("bob@example.com\n", False),
        ("@example.com", False),
        ("bob@example.com.", False),
    ],
)
def test_email_regex(address: str, ok: bool) -> None:
    assert bool(re.search(EMAIL_REGEX, address)) is ok


def test_one_hundred_thousand_rows() -> None:
    n = 100_000
    rng = np.random.default_rng(7)
    emails: list[str | None] = [f"user{i}@example.com" for i in range(n)]
    for i in range(0, n, 97):
        emails[i] = "user@@example.com"
    for i in range(13, n, 1009):
        emails[i] = None
    for i in range(51, n, 503):
        emails[i] = f"USER{i - 1}@Example.com"  # the row before, in other case
    locales = rng.choice(np.array([*SUPPORTED_LOCALES, "pt"]), n, p=[0.25, 0.25, 0.25, 0.24, 0.01])
    totals = rng.choice(np.array([-1.0, 0.0, 10.0, 99.5]), n, p=[0.005, 0.005, 0.5, 0.49])
    df = pd.DataFrame(
        {
            KEY: [f"cart:{i}" for i in range(n)],
            "email": pd.Series(emails, dtype=object),
            "first_name": "Ann",
            "locale": locales,
            "cart_total": totals,
        }
    )

    outcome = validate_frame(df, CART_SUITE, key_column=KEY)

    # The same policy, row by row in plain Python: a reference to check GX's answer against.
    expected: set[tuple[str, str]] = set()
    seen: set[str] = set()
    for i, email in enumerate(emails):
        key = f"cart:{i}"
        fails = []
        if email is None:
            fails.append("email:not_null")
        elif not re.search(EMAIL_REGEX, email):
            fails.append("email:email")
        if locales[i] not in SUPPORTED_LOCALES:
            fails.append("locale:in_set")
        if not totals[i] > 0:
            fails.append("cart_total:greater_than")
        if not fails and email is not None:
            if email.strip().lower() in seen:
                fails.append("email:unique")
            seen.add(email.strip().lower())
        expected.update((key, rule) for rule in fails)

    assert {(v.row_key, v.rule) for v in outcome.violations} == expected
    assert len(outcome.violations) == len(expected)
    bad_keys = {key for key, _ in expected}
    assert outcome.bad_rows == len(bad_keys)
    assert outcome.counts["email:unique"] > 150
    assert outcome.counts["first_name:length_between"] == 0
    assert len(outcome.good) == n - len(bad_keys)
    assert not outcome.good[KEY].isin(bad_keys).any()
    assert outcome.good["email"].str.lower().is_unique
