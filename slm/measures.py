"""The text measures of the story suite, plain heuristics on words (no NLP library).

- ``distinct_n``: distinct n-grams / all n-grams over several texts together (Li et al.,
  2016), of words, punctuation marks and line breaks (``units``).
- ``repeat_rate``: the share of a text's n-grams that repeat an earlier one.
- ``names_and_nouns`` and ``carryover``: the names and nouns of an opening, and the share of
  them that a completion uses again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
_UNIT = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|\n|[^\sa-z0-9]")


def _lower(text: str) -> str:
    """``text`` lower-cased, with the typographic apostrophe (’) as a plain one (')."""
    return text.lower().replace("’", "'")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, inner apostrophes); punctuation is dropped."""
    return _WORD.findall(_lower(text))


def units(text: str) -> list[str]:
    """What the n-grams of ``distinct_n`` and ``repeat_rate`` are made of: the words, each
    punctuation mark and each line break (a model that loops on "\\n" or "!" repeats too)."""
    return _UNIT.findall(_lower(text))


def ngrams(seq: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(seq[i:] for i in range(n))))


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams of ``units`` over ``texts`` together (None: none)."""
    grams = [g for t in texts for g in ngrams(units(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def repeat_rate(text: str, n: int = 4) -> float | None:
    """The share of ``text``'s n-grams of ``units`` that repeat an earlier one (None: none)."""
    grams = ngrams(units(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else None


DETERMINERS = frozenset(
    "a an the his her their my your its our this that these those some every another".split()
)
# Skipped between a determiner and its noun ("a little red ball" -> ball, "a three year old
# girl" -> girl), as are the words with an adjective's ending (``_ADJECTIVE_END``) before
# another word ("a clumsy rabbit").
ADJECTIVES = frozenset(
    """little big small tiny huge old young new happy sad angry scared kind nice good bad best
    pretty beautiful shiny red blue green yellow pink purple orange brown black white gray grey
    gold golden long tall short fast slow soft hard warm cold hot dark bright fluffy funny silly
    brave friendly special favorite clever smart curious lonely great sunny magic magical
    colorful wise strong busy hungry sleepy lazy gentle cute wet dry clean dirty loud quiet
    shy excited fun lovely sweet tasty yummy fancy rich poor sick tired proud very really so
    too two three four five six seven eight nine ten year years""".split()
)
_ADJECTIVE_END = re.compile(r"(?:y|ful|ous|ive|ish|less|al|ic|ed)$")
# Never names, though capitalized at the start of a sentence; never nouns.
FUNCTION_WORDS = frozenset(
    """i me he she it we they you him them us his her its our their my your mine yours
    a an the this that these those some every another any all each no not
    and but or so if then than because when while after before as at by for from in into of
    off on onto out over to under up upon with without about around through
    once one there here where what who why how which today yesterday tomorrow now later soon
    suddenly finally first next last also too very just only again always never sometimes
    is are was were be been being am do does did done has have had can could will would
    shall should may might must let lets let's yes no oh wow hello hi bye please thank thanks
    okay ok look come go see named called""".split()
)
# Common verbs of TinyStories' first sentences: what follows a noun, never an adjective's noun.
VERBS = frozenset(
    """said saw went ran sat played looked wanted liked loved found got made took came lived
    jumped walked lost gave told asked says sees goes runs sits plays looks wants likes loves
    finds gets makes takes comes lives jumps walks loses gives tells asks""".split()
)
# Nouns that set a scene rather than name a thing to carry on ("once upon a time").
FILLER_NOUNS = frozenset("time day night morning lot bit way while kind thing things".split())
_FUNCTION_OR_VERB = FUNCTION_WORDS | VERBS  # no noun after an adjective
_NOT_NOUNS = _FUNCTION_OR_VERB | FILLER_NOUNS  # no noun after a determiner
_WORD_CASED = re.compile(r"[A-Za-z]+(?:['’][a-z]+)*")
_POSSESSIVE = re.compile(r"['’]s$")


def _owner(word: str) -> str:
    """A possessive's owner ("Lily's" -> "Lily", "dog’s" -> "dog"), other words as they are;
    a function word's contraction stays whole ("let's": never a name)."""
    if _lower(word) in FUNCTION_WORDS:
        return word
    return _POSSESSIVE.sub("", word)


def names_and_nouns(text: str) -> list[str]:
    """The names and nouns of ``text`` by a plain heuristic, in order, without repeats:

    - a name is a capitalized word that is no function word ("Lily", "Max", "Mom"; not
      "Once", "She", "The"); a possessive counts as its owner ("Lily's" -> "Lily");
    - a noun is the word after a determiner (a, the, his, ...), past up to three adjectives
      (common ones, and words ending like one, -y, -ful, -ous, ..., before another word: "a
      little girl" -> girl, "a clumsy rabbit" -> rabbit), unless it is a function or filler
      word ("a time").

    Pronouns are not followed (a completion that says "she" for Lily does not carry Lily),
    and nouns without a determiner ("birds sang") are missed."""
    tokens = [_owner(w) for w in _WORD_CASED.findall(text)]
    found: list[str] = []
    for i, w in enumerate(tokens):
        low = _lower(w)
        if w[0].isupper() and low not in FUNCTION_WORDS and low not in ADJECTIVES:
            found.append(w)
        elif low in DETERMINERS:
            j = i + 1
            while j + 1 < len(tokens) and j - i <= 3 and _adjective(tokens[j], tokens[j + 1]):
                j += 1
            noun = tokens[j].lower() if j < len(tokens) else ""
            if noun and tokens[j].islower() and noun not in _NOT_NOUNS:
                found.append(tokens[j])
    return list(dict.fromkeys(found))


def _adjective(word: str, following: str) -> bool:
    low = word.lower()
    if low in ADJECTIVES:
        return True
    # A noun may follow ("a clumsy rabbit"), not a verb ("the puppy jumped").
    noun = following.islower() and following not in _FUNCTION_OR_VERB
    noun = noun and not following.endswith("ed")
    return noun and bool(_ADJECTIVE_END.search(low)) and low not in FUNCTION_WORDS


def _forms(word: str) -> set[str]:
    """A word's singular and plural forms (ball/balls, box/boxes, puppy/puppies)."""
    w = word.lower()
    forms = {w, w + "s", w + "es"}
    if w.endswith("ies"):
        forms.add(w[:-3] + "y")
    if w.endswith("y"):
        forms.add(w[:-1] + "ies")
    for suffix in ("es", "s"):
        if w.endswith(suffix):
            forms.add(w[: -len(suffix)])
    return forms


def carryover(opening: str, completion: str) -> tuple[float | None, list[str], list[str]]:
    """The share of ``opening``'s names and nouns that ``completion`` uses again (in either
    number, any case, or as a possessive: "Lily's" carries Lily), with the carried and the
    dropped ones; None when the opening has none."""
    terms = names_and_nouns(opening)
    if not terms:
        return None, [], []
    present = {form for w in words(completion) for form in (w, _owner(w))}
    carried = [t for t in terms if _forms(t) & present]
    dropped = [t for t in terms if t not in carried]
    return len(carried) / len(terms), carried, dropped


def mean(values: Iterable) -> float | None:
    """The mean of the values that are not None (None: there are none)."""
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None
