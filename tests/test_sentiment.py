"""feedback.sentiment: exact parity with vaderSentiment, and VADER's agreement with human labels."""

from __future__ import annotations

import random

import pytest
from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE, SPECIAL_CASES, SentimentIntensityAnalyzer

from feedback.sentiment import Vader, goemotions_agreement, read_goemotions


@pytest.fixture(scope="module")
def reference():
    return SentimentIntensityAnalyzer()


@pytest.fixture(scope="module")
def goemotions(shared_data):
    return shared_data / "sentiment" / "goemotions_group_dev.tsv"


def test_parity_on_every_goemotions_text(goemotions, reference):
    texts, _ = read_goemotions(goemotions)
    assert len(texts) == 5426
    vader = Vader(cache_size=0)
    mismatches = [(t, reference.polarity_scores(t)["compound"], vader.score(t)) for t in texts]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert mismatches == []
    # The cached path returns the same numbers, and hits on the second pass.
    cached = Vader()
    first = cached.compounds(texts)
    assert cached.compounds(texts) == first
    assert cached.cache_hits >= len(texts)


def test_parity_on_adversarial_texts(reference):
    """Random mixes of the tokens VADER's rules react to: negations, boosters, 'but', 'least',
    'kind of', idioms, ALL CAPS, emoticons, emojis, punctuation runs, non-ASCII casing."""
    rng = random.Random(7)
    lexicon_words = sorted(reference.lexicon)
    rule_words = (list(BOOSTER_DICT) + NEGATE + [w for k in SPECIAL_CASES for w in k.split()]
                  + ["but", "BUT", "But", "no", "No", "least", "at", "very", "kind", "of", "never", "so",
                     "this", "without", "doubt", "or", "nor", "the", "shit", "bomb", "kinda"])
    extras = [":)", ":-(", ":D", "<3", "!!!", "??", "?", "!", "😁", "💘", "🙂x", "İstanbul", "ǅ", "n't",
              "isn't", "...", "'good'", "(bad)", "GOOD!", "Great!!", "LOL", "lol", "x", "ab"]
    # neutral words put modifiers 1, 2, 3 or more tokens away from the lexicon words
    fillers = ["cat", "went", "the", "data", "Reddit", "I", "a", "of", "to", "THE", "table", "we"]
    vader = Vader(cache_size=0)
    texts = []
    for _ in range(6000):
        words = []
        for _ in range(rng.randint(0, 22)):
            pool = rng.choice((lexicon_words, rule_words, extras, fillers, fillers))
            word = rng.choice(pool)
            if rng.random() < 0.15:
                word = word.upper()
            if rng.random() < 0.15:
                word = word + rng.choice(("!", ",", ".", "?", "!!"))
            words.append(word)
        texts.append(" ".join(words))
    mismatches = [t for t in texts if reference.polarity_scores(t)["compound"] != vader.score(t)]
    assert mismatches == []


def test_rejects_non_text():
    with pytest.raises(TypeError):
        Vader().score(None)


def test_agreement_with_goemotions_labels(goemotions):
    # Comments labelled positive xor negative; VADER's +-0.05 cut-offs; neutral calls count wrong.
    agreement = goemotions_agreement(goemotions)
    assert agreement.to_dict() == {
        "n": 3214, "n_positive": 2096, "n_negative": 1118,
        "coverage": 0.8945, "accuracy": 0.7642, "accuracy_decided": 0.8543,
        "f1_positive": 0.8534, "f1_negative": 0.7153, "macro_f1": 0.7843,
    }
