"""How well the pipeline recovers the planted truth of the synthetic corpus (`ahf demo`).

mining.synthetic writes, beside its dumps, a sidecar `truth.jsonl`: every reply's hidden quality and
the dialog act the generator wrote. The store never sees it. `validate` reads the store only through
`mining.store.Store` and compares what the stages derived with that truth:

- `spearman_raw`, `spearman_adjusted`: Spearman correlation with the hidden quality of the raw score and
  of the seed's adjusted rank (`labels.adjusted`), over the labelled turns. The raw score mixes quality
  with post popularity and timing; the adjusted rank should undo part of that (goal: +0.1 at least).
- `tier_purity`: of the turns in the `good` and `bad` tiers, the share on the right side of the hidden
  quality (good tier: quality >= 0.5; bad tier: < 0.5); `tier_mean_quality` per tier.
- `shp_agreement`, `time_adjacent_agreement`: the share of each rule's pairs whose chosen reply has the
  strictly higher hidden quality (a tie counts as a miss; `*_ties` says how many there were).
- `pairs_length_baseline`: "the longer reply wins" over every pair of the store (the corpus's lengths are
  drawn independently of quality, so near 0.5; the held-out `length_baseline` below is a smaller sample).
- `sentiment_agreement`: of the turns whose direct replies take a side (mean VADER compound >= 0.05 or
  <= -0.05), the share where the side matches the turn's quality (positive under quality >= 0.5).
- `act_precision` (and `act_recall`) per act: the tagger's acts against the generator's.
- `rm_accuracy` and `length_baseline`: the reward model's accuracy (chosen scored higher) on the pairs
  held out of its training (the export's validation and test splits, pooled; `rm_by_split` has each)
  and "the longer reply wins" on the same pairs; `quality_ceiling`: "the higher hidden quality wins"
  on those pairs (ties count half), as well as a model that saw the truth could agree with the votes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson

from mining.store import Store
from mining.synthetic import read_truth

GOOD = 0.5  # hidden quality at or above it is "good" (specific and generic replies), below it "bad"
SENTIMENT_SIDE = 0.05  # VADER's usual threshold: a mean compound within +-0.05 of 0 takes no side

# The goals of the default demo: name -> (the figure: a key of the validation object, or the difference of two),
# the least value that meets it)
GOALS = {
    "adjusted_beats_raw": ("spearman_adjusted - spearman_raw", 0.10),
    "shp_agreement": ("shp_agreement", 0.90),
    "rm_beats_length": ("rm_accuracy - length_baseline", 0.15),
}


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(xs) < 3:
        return None
    value = spearmanr(xs, ys).statistic
    return None if value != value else round(float(value), 4)  # NaN (a constant column) -> None


def _share(hits: float, n: int) -> float | None:
    return round(hits / n, 4) if n else None


def _pair_agreement(pairs: list[tuple[str, str]], quality: dict[str, float]) -> tuple[float | None, float | None, int]:
    """(share with the chosen reply strictly better, share of ties, pairs with truth on both sides)."""
    known = [(quality[c], quality[r]) for c, r in pairs if c in quality and r in quality]
    wins = sum(c > r for c, r in known)
    ties = sum(c == r for c, r in known)
    return _share(wins, len(known)), _share(ties, len(known)), len(known)


def validate(store_dir: str | Path, truth_path: str | Path,
             held_out: dict[str, tuple[dict | None, str | Path]] | None = None) -> dict:
    """The validation figures (module docstring) of a store built from a synthetic corpus.

    `held_out`: {split: (a reward model's evaluation on that split's pairs file, the file)}, e.g. the
    pairs export's validation split (evaluated by the trainer) and test split (`ahf eval rm`); splits
    without an accuracy are left out."""
    truth = read_truth(truth_path)
    quality = {cid: row["quality"] for cid, row in truth.items()}
    with Store(store_dir, read_only=True) as store:
        labels = store.rows("SELECT l.comment_id, t.score, l.adjusted, l.tier, l.reply_sentiment_mean "
                            "FROM labels l JOIN turns t USING (comment_id) ORDER BY l.comment_id")
        pairs = store.rows("SELECT rule, chosen_id, rejected_id FROM pairs "
                           "ORDER BY post_id, rule, chosen_id, rejected_id")
        lengths = store.rows(  # words as str.split() counts them, the way training.rm.length_baseline does
            "SELECT len(regexp_split_to_array(trim(a.body), '\\s+')), len(regexp_split_to_array(trim(b.body), '\\s+')) "
            "FROM pairs p JOIN comments a ON a.id = p.chosen_id JOIN comments b ON b.id = p.rejected_id")
        acts = store.rows("SELECT comment_id, act FROM acts ORDER BY comment_id") if store.has_table("acts") else []
    labels = [row for row in labels if row[0] in quality]
    labelled = [row for row in labels if row[2] is not None]
    q = [quality[row[0]] for row in labelled]
    out: dict = {"truth": str(truth_path), "turns_with_truth": len(labels), "labelled": len(labelled),
                 "spearman_raw": _spearman([row[1] for row in labelled], q),
                 "spearman_adjusted": _spearman([row[2] for row in labelled], q)}

    tiered = [(row[3], quality[row[0]]) for row in labelled if row[3] in ("good", "bad")]
    out["tier_purity"] = _share(sum((tier == "good") == (v >= GOOD) for tier, v in tiered), len(tiered))
    by_tier: dict[str, list[float]] = {}
    for row in labelled:
        by_tier.setdefault(row[3], []).append(quality[row[0]])
    out["tier_mean_quality"] = {tier: round(sum(v) / len(v), 4) for tier, v in sorted(by_tier.items()) if tier}

    for rule in ("shp", "time_adjacent"):
        agree, ties, n = _pair_agreement([(c, r) for rl, c, r in pairs if rl == rule], quality)
        out[f"{rule}_agreement"], out[f"{rule}_ties"], out[f"{rule}_pairs"] = agree, ties, n

    sided = [(s >= SENTIMENT_SIDE, quality[cid] >= GOOD) for cid, _, _, _, s in labels
             if s is not None and abs(s) >= SENTIMENT_SIDE]
    out["sentiment_agreement"] = _share(sum(a == b for a, b in sided), len(sided))
    out["sentiment_turns"] = len(sided)

    out["pairs_length_baseline"] = _share(sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in lengths),
                                          len(lengths))
    out["act_precision"], out["act_recall"] = _act_scores(acts, truth)
    out.update(_reward_model(held_out or {}, quality))
    out["goals"] = goals(out)
    return out


def _act_scores(acts: list[tuple[str, str]], truth: dict[str, dict]) -> tuple[dict, dict]:
    tagged = [(act, truth[cid]["act"]) for cid, act in acts if cid in truth]
    found, made = Counter(a for a, _ in tagged), Counter(t for _, t in tagged)
    right = Counter(a for a, t in tagged if a == t)
    precision = {act: _share(right[act], found[act]) for act in sorted(found)}
    recall = {act: _share(right[act], made[act]) for act in sorted(made)}
    return precision, recall


def _reward_model(held_out: dict[str, tuple[dict, Path]], quality: dict[str, float]) -> dict:
    """Accuracy, length baseline and hidden-quality ceiling over every held-out split (pairs-weighted)."""
    by_split = {}
    for split, (result, path) in held_out.items():
        if not result or "accuracy" not in result or not Path(path).exists():
            continue
        with open(path, "rb") as fh:
            rows = [orjson.loads(line) for line in fh if line.strip()]
        known = [(quality[r["chosen_id"]], quality[r["rejected_id"]]) for r in rows
                 if r.get("chosen_id") in quality and r.get("rejected_id") in quality]
        ceiling = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in known)
        by_split[split] = {"pairs": result["pairs"], "accuracy": round(result["accuracy"], 4),
                           "length_baseline": round(result["length_baseline"], 4),
                           "quality_ceiling": _share(ceiling, len(known))}
    n = sum(s["pairs"] for s in by_split.values())
    if not n:
        return {"rm_accuracy": None, "length_baseline": None, "quality_ceiling": None, "rm_pairs": 0}

    def pooled(key: str) -> float | None:
        parts = [(s[key], s["pairs"]) for s in by_split.values()]
        return None if any(v is None for v, _ in parts) else round(sum(v * k for v, k in parts) / n, 4)

    return {"rm_accuracy": pooled("accuracy"), "length_baseline": pooled("length_baseline"),
            "quality_ceiling": pooled("quality_ceiling"), "rm_pairs": n, "rm_by_split": by_split}


def goals(figures: dict) -> dict:
    """{goal: {value, target, met}} for the figures that are there (a goal without its figures is left out)."""
    out = {}
    for name, (expression, target) in GOALS.items():
        terms = [t.strip() for t in expression.split(" - ")]
        values = [figures.get(t) for t in terms]
        if any(v is None for v in values):
            continue
        value = round(values[0] - (values[1] if len(values) > 1 else 0.0), 4)
        out[name] = {"value": value, "target": target, "met": value >= target, "of": expression}
    return out


def format_validation(v: dict) -> list[str]:
    """The validation figures as the demo prints them."""
    def f(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"  planted truth ({v['labelled']} labelled turns): Spearman with hidden quality: raw score "
             f"{f(v['spearman_raw'])}, adjusted rank {f(v['spearman_adjusted'])}; tier purity {f(v['tier_purity'])}",
             f"  pairs agreeing with hidden quality: SHP {f(v['shp_agreement'])} of {v['shp_pairs']}, "
             f"time-adjacent {f(v['time_adjacent_agreement'])} of {v['time_adjacent_pairs']}; reply sentiment "
             f"{f(v['sentiment_agreement'])} of {v['sentiment_turns']} turns",
             "  act precision: " + ", ".join(f"{act} {f(p)}" for act, p in v["act_precision"].items())]
    if v.get("rm_accuracy") is not None:
        lines.append(f"  reward model on {v['rm_pairs']} held-out pairs: accuracy {f(v['rm_accuracy'])}, "
                     f"length baseline {f(v['length_baseline'])} (all pairs: {f(v['pairs_length_baseline'])}), "
                     f"hidden-quality ceiling {f(v['quality_ceiling'])}")
    if v.get("goals"):
        lines.append("  goals of the default demo: " + ", ".join(
            f"{g['of']} {g['value']:.3f} >= {g['target']:.2f} {'met' if g['met'] else 'NOT MET'}"
            for g in v["goals"].values()))
    return lines
