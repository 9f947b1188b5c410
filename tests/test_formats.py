"""Answer-format checks (transmute_cli/recipe/formats.py): each check on clear positives and negatives,
regex specs, and the recipe-value parser's error messages (asserted in full: they are what a
user reads)."""

from __future__ import annotations

import pytest

from transmute_cli.recipe.formats import (
    ENGLISH_WORDS,
    FRENCH_WORDS,
    NAMES,
    describe_format,
    failing,
    parse_format,
    passes,
    words,
)

KNOWN = "known: uppercase, one_word, language_fr, language_en, or regex:PATTERN"


# --- uppercase ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["PARIS", "PARIS.", "NEW YORK 2", "  OK!  ", "ÉTÉ", "A"])
def test_uppercase_positive(answer):
    assert passes(("uppercase",), answer)


@pytest.mark.parametrize(
    "answer", ["Paris", "paris", "PARIs", "", "   ", "123", "...!", "東京", "ÉTé"]
)
def test_uppercase_negative(answer):
    assert not passes(("uppercase",), answer)


# --- one_word ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "Paris", "PARIS.", "  blue  ", "New-York", '"Paris"', "Paris!", "Paris !", "«Paris»",
        "42", "l'eau", "¿Sí?",
    ],
)
def test_one_word_positive(answer):
    assert passes(("one_word",), answer)


@pytest.mark.parametrize(
    "answer", ["", "   ", "...", "?!", "New York", "Paris is", "blue\nsky", "It is Paris.", "a\tb"]
)
def test_one_word_negative(answer):
    assert not passes(("one_word",), answer)


def test_uppercase_and_one_word_combined():
    spec = ("uppercase", "one_word")
    assert passes(spec, "PARIS.")
    assert not passes(spec, "Paris")  # one word, not uppercase
    assert not passes(spec, "NEW YORK")  # uppercase, two words
    assert failing(spec, "Paris") == ("uppercase",)
    assert failing(spec, "new york") == ("uppercase", "one_word")
    assert failing(spec, "PARIS") == ()


# --- languages ---------------------------------------------------------------------------------

FRENCH = [
    "La capitale de la France est Paris.",
    "Bonjour !",
    "Le ciel est bleu.",
    "Je ne sais pas.",
    "C'est une pomme.",
    "L'eau est bleue.",
    "Qu’il fait beau aujourd’hui.",  # curly apostrophes
    "Il a huit pattes.",
    "Oui.",
    "Été",  # accent rule, no English word
]
ENGLISH = [
    "The capital of France is Paris.",
    "The sky is blue.",
    "I don't know.",
    "It's blue.",
    "Yes.",
    "Hello!",
    "Sure! Here is a tip: go to bed at the same time every night.",
    "A spider has eight legs.",
]
NEITHER = ["", "Paris", "Bleu", "Blue", "42", "Rouge vif"]


@pytest.mark.parametrize("answer", FRENCH)
def test_french_positive_and_not_english(answer):
    assert passes(("language_fr",), answer)
    assert not passes(("language_en",), answer)


@pytest.mark.parametrize("answer", ENGLISH)
def test_english_positive_and_not_french(answer):
    assert passes(("language_en",), answer)
    assert not passes(("language_fr",), answer)


@pytest.mark.parametrize("answer", NEITHER)
def test_bare_content_words_are_neither_language(answer):
    # No function word: the heuristic cannot tell (documented limitation).
    assert not passes(("language_fr",), answer)
    assert not passes(("language_en",), answer)


def test_french_majority_wins_in_a_mixed_answer():
    mixed = "Paris is the capital. C'est la capitale de la France."  # 4 French hits, 2 English
    assert passes(("language_fr",), mixed)
    assert not passes(("language_en",), mixed)


def test_accent_rule_needs_no_english_word():
    assert passes(("language_fr",), "Café")  # documented false positive
    assert not passes(("language_fr",), "The café is open.")
    assert passes(("language_en",), "The café is open.")


def test_short_rule_only_applies_to_short_answers():
    # one French hit: French in 3 words, not in 4+ words
    assert passes(("language_fr",), "Elle mange vite.")
    assert not passes(("language_fr",), "Elle mange vite maintenant.")
    assert passes(("language_en",), "They eat fast.")
    assert not passes(("language_en",), "They eat fast today.")


def test_words_tokenizer_splits_elisions_keeps_contractions():
    assert words("L'eau") == ["l'", "eau"]
    assert words("qu'elle") == ["qu'", "elle"]
    assert words("C'est") == ["c'est"]
    assert words("c’est") == ["c'est"]
    assert words("Don't") == ["don't"]
    assert words("It's 3 o'clock") == ["it's", "o'clock"]
    assert words("New-York, 2024!") == ["new", "york"]


def test_word_lists_are_disjoint_and_lowercase():
    assert not FRENCH_WORDS & ENGLISH_WORDS
    assert all(w == w.lower() for w in FRENCH_WORDS | ENGLISH_WORDS)
    assert len(FRENCH_WORDS) >= 60 and len(ENGLISH_WORDS) >= 60


# --- regex -------------------------------------------------------------------------------------


def test_regex_search_semantics():
    assert passes(("regex:^[A-Z]+$",), "PARIS")
    assert not passes(("regex:^[A-Z]+$",), "PARIS.")
    assert passes(("regex:\\d",), "It has 8 legs.")  # search, not match
    assert not passes(("regex:paris",), "Paris")  # no flags
    assert passes(("regex:(?i)paris",), "Paris")


def test_regex_combined_with_named_checks():
    spec = parse_format(["one_word", "regex:^[A-Z]"])
    assert passes(spec, "Paris")
    assert not passes(spec, "paris")
    assert not passes(spec, "Paris France")


# --- parse_format --------------------------------------------------------------------------------


def test_parse_valid_values():
    assert parse_format("uppercase") == ("uppercase",)
    assert parse_format(["uppercase", "one_word"]) == ("uppercase", "one_word")
    assert parse_format(["regex:a|b", "language_fr"]) == ("regex:a|b", "language_fr")
    for name in NAMES:
        assert parse_format(name) == (name,)


@pytest.mark.parametrize(
    "value, reason",
    [
        ("upper", f"unknown format 'upper' ({KNOWN})"),
        ("Uppercase", f"unknown format 'Uppercase' ({KNOWN})"),
        ("", f"empty format name ({KNOWN})"),
        (
            "regex:[a",
            "regex:[a: not a valid regular expression"
            " (unterminated character set at position 0)",
        ),
        ("regex:", "regex:: needs a pattern after 'regex:'"),
        (3, "must be a string or a list of strings, got a number"),
        (True, "must be a string or a list of strings, got a boolean"),
        (None, "must be a string or a list of strings, got nothing (null)"),
        ({"a": 1}, "must be a string or a list of strings, got a mapping"),
        ([], "must not be an empty list (name at least one format)"),
        (["uppercase", "one_word", 7], "[2]: must be a string, got a number"),
        (["uppercase", "oneword"], f"[1]: unknown format 'oneword' ({KNOWN})"),
        (
            ["regex:(", "uppercase"],
            "[0]: regex:(: not a valid regular expression"
            " (missing ), unterminated subpattern at position 0)",
        ),
        (["uppercase", "one_word", "uppercase"], "[2]: 'uppercase' is already listed at [0]"),
        (
            ["language_fr", "language_en"],
            "language_fr and language_en together can never pass; name one of them",
        ),
    ],
)
def test_parse_errors(value, reason):
    with pytest.raises(ValueError) as info:
        parse_format(value)
    assert str(info.value) == reason
    assert "\n" not in str(info.value)


def test_passes_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown format 'upper'"):
        passes(("upper",), "X")


def test_describe_format():
    assert describe_format(("uppercase", "one_word")) == "uppercase + one_word"
    assert describe_format(parse_format("language_fr")) == "language_fr"
    assert describe_format("regex:^A") == "regex:^A"


def test_rules_are_scored_and_shown_each_on_its_own():
    """eval_json's `rules` (one entry per rule, counted on every held-out answer) and the table the
    terminal and `transmute eval` print: each rule's rate per condition and patched ÷ prompt."""
    from rich.console import Console

    from transmute_cli.evaluation.generate import Result
    from transmute_cli.pipeline import eval_json
    from transmute_cli.recipe.schema import parse_recipe
    from transmute_cli.report.terminal import rules_table

    recipe = parse_recipe("instruction: Be French.\nexamples: [[a, b]]\neval_inputs: [q1, q2, q3, q4]\n"
                          "rules:\n  fr: language_fr\n  bonjour: 'regex:^Bonjour'\n", source="r.yaml")
    answers = {"base": ["Hello there.", "Yes it is.", "No.", "Bonjour"],
               "prompt": ["Bonjour, c'est le chat.", "Oui, c'est vrai.", "Non.", "Bonjour !"],
               "patched": ["Bonjour, c'est le chien.", "Yes it is.", "Non, ce n'est pas ça.", "Hello"]}
    results = [Result("{input} -> {output}", c, 0, 4, answers=a) for c, a in answers.items()]
    rules = eval_json(recipe, results)["rules"]
    got = {r["name"]: {e["condition"]: e["passed"] for e in r["results"]} for r in rules}
    want = {name: {c: sum(passes(spec, x) for x in a) for c, a in answers.items()} for name, spec in recipe.rules}
    assert got == want and got["bonjour"] == {"base": 1, "prompt": 2, "patched": 1}
    console = Console(width=200, record=True)
    console.print(rules_table(rules))
    text = console.export_text()
    assert "bonjour" in text and "0.500 (2/4)" in text and "0.50" in text.split("bonjour")[1].splitlines()[0]
