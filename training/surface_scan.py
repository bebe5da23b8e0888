"""Which surface statistics of the replies already predict a pairs file (`ahf eval surface`): a floor beside
the length baseline that a reward model should clear, and a check that a "reward" is not one of them.

Seven features per reply (below); the scan is nested in outer folds by prompt (`training.data.prompt_folds`):
on each fold's TRAINING pairs only, every feature f and direction d in (+1, -1) is scored as the rule "the
chosen reply has the larger d·f" (ties: half a win); the best rule (ties: the earlier feature in FEATURES,
then +1) scores the fold's held-out prompts with reward d·f(reply). The held-out rewards of all folds are
pooled into one `training.evaluation.pair_metrics`: the honest estimate of "scan 7 features, keep the best".
Also given, as a DIAGNOSTIC and not an honest estimate: each feature alone, its direction chosen per fold;
reading off the best of those rows is the scan on the evaluation pairs, optimistic.

Why it exists (issue 15, docs/training.md): on the 374 r/WritingPrompts pairs, an exploratory scan of these
features on all pairs found that shorter sentences win (`sentence_words`); nested like this, the scan picks
that feature in every fold and scores the same, so the choice did not inflate it.

The features of a reply (keyed by (its prompt, its text)):
- `words`: log(1 + words), and `sentence_words`: log(words / sentence ends), the probe's own values
  (`training.probe.Features.row`, float32 as the probe computes them);
- `prompt_similarity`: cosine of the prompt's and the reply's embeddings, and `originality`: 1 − the largest
  cosine between the reply and another distinct reply to the same prompt (1 when it has none). Embeddings are
  the probe's (frozen MiniLM, whole texts in windows of RMConfig's probe_chunk_tokens / probe_chunk_stride,
  the token-weighted mean of the windows; `embed`), cached;
- `dialogue`: share of the words inside double quotes ("…" or “…”, a quote closes on the same line);
- `paragraphs`: log(1 + non-blank lines) (the stories put one paragraph per line);
- `first_person`: share of words that are I, me, my, mine, myself, we, us, our, ours (case-insensitive; a
  word's surrounding punctuation is dropped, a contraction counts by its part before the apostrophe: I'm, we'll).
Words are `str.split()` tokens throughout, as the probe and the length baseline count them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ahf.console import UserError
from training import data as D

FEATURES = ("words", "prompt_similarity", "originality", "sentence_words", "dialogue", "paragraphs",
            "first_person")
EMBEDDING_FEATURES = ("prompt_similarity", "originality")
QUOTED = re.compile(r'"[^"\n]*"|“[^“”\n]*”')
FIRST_PERSON = frozenset({"i", "me", "my", "mine", "myself", "we", "us", "our", "ours"})
APOSTROPHE = re.compile(r"['’]")


# ----------------------------------------------------------------------------- features

def replies(pairs: list[D.Pair]) -> list[tuple[str, str]]:
    """Every distinct (prompt, reply) of the pairs, first-seen order (a rejected reply answers its
    rejected_prompt when the pair has one)."""
    keys = [k for p in pairs for k in ((p.prompt, p.chosen), (p.rejected_prompt or p.prompt, p.rejected))]
    return list(dict.fromkeys(keys))


def probe_value(name: str, text: str) -> float:
    """`words` or `sentence_words` exactly as the probe's head sees it (before standardisation)."""
    from training.probe import Features

    return float(Features((name,)).row(None, None, text)[0])


def dialogue(text: str) -> float:
    """Share of the words inside double quotes (the quote marks are not words)."""
    total = len(text.split())
    inside = sum(len(span.strip('"“”').split()) for span in QUOTED.findall(text))
    return min(1.0, inside / total) if total else 0.0


def paragraphs(text: str) -> float:
    return math.log1p(sum(1 for line in text.split("\n") if line.strip()))


def first_person(text: str) -> float:
    words = text.split()
    hits = sum(1 for w in words if APOSTROPHE.split(re.sub(r"^\W+|\W+$", "", w))[0].lower() in FIRST_PERSON)
    return hits / len(words) if words else 0.0


TEXT_FEATURES = {"words": lambda t: probe_value("words", t), "sentence_words": lambda t: probe_value(
    "sentence_words", t), "dialogue": dialogue, "paragraphs": paragraphs, "first_person": first_person}


def embed(pairs: list[D.Pair], cache_dir: str | Path, progress: Callable[[int], None] | None = None
          ) -> tuple[dict[str, np.ndarray], dict]:
    """The probe's embeddings of every prompt and reply ({text: vector}) and embed_texts' stats; `progress(n)`
    after each batch of n windows the encoder runs (the cache's texts run none)."""
    from training.probe import Chunking, FrozenEncoder, embed_texts, embedding_cache, rows_texts
    from training.rm import RMConfig

    defaults = RMConfig(method="probe")
    encoder, chunking = FrozenEncoder(None), Chunking(defaults.probe_chunk_tokens, defaults.probe_chunk_stride)
    encoder.check(chunking)
    return embed_texts(rows_texts(pairs), encoder, chunking, embedding_cache(cache_dir, encoder, chunking),
                       progress)


def surface_features(pairs: list[D.Pair], embeddings: dict[str, np.ndarray] | None = None
                     ) -> dict[str, dict[tuple[str, str], float]]:
    """{feature: {(prompt, reply): value}} in FEATURES order; without `embeddings` ({text: vector}) the two
    embedding features are left out."""
    keys = replies(pairs)  # the embedding features' None placeholders keep FEATURES order; filled below
    values = {name: {k: float(TEXT_FEATURES[name](k[1])) for k in keys} if name in TEXT_FEATURES else None
              for name in FEATURES if embeddings is not None or name not in EMBEDDING_FEATURES}
    if embeddings is not None:
        unit = {t: v / max(float(np.linalg.norm(v)), 1e-12) for t, v in embeddings.items()}
        values["prompt_similarity"] = {k: float(unit[k[0]] @ unit[k[1]]) for k in keys}
        siblings: dict[str, list[str]] = {}
        for prompt, reply in keys:
            siblings.setdefault(prompt, []).append(reply)
        values["originality"] = {
            (prompt, reply): 1.0 - max((float(unit[reply] @ unit[other]) for other in siblings[prompt]
                                        if other != reply), default=0.0) for prompt, reply in keys}
    return values


# ----------------------------------------------------------------------------- the scan

def rewards(pairs: list[D.Pair], values: dict[tuple[str, str], float], direction: int) -> tuple[list, list]:
    """(chosen, rejected) rewards d·f(reply)."""
    return ([direction * values[(p.prompt, p.chosen)] for p in pairs],
            [direction * values[(p.rejected_prompt or p.prompt, p.rejected)] for p in pairs])


def rules(train: list[D.Pair], features: dict[str, dict]) -> list[tuple[str, int, float]]:
    """Every rule's training accuracy: (feature, direction, accuracy), in FEATURES order, +1 before -1."""
    from training.evaluation import outcomes

    return [(name, direction, float(outcomes(*rewards(train, values, direction)).sum()) / len(train))
            for name, values in features.items() for direction in (1, -1)]


def pick(train: list[D.Pair], features: dict[str, dict]) -> tuple[str, int, float]:
    """The best rule on the training pairs: (feature, direction, training accuracy); ties keep the earlier
    feature, then +1 (max keeps the first of equal accuracies, which are exact: half-integer wins / n)."""
    return max(rules(train, features), key=lambda rule: rule[2])


def scan(pairs: list[D.Pair], folds: int, seed: int, features: dict[str, dict]) -> dict:
    """Nested: the rule picked on each fold's training prompts scores its held-out prompts. Returns
    training.evaluation.pair_metrics of the pooled held-out rewards, with `folds`, `held_wins` and each fold's
    pick (and its runner-up: how close the choice was)."""
    from training.evaluation import outcomes, pair_metrics

    chosen, rejected, scored, picks = [], [], [], []
    for k, (train, held) in enumerate(D.prompt_folds(pairs, folds, seed)):
        table = rules(train, features)
        name, direction, train_accuracy = max(table, key=lambda rule: rule[2])  # = pick(train, features)
        c, r = rewards(held, features[name], direction)
        chosen, rejected, scored = chosen + c, rejected + r, scored + held
        others = [rule for rule in table if rule[0] != name]
        runner_up = max(others, key=lambda rule: rule[2]) if others else None
        picks.append({"fold": k, "feature": name, "direction": direction,
                      "train_accuracy": round(train_accuracy, 4), "train_pairs": len(train),
                      "held_pairs": len(held), "held_wins": float(outcomes(c, r).sum()),
                      "runner_up": runner_up and {"feature": runner_up[0], "direction": runner_up[1],
                                                  "train_accuracy": round(runner_up[2], 4)}})
    return pair_metrics(chosen, rejected, scored, seed=seed) | {
        "folds": len(picks), "held_wins": float(outcomes(chosen, rejected).sum()), "picks": picks}


def surface_scan(pairs: list[D.Pair], folds: int = 5, seed: int = 0,
                 embeddings: dict[str, np.ndarray] | None = None) -> dict:
    """The honest scan (`scan` over every feature; its metrics at the top level) and, under `by_feature`,
    each feature alone with its direction chosen per fold: a diagnostic, since reading off the best of
    those is the scan on the evaluation pairs (optimistic)."""
    features = surface_features(pairs, embeddings)
    by_feature = {}
    for name in features:
        one = scan(pairs, folds, seed, {name: features[name]})
        by_feature[name] = {"accuracy": one["accuracy"], "accuracy_ci": one["accuracy_ci"]["bootstrap"],
                            "vs_length": one["vs_length"]["difference"],
                            "similar_length_accuracy": one["length_controlled"]["accuracy"],
                            "directions": [p["direction"] for p in one["picks"]]}
    return {"features": list(features), "seed": seed, **scan(pairs, folds, seed, features),
            "by_feature": by_feature}


def evaluate_surface(pairs_path: str | Path, folds: int = 5, seed: int = 0, detokenize: bool = False,
                     text_only: bool = False, cache_dir: str | Path | None = None,
                     progress: Callable[[int], None] | None = None) -> dict:
    """`ahf eval surface`: the surface scan of a pairs file; the two embedding features use the probe's
    default encoder (the offline MiniLM) and embedding cache unless `text_only` (`progress`: embed's)."""
    from training.probe import DEFAULT_CACHE

    pairs = D.load_pairs(pairs_path, detok=detokenize)
    prompts = len({p.prompt for p in pairs})
    if prompts < 2:
        raise UserError(f"{pairs_path}: {len(pairs)} pairs on {prompts} prompt(s); the scan holds prompts out, so "
                        "it needs pairs on 2 prompts at least")
    embeddings, stats = (None, None) if text_only else embed(pairs, cache_dir or DEFAULT_CACHE, progress)
    return {"pairs_file": str(pairs_path), **({"embedding": stats} if stats else {}),
            **surface_scan(pairs, folds, seed, embeddings)}
