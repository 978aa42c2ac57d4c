"""The story suite's text measures (slm.measures), each against hand-computed values."""

from __future__ import annotations

import pytest

from slm import measures as ms

LOOP = "the dog ran. the dog ran. the dog ran."
VARIED = "Lily found a red ball in the park."
OPENING = "Once upon a time, there was a little girl named Lily. She had a big red ball."


def test_distinct_n_and_repeats_by_hand():
    # LOOP: "the dog ran ." x3: 12 units (words and marks), 4 distinct; 11 bigrams, 4
    # distinct; 10 trigrams, 4 distinct; 9 4-grams, 4 distinct.
    assert ms.units(LOOP) == ["the", "dog", "ran", "."] * 3
    assert ms.distinct_n([LOOP], 1) == pytest.approx(4 / 12)
    assert ms.distinct_n([LOOP], 2) == pytest.approx(4 / 11)
    assert ms.distinct_n([LOOP], 3) == pytest.approx(4 / 10)
    assert ms.repeat_rate(LOOP, 4) == pytest.approx(1 - 4 / 9)
    # VARIED: 9 distinct units, no repeated 4-gram.
    assert ms.distinct_n([VARIED], 1) == 1.0 and ms.repeat_rate(VARIED) == 0.0
    # Across completions: 21 units, "the" and "." in both: 4 + 9 - 2 = 11 distinct.
    assert ms.distinct_n([LOOP, VARIED], 1) == pytest.approx(11 / 21)
    # A loop of line breaks has no words, but repeats: 7 4-grams, 1 distinct.
    assert ms.words("\n" * 10) == [] and ms.repeat_rate("\n" * 10) == pytest.approx(6 / 7)
    assert ms.repeat_rate("too short") is None and ms.distinct_n([""], 2) is None
    assert ms.words("Don’t  go, Sam!") == ["don't", "go", "sam"]


def test_names_and_nouns_and_carryover_by_hand():
    # "a time" is filler, "little" an adjective before the noun, "She" a function word.
    assert ms.names_and_nouns(OPENING) == ["girl", "Lily", "ball"]
    assert ms.carryover(OPENING, OPENING) == (1.0, ["girl", "Lily", "ball"], [])
    # "balls" carries "ball" (either number), "lily" carries "Lily" (any case).
    share, carried, dropped = ms.carryover(OPENING, "lily threw the balls to her dog.")
    assert (share, carried, dropped) == (pytest.approx(2 / 3), ["Lily", "ball"], ["girl"])
    assert ms.carryover(OPENING, "She smiled.")[0] == 0.0
    assert ms.carryover("It was sunny.", "It was sunny.") == (None, [], [])
    assert ms.names_and_nouns("Tom and Sue saw the puppies.") == ["Tom", "Sue", "puppies"]
    # An adjective's ending before a noun is skipped; not before a verb.
    assert ms.names_and_nouns("There was a clumsy rabbit.") == ["rabbit"]
    assert ms.names_and_nouns("The puppy jumped on a bed.") == ["puppy", "bed"]
    assert ms.carryover("Tom saw the puppies.", "Tom had a puppy.")[0] == 1.0


def test_a_possessive_carries_its_name_and_noun():
    """A possessive is its owner: "Lily's" (or "Lily’s") in a completion carries Lily (it was
    counted as dropping her), and in an opening names her (as "the dog's" names the dog);
    "let's" stays no name."""
    opening = "Lily had a dog named Max."
    completion = "Lily's dog ran to Max’s bed."
    assert ms.carryover(opening, completion) == (1.0, ["Lily", "dog", "Max"], [])
    assert ms.carryover(opening, "The dog's ball was red.")[1] == ["dog"]
    assert ms.names_and_nouns("Lily's mom saw the dog's ball.") == ["Lily", "dog"]
    assert ms.carryover("Lily’s mom smiled.", "lily smiled.") == (1.0, ["Lily"], [])
    assert ms.names_and_nouns("Let's go! It's Tom's cat.") == ["Tom"]
