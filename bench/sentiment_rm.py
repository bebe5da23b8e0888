"""Reward models from reply sentiment alone, from votes, and from both (issue 15): the 3 x 2 table.

Three probe reward models (`ahf train rm --set method=probe`: frozen MiniLM, a Bradley-Terry head) are
trained on the train split of three pair exports of one store: `vote` (rules shp + time_adjacent),
`sentiment` (rule sentiment) and `combined` (all three; the export keeps one copy of a pair two rules
made, the larger margin). Each model is then scored on the TEST split of the vote pairs and of the
sentiment pairs (`training.evaluation.pair_metrics`: accuracy with a 95 % bootstrap interval over prompts,
the length baseline). The export splits by post with one seed, so no test post is in any training split.
A control, `vote_matched`: the vote model trained on a random sample of the vote training pairs as large as
the sentiment model's training set (is the sentiment model weaker for its labels or for its size?).

Corpora (`--corpus`):
- `synthetic`: mining.synthetic with `reaction_scale` (more reactions per comment than the demo's corpus,
  so turns have several replies), one corpus per `--seeds` value; its planted truth (truth.jsonl) adds,
  per held-out set, how often the chosen reply has the higher hidden quality (`truth_agreement`), and per
  model its accuracy on those test pairs re-oriented by the hidden quality (`truth_accuracy`, ties out).
  With several seeds the `pooled` table scores every seed's model on its own test pairs, pooled.
- `shared`: the shared files that hold threads (as bench/sentiment_pairs.py). Their pairs sit in a few
  threads, so a split by post leaves a side empty: the prompts of the sentiment pairs are held out instead
  (test: every pair of those prompts; train: the pairs of every other prompt). A model is trained only from
  at least `--min-train-pairs` training pairs (else `skipped`, with the count).
Splits: `--splits` train / validation / test fractions of posts (default 0.7 / 0.1 / 0.2: a test split
large enough to measure; the probe picks its L2 and epoch on prompts held out of the train split).

    python bench/sentiment_rm.py --json --out bench/out/sentiment_rm.json
    python bench/sentiment_rm.py --corpus synthetic --posts 500 --reaction-scale 10 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from ahf.config import load_config  # noqa: E402
from feedback.export import export_dataset  # noqa: E402
from feedback.labels import LabelConfig, label_store  # noqa: E402
from mining.ingest import ingest  # noqa: E402
from mining.synthetic import SyntheticSpec, generate, read_truth  # noqa: E402
from training.evaluation import outcomes, pair_metrics, wilson_interval  # noqa: E402
from training.rm import RMConfig, score_reward_model, train_reward_model  # noqa: E402

from sentiment_pairs import DATA, SOURCES as SHARED_SOURCES  # noqa: E402  (bench/sentiment_pairs.py: the thread files)
RULE_SETS = {"vote": ["shp", "time_adjacent"], "sentiment": ["sentiment"],
             "combined": ["shp", "time_adjacent", "sentiment"]}
TEST_SETS = ("vote", "sentiment")  # the held-out pairs every model is scored on
# the models: one per rule set, and a control: the vote model on as many training pairs as the sentiment one
MODELS = (*RULE_SETS, "vote_matched")


# ----------------------------------------------------------------------------- stores and exports

def synthetic_store(work: Path, posts: int, scale: float, seed: int) -> tuple[Path, Path]:
    """(store, truth.jsonl) of a synthetic corpus with `reaction_scale` = scale."""
    paths = generate(work / "corpus", SyntheticSpec(posts=posts, seed=seed, reaction_scale=scale))
    return _ingested([paths["posts"], paths["comments"]], work / "store"), paths["truth"]


def shared_store(work: Path) -> Path:
    missing = [str(p) for p in SHARED_SOURCES if not p.exists()]
    if missing or not SHARED_SOURCES:
        raise SystemExit(f"shared data not found (set AHF_SHARED_DATA): {', '.join(missing) or DATA}")
    return _ingested(SHARED_SOURCES, work / "store")


def _ingested(sources: list, store: Path) -> Path:
    report = ingest(sources, store)
    if not report.ok:
        raise SystemExit(f"ingest failed: {report.errors}")
    return store


def label(store: Path, corpus: str) -> dict:
    """Labels with the sentiment rule on (comment-only dumps carry no post score: SHP allows unknown posts)."""
    overrides = ["sentiment_pairs.enabled=true"] + (["shp.unknown_post=allow"] if corpus == "shared" else [])
    return label_store(store, load_config(LabelConfig, "labels", overrides=overrides)).to_dict()["pairs"]


def export_rule_sets(store: Path, work: Path, splits: dict[str, float]) -> dict[str, dict]:
    """One pairs export per rule set, split by post: {name: {"train": the export directory (the probe
    trains on its train split and picks its epoch on its validation split), "test": its test split,
    "rows": {split: pairs}}}."""
    out = {}
    for name in RULE_SETS:
        directory = _export(store, work, name, splits)
        out[name] = {"train": directory, "test": directory / "test.jsonl",
                     "rows": {s: _lines(directory / f"{s}.jsonl") for s in splits}}
    out["vote_matched"] = size_matched(out["vote"], out["sentiment"]["rows"]["train"], work / "vote_matched.jsonl")
    return out


def size_matched(export: dict, n: int, path: Path, seed: int = 0) -> dict:
    """A random `n` of an export's training pairs (a file), its validation split kept as the held-out."""
    rows = (export["train"] / "train.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(random.Random(seed).sample(rows, min(n, len(rows)))))
    return {"train": path, "eval_pairs": export["train"] / "validation.jsonl", "test": export["test"],
            "rows": {"train": min(n, len(rows)), "test": export["rows"]["test"]}}


def held_out_by_prompt(store: Path, work: Path) -> dict[str, dict]:
    """For a store whose pairs sit in a handful of threads (the shared files: a split by post leaves a side
    empty): every pair of each rule set, the prompts of the sentiment pairs held out. Test = the pairs of
    those prompts (all the sentiment pairs; the vote pairs among the same siblings), train = the rest."""
    rows = {}
    for name in RULE_SETS:
        directory = _export(store, work, name, {"train": 1.0})
        rows[name] = [json.loads(line) for line in (directory / "train.jsonl").open()]
    held = {r["prompt"] for r in rows["sentiment"]}
    out = {}
    for name, all_rows in rows.items():
        parts = {"train": [r for r in all_rows if r["prompt"] not in held],
                 "test": [r for r in all_rows if r["prompt"] in held]}
        for split, part in parts.items():
            (work / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        out[name] = {"train": work / f"{name}_train.jsonl", "test": work / f"{name}_test.jsonl",
                     "rows": {split: len(part) for split, part in parts.items()}}
    return out


def _export(store: Path, work: Path, name: str, splits: dict[str, float]) -> Path:
    config = load_config(LabelConfig, "labels").export.model_copy(update={"rules": RULE_SETS[name], "splits": splits})
    directory = work / "exports" / name
    export_dataset(store, "pairs", directory, force=True, config=config)
    return directory


def _lines(path: Path) -> int:
    return sum(1 for _ in path.open()) if path.exists() else 0


# ----------------------------------------------------------------------------- models

def train_probe(export: dict, out: Path, seed: int, min_train_pairs: int) -> dict:
    """A probe reward model on `export["train"]` (an export directory or a pairs file)."""
    if export["rows"]["train"] < min_train_pairs:
        return {"skipped": f"{export['rows']['train']} training pairs < {min_train_pairs}"}
    overrides = ["method=probe", f"seed={seed}"] + ([f"eval_pairs={export['eval_pairs']}"]
                                                    if export.get("eval_pairs") else [])
    config = load_config(RMConfig, "train/rm", overrides=overrides)
    started = time.perf_counter()
    result = train_reward_model(config, export["train"], out)
    return {"dir": out, "train_rows": result["train_rows"] if "train_rows" in result else None,
            "chosen_l2": result["probe"]["chosen_l2"], "epochs": result["probe"]["epochs"],
            "seconds": round(time.perf_counter() - started, 1)}


def score(model_dir: Path, test_path: Path) -> dict:
    """Rewards of a model on a test file, with the file's rows (for ids)."""
    chosen, rejected, pairs, _ = score_reward_model(model_dir, test_path)
    rows = [json.loads(line) for line in test_path.open()]
    return {"chosen": chosen, "rejected": rejected, "pairs": pairs, "rows": rows}


def cell(scored: dict, truths: list[tuple[dict, int]] | None) -> dict:
    """Accuracy with its 95 % bootstrap interval over prompts, the length baseline and, with the truth, the
    accuracy on the same pairs oriented by hidden quality (pairs of equal quality left out). `truths`:
    (a corpus's truth, how many of the rows, in order, are that corpus's), as comment ids repeat across seeds."""
    m = pair_metrics(scored["chosen"], scored["rejected"], scored["pairs"])
    out = {"pairs": m["pairs"], "prompts": m["prompts"], "accuracy": round(m["accuracy"], 4),
           "ci95": [round(x, 4) for x in m["accuracy_ci"]["bootstrap"]],
           "length_baseline": round(m["length_baseline"], 4)}
    if truths:
        out["truth_accuracy"] = _truth_accuracy(scored, truths)
    return out


def _truth_accuracy(scored: dict, truths: list[tuple[dict, int]]) -> dict:
    """Share of pairs where the model prefers the reply of higher hidden quality (ties in reward: half)."""
    wins, start = [], 0
    for truth, count in truths:
        for i in range(start, start + count):
            row = scored["rows"][i]
            qc, qr = _quality(truth, row["chosen_id"]), _quality(truth, row["rejected_id"])
            if qc is None or qr is None or qc == qr:
                continue
            c, r = scored["chosen"][i], scored["rejected"][i]
            wins.append(float(outcomes([c], [r])[0]) if qc > qr else float(outcomes([r], [c])[0]))
        start += count
    return _rate(sum(wins), len(wins))


def _quality(truth: dict, comment_id: str) -> float | None:
    row = truth.get(comment_id)
    return None if row is None else row["quality"]


def truth_agreement(test_path: Path, truth: dict) -> dict:
    """How often a held-out set's chosen reply has the higher hidden quality (equal quality: `ties`)."""
    higher = lower = ties = unknown = 0
    for row in (json.loads(line) for line in test_path.open()):
        qc, qr = _quality(truth, row["chosen_id"]), _quality(truth, row["rejected_id"])
        if qc is None or qr is None:
            unknown += 1
        elif qc == qr:
            ties += 1
        elif qc > qr:
            higher += 1
        else:
            lower += 1
    return {**_rate(higher, higher + lower), "higher": higher, "ties": ties, "unknown": unknown}


def _rate(successes: float, n: int) -> dict:
    if n == 0:
        return {"n": 0, "rate": None, "wilson95": None}
    return {"n": n, "rate": round(successes / n, 4),
            "wilson95": [round(x, 4) for x in wilson_interval(float(successes), n)]}


# ----------------------------------------------------------------------------- one store, the table

def run_store(store: Path, work: Path, corpus: str, truth_path: Path | None, splits: dict, seed: int,
              min_train_pairs: int) -> tuple[dict, dict]:
    """(the result of one store, the scored test pairs per model and test set, for pooling)."""
    started = time.perf_counter()
    labelled = label(store, corpus)
    exports = held_out_by_prompt(store, work) if corpus == "shared" else export_rule_sets(store, work, splits)
    truth = read_truth(truth_path) if truth_path else None
    models = {name: train_probe(exports[name], work / "models" / name, seed, min_train_pairs)
              for name in MODELS if name in exports}
    if exports["sentiment"]["rows"]["train"] < min_train_pairs:  # the combined pairs are (nearly) the vote pairs
        models["combined"] = {"skipped": f"{exports['sentiment']['rows']['train']} sentiment training pairs < "
                                         f"{min_train_pairs}: it would be the vote model"}
    table, scored_all = {}, {}
    for name, model in models.items():
        table[name] = {}
        for test in TEST_SETS:
            test_path = exports[test]["test"]  # the vote control's test pairs are the vote model's
            if "skipped" in model or not exports[test]["rows"]["test"]:
                table[name][test] = None
                continue
            scored = score(model["dir"], test_path)
            scored_all[(name, test)] = scored
            table[name][test] = cell(scored, [(truth, len(scored["rows"]))] if truth else None)
    result = {"label_pairs": labelled, "exports": {n: e["rows"] for n, e in exports.items()},
              "models": {n: {k: (str(v) if isinstance(v, Path) else v) for k, v in m.items()}
                         for n, m in models.items()},
              "table": table, "seconds": round(time.perf_counter() - started, 1)}
    if truth:
        result["truth_agreement"] = {test: truth_agreement(exports[test]["test"], truth)
                                     for test in TEST_SETS if exports[test]["rows"]["test"]}
    return result, {"scored": scored_all, "truth": truth}


def pooled_table(runs: list[dict]) -> dict:
    """Each model on the test pairs of every seed pooled (each seed's model on its own corpus)."""
    table = {}
    for name in MODELS:
        table[name] = {}
        for test in TEST_SETS:
            parts = [r for r in runs if (name, test) in r["scored"]]
            if not parts:
                table[name][test] = None
                continue
            merged = {k: [x for r in parts for x in r["scored"][(name, test)][k]]
                      for k in ("chosen", "rejected", "pairs", "rows")}
            truths = [(r["truth"], len(r["scored"][(name, test)]["rows"])) for r in parts]
            truths = truths if parts[0]["truth"] else None
            table[name][test] = cell(merged, truths)
    return table


def run(corpus: str, posts: int, scale: float, seeds: list[int], splits: dict, min_train_pairs: int,
        show=lambda text: print(text, file=sys.stderr, flush=True)) -> dict:
    """Every seed's store (one for the shared files), each run `show`n as a table when it ends."""
    out = {"corpus": corpus, "splits": splits, "probe": "configs/train/rm.yaml defaults, method=probe", "runs": []}
    pooled = []
    for seed in (seeds if corpus == "synthetic" else seeds[:1]):
        with tempfile.TemporaryDirectory(prefix="ahf-sentiment-rm-") as tmp:
            work = Path(tmp)
            if corpus == "synthetic":
                store, truth = synthetic_store(work, posts, scale, seed)
                spec = {"posts": posts, "reaction_scale": scale, "seed": seed}
            else:
                store, truth, spec = shared_store(work), None, {"sources": [str(p.relative_to(DATA))
                                                                            for p in SHARED_SOURCES]}
            result, scored = run_store(store, work, corpus, truth, splits, seed, min_train_pairs)
        out["runs"].append({"corpus": spec, **result})
        pooled.append(scored)
        show(format_run(out["runs"][-1]))
    if len(pooled) > 1:
        out["pooled"] = pooled_table(pooled)
        if pooled[0]["truth"]:
            out["pooled_truth_agreement"] = pooled_agreement([r["truth_agreement"] for r in out["runs"]])
    return out


def pooled_agreement(per_run: list[dict]) -> dict:
    """The held-out sets' agreement with the hidden quality, every seed's pairs together."""
    out = {}
    for test in TEST_SETS:
        rows = [r[test] for r in per_run if test in r]
        higher = sum(r["higher"] for r in rows)
        out[test] = {**_rate(higher, sum(r["n"] for r in rows)), "ties": sum(r["ties"] for r in rows)}
    return out


# ----------------------------------------------------------------------------- printing

def _fmt(c: dict | None, truth: bool) -> str:
    if c is None:
        return "n/a"
    text = f"{c['accuracy']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] n={c['pairs']} len={c['length_baseline']:.3f}"
    if truth and c.get("truth_accuracy", {}).get("rate") is not None:
        text += f" truth={c['truth_accuracy']['rate']:.3f}"
    return text


def format_table(table: dict, truth: bool) -> str:
    lines = [f"{'model':<12} | {'on held-out vote pairs':<52} | on held-out sentiment pairs"]
    for name, row in table.items():
        lines.append(f"{name:<12} | {_fmt(row['vote'], truth):<52} | {_fmt(row['sentiment'], truth)}")
    return "\n".join(lines)


def format_run(run_: dict) -> str:
    corpus = run_["corpus"]
    name = f"{len(corpus['sources'])} shared files" if "sources" in corpus else json.dumps(corpus)
    lines = [f"corpus {name}: exports {json.dumps(run_['exports'])}"]
    lines += [f"  {n}: {m}" for n, m in run_["models"].items() if "skipped" in m]
    lines.append(format_table(run_["table"], "truth_agreement" in run_))
    for test, agreement in run_.get("truth_agreement", {}).items():
        lines.append(f"held-out {test} pairs: chosen has the higher hidden quality in {agreement['rate']} "
                     f"{agreement['wilson95']} of {agreement['n']} (ties {agreement['ties']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["synthetic", "shared", "both"], default="both")
    parser.add_argument("--posts", type=int, default=500, help="synthetic posts per seed")
    parser.add_argument("--reaction-scale", type=float, default=10.0, help="SyntheticSpec.reaction_scale")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="synthetic corpus seeds (the probe's seed too); the shared corpus uses the first")
    parser.add_argument("--splits", type=float, nargs=3, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--min-train-pairs", type=int, default=100, help="fewer training pairs: no model")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if not math.isclose(sum(args.splits), 1.0):
        parser.error(f"--splits must sum to 1, got {args.splits}")
    splits = dict(zip(("train", "validation", "test"), args.splits))
    corpora = ["synthetic", "shared"] if args.corpus == "both" else [args.corpus]
    show = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else print
    result = {}
    for c in corpora:
        if not args.json:
            print(f"== {c}")
        result[c] = run(c, args.posts, args.reaction_scale, args.seeds, splits, args.min_train_pairs, show)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for c, r in result.items():
            if "pooled" in r:
                print("pooled over seeds:\n" + format_table(r["pooled"], c == "synthetic"))
            for test, agreement in r.get("pooled_truth_agreement", {}).items():
                print(f"pooled held-out {test} pairs: chosen has the higher hidden quality in {agreement['rate']} "
                      f"{agreement['wilson95']} of {agreement['n']} (ties {agreement['ties']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
