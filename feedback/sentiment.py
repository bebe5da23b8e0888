"""VADER compound scores, identical to `vaderSentiment` 3.3.2 but several times faster.

`vaderSentiment.SentimentIntensityAnalyzer.polarity_scores` spends most of its time on work that
cannot change the compound score: it lower-cases the whole token list again for every lexicon word
(quadratic in the comment length), walks every character looking for emojis, and computes the
pos/neu/neg ratios. `Vader.compound` runs the same lexicon and the same rules, in the same order
and with the same floating-point operations, but

- skips the emoji pass for ASCII texts and texts without any emoji character,
- lower-cases each distinct token once (a memo) and visits only tokens that are in the lexicon
  (every other token scores 0 in VADER, and adding 0 to a float sum changes nothing),
- runs the look-back rules (boosters, negations, "no", "least", capitals, idioms) only for lexicon
  words where one of them can apply: a modifier within three tokens before it, capitals, or all
  words of an idiom present; everywhere else those rules provably return the lexicon valence,
- replays VADER's "but" rule (including its quirk of rescaling the *first* entry equal to a value,
  see `_but_rule`) on the lexicon hits only,
- caches the score of repeated texts (Reddit repeats "lol", "This.", "Thanks!" a lot).

Parity with the reference on every text of the GoEmotions dev file and on 6,000 adversarial texts
is a test (tests/test_sentiment.py); `goemotions_agreement` measures VADER against those human labels.
"""

from __future__ import annotations

import csv
import string
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import compress, count
from pathlib import Path

from vaderSentiment import vaderSentiment as _ref

PUNCTUATION = string.punctuation
BOOSTERS = _ref.BOOSTER_DICT
SPECIAL_CASES = _ref.SPECIAL_CASES
NEGATIONS = frozenset(_ref.NEGATE)
B_INCR, C_INCR, N_SCALAR = _ref.B_INCR, _ref.C_INCR, _ref.N_SCALAR

TOKEN_MEMO_SIZE = 500_000  # distinct tokens remembered between texts (about 60 MB at most)

# Scores at or beyond +-0.05 are VADER's documented cut-offs for positive / negative.
POSITIVE_THRESHOLD = 0.05


class _LoweredTokens(dict):
    """raw token -> SentiText._strip_punc_if_word(token).lower(), computed once per distinct token.

    Only the lower-case form is kept: the rules' `isupper()` tests give the same answer on the raw
    token, since stripping removes ASCII punctuation only, which has no case.
    """

    def __missing__(self, token: str) -> str:
        stripped = token.strip(PUNCTUATION)
        value = (token if len(stripped) <= 2 else stripped).lower()
        self[token] = value
        return value


# Tokens that can change a lexicon word's valence from 1-3 places before it: boosters / dampeners,
# what _negation_check looks at, "no" and "least" (tokens containing "n't" are found separately).
MODIFIERS = frozenset(BOOSTERS) | NEGATIONS | {"never", "so", "this", "without", "doubt", "no", "least"}


def _negated(word_lower: str) -> bool:
    # vaderSentiment.negated([w]) lower-cases again; do the same so exotic casings agree.
    word = word_lower.lower()
    return word in NEGATIONS or "n't" in word


def _booster_scalar(word: str, word_lower: str, valence: float, is_cap_diff: bool) -> float:
    """vaderSentiment.scalar_inc_dec, with the token's lower-case form passed in."""
    scalar = 0.0
    if word_lower in BOOSTERS:
        scalar = BOOSTERS[word_lower]
        if valence < 0:
            scalar *= -1
        if word.isupper() and is_cap_diff:
            if valence > 0:
                scalar += C_INCR
            else:
                scalar -= C_INCR
    return scalar


def _negation_rule(valence: float, lw: list[str], start_i: int, i: int) -> float:
    """vaderSentiment._negation_check on the pre-lowered tokens."""
    if start_i == 0:
        if _negated(lw[i - 1]):
            valence = valence * N_SCALAR
    elif start_i == 1:
        if lw[i - 2] == "never" and (lw[i - 1] == "so" or lw[i - 1] == "this"):
            valence = valence * 1.25
        elif lw[i - 2] == "without" and lw[i - 1] == "doubt":
            pass
        elif _negated(lw[i - 2]):
            valence = valence * N_SCALAR
    else:
        if (lw[i - 3] == "never" and (lw[i - 2] == "so" or lw[i - 2] == "this")) or (
            lw[i - 1] == "so" or lw[i - 1] == "this"
        ):
            valence = valence * 1.25
        elif lw[i - 3] == "without" and (lw[i - 2] == "doubt" or lw[i - 1] == "doubt"):
            pass
        elif _negated(lw[i - 3]):
            valence = valence * N_SCALAR
    return valence


# Every word of a special-case idiom or of a multi-word booster ("kind of"): an n-gram of tokens
# can only match when all its tokens are among these (tokens never contain spaces).
IDIOM_WORDS = frozenset(w for key in (*SPECIAL_CASES, *BOOSTERS) if " " in key for w in key.split())


# The word sets of those n-grams: one can only match when all its words occur in the text.
IDIOM_KEY_WORDS = tuple(frozenset(key.split()) for key in (*SPECIAL_CASES, *BOOSTERS) if " " in key)


def _idiom_possible(lw: list[str]) -> bool:
    if IDIOM_WORDS.isdisjoint(lw):
        return False
    present = IDIOM_WORDS.intersection(lw)
    return any(words <= present for words in IDIOM_KEY_WORDS)


def _idiom_rule(valence: float, lw: list[str], i: int) -> float:
    """vaderSentiment._special_idioms_check (only reached with i >= 3)."""
    if IDIOM_WORDS.isdisjoint(lw[i - 3:i + 3]):
        return valence
    onezero = f"{lw[i - 1]} {lw[i]}"
    twoonezero = f"{lw[i - 2]} {lw[i - 1]} {lw[i]}"
    twoone = f"{lw[i - 2]} {lw[i - 1]}"
    threetwoone = f"{lw[i - 3]} {lw[i - 2]} {lw[i - 1]}"
    threetwo = f"{lw[i - 3]} {lw[i - 2]}"
    for seq in (onezero, twoonezero, twoone, threetwoone, threetwo):
        if seq in SPECIAL_CASES:
            valence = SPECIAL_CASES[seq]
            break
    n = len(lw)
    if n - 1 > i:
        zeroone = f"{lw[i]} {lw[i + 1]}"
        if zeroone in SPECIAL_CASES:
            valence = SPECIAL_CASES[zeroone]
    if n - 1 > i + 1:
        zeroonetwo = f"{lw[i]} {lw[i + 1]} {lw[i + 2]}"
        if zeroonetwo in SPECIAL_CASES:
            valence = SPECIAL_CASES[zeroonetwo]
    for n_gram in (threetwoone, threetwo, twoone):
        if n_gram in BOOSTERS:
            valence = valence + BOOSTERS[n_gram]
    return valence


def _but_rule(lw: list[str], positions: list[int], values: list[float]) -> None:
    """vaderSentiment._but_check on the non-zero entries, in place.

    The reference walks the full score list and rescales `sentiments.index(value)`, i.e. the
    *first* entry equal to the current value (which may be an earlier, already rescaled one).
    Zero entries rescale to zero, and the first entry equal to a non-zero value is always a
    lexicon hit, so replaying the walk over the hits with their positions gives the same list.
    """
    try:
        bi = lw.index("but")
    except ValueError:
        return
    for k in range(len(values)):
        value = values[k]
        if value == 0:
            continue
        si = values.index(value)
        if positions[si] < bi:
            values[si] = value * 0.5
        elif positions[si] > bi:
            values[si] = value * 1.5


class Vader:
    """`Vader().compound(text)` == `SentimentIntensityAnalyzer().polarity_scores(text)["compound"]`."""

    def __init__(self, cache_size: int = 200_000):
        reference = _ref.SentimentIntensityAnalyzer()
        self.lexicon: dict[str, float] = reference.lexicon
        self.emojis: dict[str, str] = reference.emojis
        # The reference looks emojis up one character at a time, so only 1-char keys can match.
        self._emoji_chars = frozenset(k for k in self.emojis if len(k) == 1)
        self._lexicon_keys = frozenset(self.lexicon)
        self._lowered = _LoweredTokens()
        self.cache_size = cache_size
        self._cache: dict[str, float] = {}
        self.calls = 0
        self.cache_hits = 0

    # -- public API -------------------------------------------------------------------------

    def compound(self, text: str) -> float:
        self.calls += 1
        score = self._cache.get(text)
        if score is not None:
            self.cache_hits += 1
            return score
        score = self.score(text)
        if self.cache_size:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()  # crude but bounded; repeats are mostly short and re-enter fast
            self._cache[text] = score
        return score

    def compounds(self, texts: Iterable[str]) -> list[float]:
        return [self.compound(t) for t in texts]

    def score(self, text: str) -> float:
        """The compound score without the cache."""
        if not isinstance(text, str):
            raise TypeError(f"VADER scores text, got {type(text).__name__}")
        if len(self._lowered) > TOKEN_MEMO_SIZE:
            self._lowered.clear()  # bounded memory on endless vocabularies (URLs, typos)
        if not text.isascii() and not self._emoji_chars.isdisjoint(text):
            text = self._replace_emojis(text)
        # map() over memo dicts keeps the per-token work in C; only unseen tokens reach Python.
        words = text.split()
        lw = list(map(self._lowered.__getitem__, words))
        if self._lexicon_keys.isdisjoint(lw):
            return 0.0  # every token scores 0
        lexicon = self.lexicon
        hits = list(compress(count(), map(lexicon.__contains__, lw)))
        positions: list[int] = []
        values: list[float] = []
        cap_diff: list[bool] = []  # computed on first use: most texts never need it
        n = len(words)
        # A lexicon word keeps its plain lexicon valence unless it is "no", is in capitals, has a
        # modifier 1-3 tokens before it, or an idiom's words all occur in the text: find the
        # modifiers once per text, and run the rules only where they can change something.
        # Non-ASCII text (where lower() has exotic cases) always runs the rules.
        if text.isascii() and not _idiom_possible(lw):
            modifiers = set(compress(count(), map(MODIFIERS.__contains__, lw)))
            if "'" in text and "n't" in text.lower():
                modifiers.update(k for k, w in enumerate(lw) if "n't" in w)
        else:
            modifiers = None
        for i in hits:
            item_lower = lw[i]
            if item_lower in BOOSTERS:
                continue
            if item_lower == "kind" and i < n - 1 and lw[i + 1] == "of":
                continue
            positions.append(i)
            if (modifiers is not None and item_lower != "no" and (i - 1) not in modifiers
                    and (i - 2) not in modifiers and (i - 3) not in modifiers and not words[i].isupper()):
                values.append(lexicon[item_lower])
            else:
                values.append(self._valence(words, lw, i, cap_diff))
        _but_rule(lw, positions, values)
        sum_s = float(sum(values))
        if not values:
            return 0.0
        amplifier = _punctuation_emphasis(text)
        if sum_s > 0:
            sum_s += amplifier
        elif sum_s < 0:
            sum_s -= amplifier
        return round(_ref.normalize(sum_s), 4)

    # -- the rules ----------------------------------------------------------------------------

    def _replace_emojis(self, text: str) -> str:
        out = []
        prev_space = True
        for ch in text:
            if ch in self.emojis:
                if not prev_space:
                    out.append(" ")
                out.append(self.emojis[ch])
                prev_space = False
            else:
                out.append(ch)
                prev_space = ch == " "
        return "".join(out).strip()

    @staticmethod
    def _is_cap_diff(words: list[str], memo: list[bool]) -> bool:
        if not memo:
            upper = sum(map(str.isupper, words))
            memo.append(0 < len(words) - upper < len(words))
        return memo[0]

    def _valence(self, words: list[str], lw: list[str], i: int, cap_memo: list[bool]) -> float:
        """vaderSentiment.sentiment_valence for a lexicon token at position i."""
        lexicon = self.lexicon
        item = words[i]
        item_lower = lw[i]
        valence = lexicon[item_lower]
        if item_lower == "no" and i != len(lw) - 1 and lw[i + 1] in lexicon:
            valence = 0.0
        if (i > 0 and lw[i - 1] == "no") or (i > 1 and lw[i - 2] == "no") or (
            i > 2 and lw[i - 3] == "no" and lw[i - 1] in ("or", "nor")
        ):
            valence = lexicon[item_lower] * N_SCALAR
        if item.isupper() and self._is_cap_diff(words, cap_memo):
            if valence > 0:
                valence += C_INCR
            else:
                valence -= C_INCR
        for start_i in range(3):
            if i > start_i and lw[i - (start_i + 1)] not in lexicon:
                j = i - (start_i + 1)
                s = 0.0
                if lw[j] in BOOSTERS:  # scalar_inc_dec returns 0.0 for every other word
                    s = _booster_scalar(words[j], lw[j], valence, self._is_cap_diff(words, cap_memo))
                if start_i == 1 and s != 0:
                    s = s * 0.95
                if start_i == 2 and s != 0:
                    s = s * 0.9
                valence = valence + s
                valence = _negation_rule(valence, lw, start_i, i)
                if start_i == 2:
                    valence = _idiom_rule(valence, lw, i)
        # _least_check
        if i > 1 and lw[i - 1] not in lexicon and lw[i - 1] == "least":
            if lw[i - 2] != "at" and lw[i - 2] != "very":
                valence = valence * N_SCALAR
        elif i > 0 and lw[i - 1] not in lexicon and lw[i - 1] == "least":
            valence = valence * N_SCALAR
        return valence


def _punctuation_emphasis(text: str) -> float:
    ep_count = min(text.count("!"), 4)
    qm_count = text.count("?")
    qm_amplifier = 0
    if qm_count > 1:
        qm_amplifier = qm_count * 0.18 if qm_count <= 3 else 0.96
    return ep_count * 0.292 + qm_amplifier


# -- agreement with human labels ------------------------------------------------------------


@dataclass
class Agreement:
    """VADER vs GoEmotions' grouped labels, on comments labelled positive or negative (not both).

    A comment is predicted positive when compound >= 0.05, negative when <= -0.05, else neutral;
    neutral predictions count as wrong in `accuracy` and `macro_f1`, and are left out of
    `accuracy_decided`.
    """

    n: int
    n_positive: int
    n_negative: int
    coverage: float  # share of comments VADER calls positive or negative
    accuracy: float
    accuracy_decided: float
    f1_positive: float
    f1_negative: float
    macro_f1: float

    def to_dict(self) -> dict:
        return asdict(self)


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def read_goemotions(tsv: str | Path) -> tuple[list[str], list[set[str]]]:
    """Texts and label-name sets of a GoEmotions `text \\t label_ids \\t comment_id` file."""
    tsv = Path(tsv)
    names = (tsv.parent / "goemotions_group_labels.txt").read_text().split()
    texts, labels = [], []
    with tsv.open(newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) != 3:
                raise ValueError(f"{tsv}:{lineno}: expected 3 tab-separated fields, got {len(row)}")
            try:
                labels.append({names[int(x)] for x in row[1].split(",")})
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{tsv}:{lineno}: bad label_ids {row[1]!r}") from exc
            texts.append(row[0])
    return texts, labels


def goemotions_agreement(tsv: str | Path, vader: Vader | None = None) -> Agreement:
    vader = vader or Vader()
    texts, labels = read_goemotions(tsv)
    gold, pred = [], []
    for text, names in zip(texts, labels):
        if ("positive" in names) == ("negative" in names):
            continue
        gold.append("positive" if "positive" in names else "negative")
        c = vader.compound(text)
        pred.append("positive" if c >= POSITIVE_THRESHOLD else "negative" if c <= -POSITIVE_THRESHOLD else "neutral")
    n = len(gold)
    correct = sum(g == p for g, p in zip(gold, pred))
    decided = sum(p != "neutral" for p in pred)
    f1 = {}
    for cls in ("positive", "negative"):
        tp = sum(g == cls and p == cls for g, p in zip(gold, pred))
        fp = sum(g != cls and p == cls for g, p in zip(gold, pred))
        fn = sum(g == cls and p != cls for g, p in zip(gold, pred))
        f1[cls] = _f1(tp, fp, fn)
    return Agreement(
        n=n,
        n_positive=gold.count("positive"),
        n_negative=gold.count("negative"),
        coverage=round(decided / n, 4),
        accuracy=round(correct / n, 4),
        accuracy_decided=round(correct / decided, 4) if decided else 0.0,
        f1_positive=round(f1["positive"], 4),
        f1_negative=round(f1["negative"], 4),
        macro_f1=round((f1["positive"] + f1["negative"]) / 2, 4),
    )

