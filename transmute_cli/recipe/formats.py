"""Answer-format checks: what a recipe's ``answer_format`` key names.

A spec is one name or a list of names; an answer passes when every named check passes.

* ``uppercase``   -- at least one cased letter and no lowercase letter; digits, punctuation and
  spaces are ignored.  Letters of scripts without case (e.g. CJK) do not count as letters here,
  so "東京" fails.
* ``one_word``    -- after stripping surrounding whitespace and leading/trailing punctuation
  (``. , ! ? ; : " '`` plus curly quotes, guillemets, ``¿ ¡ …``), the answer is one run of
  characters with no whitespace inside and at least one letter or digit.  "New-York" and "42"
  are one word; "" and "..." are not.
* ``language_fr`` / ``language_en`` -- the answer is (mostly) French / English.  See
  :func:`is_french` for the heuristic and what fools it.
* ``regex:PATTERN`` -- ``re.search(PATTERN, answer)`` finds a match (Python ``re`` syntax, no
  flags; write ``(?i)`` for case-insensitive).

Pure Python, standard library only.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Iterable

NAMES = ("uppercase", "one_word", "language_fr", "language_en")
REGEX_PREFIX = "regex:"

_KNOWN = ", ".join(NAMES) + ", or regex:PATTERN"


# --- the checks ----------------------------------------------------------------------------


def is_uppercase(answer: str) -> bool:
    """At least one cased letter and no lowercase letter; everything that is not a letter is
    ignored ("PARIS." and "NEW YORK 2" pass, "Paris" and "123" fail)."""
    return any(c.isupper() for c in answer) and not any(c.islower() for c in answer)


# Stripped from both ends (with whitespace) before counting words: the ASCII set of the spec
# plus the typographic quotes a chat model writes, and French spacing before "!" / "?".
_EDGE_PUNCT = (
    " \t\r\n\f\v\u00a0\u202f"  # whitespace, incl. no-break spaces
    ".,!?;:\"'"
    "\u2018\u2019\u201c\u201d\u00ab\u00bb\u00bf\u00a1\u2026"  # ‘ ’ “ ” « » ¿ ¡ …
)


def is_one_word(answer: str) -> bool:
    """One word after stripping surrounding whitespace and punctuation: no whitespace inside
    and at least one letter or digit.  Hyphenated words count as one ("New-York")."""
    core = answer.strip(_EDGE_PUNCT)
    return bool(core) and not any(c.isspace() for c in core) and any(c.isalnum() for c in core)


# Frequent French / English function words, short words and number words.  The two lists are
# disjoint on purpose: words that are common in both languages ("a", "on", "me", "son", "an",
# "six") are in neither.  Elided French forms ("l'", "d'", "qu'") are matched after splitting
# "l'eau" into "l'" + "eau"; English contractions ("it's", "don't") are matched whole.
FRENCH_WORDS = frozenset(
    """
    le la les l' de des du d' un une et est sont en à au aux pour que qu' qui dans ce cet cette
    ces c' c'est il ils elle elles nous vous je j' tu pas ne n' n'est avec sur par plus mais ou
    où très sa ses leur leurs mon ma mes notre votre nos vos se s' y été être avoir fait était
    ont avez suis sommes êtes comme aussi bien tout tous toute sans sous chez donc quand oui non
    merci bonjour voici voilà ça cela lui deux trois quatre cinq sept huit neuf dix
    """.split()
)
ENGLISH_WORDS = frozenset(
    """
    the is are was were be been am and of to in it it's its you your you're that that's this
    these those for with as at by from i i'm he she we they his her him them their our my have
    has had do does did don't doesn't not isn't can can't will would there there's what which
    who how why when where or but if so very about than then just yes hello thanks thank please
    because here one two three four five seven eight nine ten
    """.split()
)

# Letters that French writes and English (almost) never does.
FRENCH_LETTERS = frozenset("éèêàùçîôûëïâœ" + "éèêàùçîôûëïâœ".upper())
_ELISIONS = frozenset("l d j m n s t c qu jusqu lorsqu puisqu quoiqu".split())
# Runs of letters, joined by apostrophes ("c'est", "don't"); digits and "_" are not letters.
_WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def words(text: str) -> list[str]:
    """Lowercase word tokens of ``text`` as the language checks count them: curly apostrophes
    become ``'``; a listed word is kept whole ("c'est", "it's"); otherwise a French elision is
    split off ("l'eau" -> "l'", "eau"; "qu'elle" -> "qu'", "elle")."""
    out: list[str] = []
    for raw in _WORD_RE.findall(text.replace("\u2019", "'").replace("\u2018", "'").lower()):
        out.extend(_split_elision(raw))
    return out


def _split_elision(token: str) -> list[str]:
    if token in FRENCH_WORDS or token in ENGLISH_WORDS or "'" not in token:
        return [token]
    head, rest = token.split("'", 1)
    if head in _ELISIONS:
        return [head + "'", *_split_elision(rest)]
    return [token]


def _language_counts(answer: str) -> tuple[int, int, int]:
    """(french_hits, english_hits, number of words before elision splitting)."""
    toks = words(answer)
    fr = sum(t in FRENCH_WORDS for t in toks)
    en = sum(t in ENGLISH_WORDS for t in toks)
    n_words = len(_WORD_RE.findall(answer.replace("\u2019", "'")))
    return fr, en, n_words


_SHORT = 4  # fewer words than this is a "short" answer


def is_french(answer: str) -> bool:
    """Whether the answer is (mostly) French -- a heuristic, not language identification.

    It counts occurrences of ~100 frequent French function words and number words (le, la,
    de, est, et, c'est, l', qu', huit, ...) and ~90 English ones (the, is, of, and, it's, eight,
    ...); the lists are disjoint, so words shared by both languages ("a", "on", "me", "an")
    count for neither.
    French when any of:

    * french_hits >= 2 and french_hits > english_hits;
    * the answer is short (fewer than 4 words) and french_hits >= 1 and english_hits == 0
      ("Bonjour !", "Oui.");
    * it contains a French-only accented letter (é è ê à ù ç î ô û ë ï â œ) and
      english_hits == 0 ("Été").

    What fools it:

    * a bare content word has no function word, so "Paris", "Bleu" or "Rouge" are *not*
      French (nor English);
    * a French sentence of 4+ words with fewer than 2 listed words and no accent fails
      ("Elle a faim aujourd'hui." has one hit: not French; "Il a faim." is short: French);
    * an English word with an accent ("Café", "Résumé") counts as French;
    * an English sentence quoting French ("They said c'est la vie de la France") can tip to
      French, and any mixed answer passes when French words outnumber English ones;
    * other Romance languages share words (Spanish/Italian "la", "de", "que"), so Spanish or
      Italian text can pass.
    """
    fr, en, n = _language_counts(answer)
    if fr >= 2 and fr > en:
        return True
    if n < _SHORT and fr >= 1 and en == 0:
        return True
    return en == 0 and any(c in FRENCH_LETTERS for c in answer)


def is_english(answer: str) -> bool:
    """Whether the answer is (mostly) English: the mirror of :func:`is_french` with the same
    word lists -- english_hits >= 2 and english_hits > french_hits, or a short answer (fewer
    than 4 words) with english_hits >= 1 and french_hits == 0.  There is no letter rule
    (English has no letters of its own), so a bare content word ("Blue", "Paris") is not
    English; "Yes." and "Hello!" are.  Other Germanic text rarely passes, but English words
    inside another language ("I think, donc je suis") count for English.
    """
    fr, en, n = _language_counts(answer)
    if en >= 2 and en > fr:
        return True
    return n < _SHORT and en >= 1 and fr == 0


_CHECKS: dict[str, Callable[[str], bool]] = {
    "uppercase": is_uppercase,
    "one_word": is_one_word,
    "language_fr": is_french,
    "language_en": is_english,
}


# --- specs -----------------------------------------------------------------------------------


def _what(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _check_one(spec: object) -> str | None:
    """The reason one spec is invalid, or None."""
    if not isinstance(spec, str):
        return f"must be a string, got {_what(spec)}"
    if spec in _CHECKS:
        return None
    if spec.startswith(REGEX_PREFIX):
        pattern = spec[len(REGEX_PREFIX) :]
        if not pattern:
            return f"{spec}: needs a pattern after 'regex:'"
        try:
            _compile(pattern)
        except re.error as err:
            return f"{spec}: not a valid regular expression ({err})"
        return None
    if not spec:
        return f"empty format name (known: {_KNOWN})"
    return f"unknown format {spec!r} (known: {_KNOWN})"


def parse_format(value: object) -> tuple[str, ...]:
    """Validate a recipe's ``answer_format`` value -- a string or a non-empty list of strings,
    no duplicates -- and return the specs as a tuple.

    Raises ``ValueError`` with a one-line reason, e.g.
    ``unknown format 'upper' (known: uppercase, one_word, language_fr, language_en, or
    regex:PATTERN)``, ``regex:[a: not a valid regular expression (unterminated character set
    at position 0)``, ``must be a string or a list of strings, got a number``; a bad list item's
    reason starts with its index, ``[2]: ...``.
    """
    if isinstance(value, str):
        reason = _check_one(value)
        if reason:
            raise ValueError(reason)
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a string or a list of strings, got {_what(value)}")
    if not value:
        raise ValueError("must not be an empty list (name at least one format)")
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        reason = _check_one(item)
        if reason:
            raise ValueError(f"[{i}]: {reason}")
        if item in seen:
            raise ValueError(f"[{i}]: {item!r} is already listed at [{seen[item]}]")
        seen[item] = i
    if "language_fr" in seen and "language_en" in seen:
        raise ValueError("language_fr and language_en together can never pass; name one of them")
    return tuple(value)


def _as_tuple(spec: str | Iterable[str]) -> tuple[str, ...]:
    return (spec,) if isinstance(spec, str) else tuple(spec)


def _check(spec: str, answer: str) -> bool:
    fn = _CHECKS.get(spec)
    if fn is not None:
        return fn(answer)
    if spec.startswith(REGEX_PREFIX) and len(spec) > len(REGEX_PREFIX):
        return _compile(spec[len(REGEX_PREFIX) :]).search(answer) is not None
    raise ValueError(f"unknown format {spec!r} (known: {_KNOWN})")


def failing(spec: str | Iterable[str], answer: str) -> tuple[str, ...]:
    """The specs of ``spec`` that ``answer`` does not pass, in order (empty when it passes)."""
    return tuple(s for s in _as_tuple(spec) if not _check(s, answer))


def passes(spec: str | Iterable[str], answer: str) -> bool:
    """Whether ``answer`` passes every check named in ``spec`` (a tuple from
    :func:`parse_format`; a single name is accepted too).  An unknown name raises ValueError."""
    return all(_check(s, answer) for s in _as_tuple(spec))


def describe_format(spec: str | Iterable[str]) -> str:
    """The spec in words for reports: ``"uppercase + one_word"``."""
    return " + ".join(_as_tuple(spec))
