"""Cleaning and filters of the data stage: each filter and the PII redaction on positive and negative examples."""

from __future__ import annotations

import dataclasses

import pytest

from trellis.data.arguments import DataArguments
from trellis.data.text_quality import clean_text, fix_encoding, redact_pii, rejection_reason

GOOD = (
    "The old lighthouse stood at the edge of the harbour for more than a century. Every night the "
    "keeper climbed the narrow stairs to light the lamp, and the ships that passed were grateful for "
    "it.\nIn the winter of 1902 a storm tore the roof away, but the light kept burning until dawn."
)


def args(**changes) -> DataArguments:
    """The recipe defaults with every filter off except the ones a test turns on."""
    off = dict(
        min_chars=None,
        gopher_quality=False,
        repetition_filter=False,
        blocklist_filter=False,
        redact_pii=False,
    )
    return dataclasses.replace(DataArguments(output_dir="unused"), **{**off, **changes})


DEFAULTS = DataArguments(output_dir="unused")


def test_well_formed_prose_passes_every_default_filter():
    assert rejection_reason(GOOD, DEFAULTS) is None


@pytest.mark.parametrize(
    ("changes", "text", "reason"),
    [
        ({"min_chars": 50}, "Too short to be a document.", "length: too few characters"),
        ({"max_chars": 100}, GOOD, "length: too many characters"),
        ({"min_words": 10}, "three words here", "length: too few words"),
        ({"max_words": 20}, GOOD, "length: too many words"),
    ],
)
def test_length_filters(changes, text, reason):
    assert rejection_reason(text, args(**changes)) == reason
    assert rejection_reason(GOOD if text != GOOD else "x " * 15, args()) is None  # filter off: kept


GOPHER_CASES = [
    (
        "max_symbol_word_ratio",
        "#tag #tag #news and the best #deals of the #week ... # # the",
        "symbol-to-word ratio",
    ),
    (
        "min_mean_word_length",
        "a b c d e f g h i j k l m n o p the of and to with",
        "mean word length too short",
    ),
    (
        "max_mean_word_length",
        "the " + " ".join(["incomprehensibilities"] * 20) + " of and",
        "mean word length too long",
    ),
    (
        "min_alpha_word_fraction",
        "the 12 34 56 78 90 11 22 33 44 55 of 66 77 88 and",
        "too few alphabetic words",
    ),
    ("max_bullet_line_fraction", "\n".join(["- the best item of all"] * 10), "bullet lines"),
    (
        "max_ellipsis_line_fraction",
        "\n".join([f"The story of the {i} days and..." for i in range(10)]),
        "ellipsis lines",
    ),
    (
        "min_stop_words",
        "Quick brown foxes jump over lazy dogs near rivers while birds sing songs",
        "too few stop words",
    ),
    (
        "min_punctuation_line_fraction",
        "\n".join([f"Menu item number {i} of the site" for i in range(10)]),
        "lines not ending",
    ),
]


@pytest.mark.parametrize(("key", "text", "reason"), GOPHER_CASES, ids=[c[0] for c in GOPHER_CASES])
def test_each_gopher_rule_rejects_its_case_and_only_when_on(key, text, reason):
    thresholds = {c[0]: None for c in GOPHER_CASES}
    defaults = {"min_punctuation_line_fraction": 0.5}
    on = args(gopher_quality=True, **{**thresholds, key: getattr(DEFAULTS, key) or defaults[key]})
    assert reason in (rejection_reason(text, on) or "")
    assert rejection_reason(GOOD, on) is None  # negative example: prose passes the same rule
    assert rejection_reason(text, args(gopher_quality=True, **thresholds)) is None  # rule off


@pytest.mark.parametrize(
    ("key", "text", "reason"),
    [
        (
            "max_duplicate_line_fraction",
            "Buy now and save.\n" * 5 + "The end of the page.",
            "duplicate lines",
        ),
        (
            "max_duplicate_paragraph_fraction",
            "A paragraph of text here.\n\n" * 4 + "Other.",
            "duplicate paragraphs",
        ),
        ("max_top_ngram_fraction", "click the link " * 10 + "and more of the other", "top 2-gram"),
        ("max_duplicate_ngram_fraction", GOOD + " " + GOOD, "duplicate 5-grams"),
    ],
)
def test_repetition_rules(key, text, reason):
    all_off = {
        "max_duplicate_line_fraction": None,
        "max_duplicate_paragraph_fraction": None,
        "max_top_ngram_fraction": {},
        "max_duplicate_ngram_fraction": {},
    }
    on = args(repetition_filter=True, **{**all_off, key: getattr(DEFAULTS, key)})
    assert reason in (rejection_reason(text, on) or "")
    assert rejection_reason(GOOD, on) is None  # negative example: prose passes the same rule
    assert rejection_reason(text, args(repetition_filter=True, **all_off)) is None  # rule off


def test_blocklist_matches_whole_words_case_insensitively(tmp_path):
    on = args(blocklist_filter=True)
    assert rejection_reason(GOOD + " Free PORN videos here.", on) == "harmful content: blocklist"
    assert rejection_reason(GOOD + " The pornographer's museum.", on) is None  # not a whole-word match
    custom = tmp_path / "words.txt"
    custom.write_text("# comment\nlighthouse\n")
    assert rejection_reason(GOOD, args(blocklist_filter=True, blocklist_file=str(custom))) is not None
    assert (
        rejection_reason(GOOD, args(blocklist_filter=True, blocklist_file=str(custom), max_blocklist_hits=1))
        is None
    )


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Write to jane.doe+news@mail.example.co.uk today.", "Write to <EMAIL> today.", "email"),
        ("Call +1 415-555-0132 or (020) 7946 0958.", "Call <PHONE> or <PHONE>.", "phone"),
        ("The server at 192.168.10.254 answered.", "The server at <IP_ADDRESS> answered.", "ip"),
        ("v6 at 2001:0db8:85a3:0000:0000:8a2e:0370:7334 too", "v6 at <IP_ADDRESS> too", "ip"),
    ],
)
def test_pii_redaction(text, expected, kind):
    redacted, counts = redact_pii(text)
    assert redacted == expected
    assert counts[kind] >= 1


@pytest.mark.parametrize(
    "text",
    [
        "The meeting is on 2024-01-02 at 10:30, in room 12.",
        "Version 1.2.3 costs 1,299 dollars; the year 1999 had 365 days.",
        "An @mention and name at example dot com.",
        "Invalid address 999.300.1.1 and ratio 3.14159.",
    ],
)
def test_pii_redaction_leaves_dates_versions_and_numbers(text):
    assert redact_pii(text) == (text, {"email": 0, "ip": 0, "phone": 0})


def test_cleaning_repairs_encoding_normalises_unicode_and_whitespace_and_boilerplate():
    broken = "Caf\u00c3\u00a9 owners don\u00e2\u0080\u0099t like it"
    broken_cp1252 = "donâ€™t"
    assert fix_encoding(broken) == "Café owners don\u2019t like it"
    assert fix_encoding(broken_cp1252) == "don\u2019t"
    assert fix_encoding("Café déjà vu") == "Café déjà vu"  # correct text is untouched
    text = "  Cafe\u0301\u00a0 menu\t\tto\x00day \r\n\r\n\r\n\r\nAccept all cookies\nAll rights reserved.\nSecond line "
    cleaned, _ = clean_text(text, args(remove_boilerplate_lines=True))
    assert cleaned == "Café menu today\n\nSecond line"
    kept, _ = clean_text(text, args(remove_boilerplate_lines=False))
    assert "cookies" in kept
    nfkc, _ = clean_text("ﬁne ①", args(unicode_normalization="NFKC"))
    assert nfkc == "fine 1"
