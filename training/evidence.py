"""Evidence on real data: two upvote/validity reward models, their held-out accuracy beside the length
baseline, and whether merged models, or one model trained jointly on both tasks, keep each task's accuracy.

    python -m training.evidence --out runs/evidence [--max-length 128] [--epochs 2]
    python -m training.evidence probe [--task stories|explanations] [--variants probe words+sentence_words ...]
        [--seeds 0 1 2] [--folds 5] [--out runs/evidence_probe] [--cache runs/embedding_cache]
    python -m training.evidence surface-scan [--seeds 0 1 2] [--folds 5] [--out runs/surface_scan]
        [--cache runs/embedding_cache] [--no-embeddings]

`probe`: `method: probe` reward models (training/probe.py) with the variants of PROBE_VARIANTS; stories by
k-fold cross-validation over prompts (every prompt held out once, the held-out scores pooled into one
`training.evaluation.pair_metrics` per seed; `--folds 52` or more: leave-one-prompt-out), explanations by
the seeded question split below. Every probe chooses its own head on its training prompts only (nested).
`surface-scan`: the search-inclusive estimate of the best of 7 surface features (training/surface_scan.py).

Task 1, stories: the 374 WritingPrompts pairs (chosen = more upvotes), split by prompt (20 % of prompts held out).
Task 2, explanations: lfqa validity annotations -> pairs (valid answer > invalid answer), split by question
(see `training.data.explanation_task`). Backbone: all-MiniLM-L6-v2 (a real pretrained encoder, offline).
Then `average`, `task-arithmetic` and `ties` merges of the two, and two joint multi-task models trained on
both training sets at once (`task_token`: a task marker in the prompt; `task_head`: one head per task; same
settings, every pair once per epoch), each evaluated on both held-out sets. The binomial standard error of
an accuracy near 0.5 on n pairs, 0.5 / sqrt(n), is reported per task as the noise scale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from training import data as D
from training.merge import merge_reward_models
from training.rm import RMConfig, evaluate_reward_model, train_reward_model
from training.probe import minilm_path  # noqa: F401 (the offline MiniLM's folder; tests import it from here)
from training.tiny import SHARED_DATA


def run(out: Path, max_length: int, epochs: float, lr: float, seed: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out.mkdir(parents=True, exist_ok=True)
    stories = SHARED_DATA / "writingprompts" / "upvote_ranked_pairs.jsonl"
    train_s, held_s = D.split_by_prompt(D.load_pairs(stories, detok=True), 0.2, seed)
    D.write_pairs(train_s, out / "stories_train.jsonl")
    D.write_pairs(held_s, out / "stories_eval.jsonl")
    train_e, held_e, counts = D.explanation_task(SHARED_DATA / "explanations" / "validity_annotation.jsonl", 0.2, seed)
    D.write_pairs(train_e, out / "explanations_train.jsonl")
    D.write_pairs(held_e, out / "explanations_eval.jsonl")
    tasks = {"stories": out / "stories_eval.jsonl", "explanations": out / "explanations_eval.jsonl"}

    common = dict(model=minilm_path(), max_length=max_length, max_prompt_length=min(48, max_length // 2),
                  epochs=epochs, micro_batch_size=8, lr=lr, warmup_ratio=0.1, deepspeed="zero2", log_every=5,
                  seed=seed, eval_batch_size=32)
    report: dict = {"explanation_pairs": counts, "settings": common, "models": {}}
    for task in tasks:
        config = RMConfig(**common, eval_pairs=str(tasks[task]))
        result = train_reward_model(config, out / f"{task}_train.jsonl", out / f"rm_{task}")
        report["models"][task] = {"train_pairs": result["train_used"], "steps": result["steps"],
                                  "length_filter": result["length_filter"],
                                  "train_seconds": result["train_seconds"], "last_log": result["history"][-1],
                                  "eval": {task: result["eval"]}}
        other = next(t for t in tasks if t != task)
        report["models"][task]["eval"][other] = evaluate_reward_model(out / f"rm_{task}", tasks[other])
        (out / "report.json").write_text(json.dumps(report, indent=2))
    for method in ("average", "task-arithmetic", "ties"):
        merged = out / f"merged_{method}"
        merge_reward_models([str(out / "rm_stories"), str(out / "rm_explanations")], merged, method=method,
                            scale=1.0, density=0.2)  # task arithmetic at 0.5 would equal the average
        report["models"][f"merged_{method}"] = {"eval": {t: evaluate_reward_model(merged, tasks[t]) for t in tasks}}
        (out / "report.json").write_text(json.dumps(report, indent=2))
    for form in ("task_token", "task_head"):  # one model on both training sets, the task made visible
        config = RMConfig(**common, multitask=form, eval_pairs={t: str(path) for t, path in tasks.items()})
        result = train_reward_model(config, {t: out / f"{t}_train.jsonl" for t in tasks}, out / f"joint_{form}")
        report["models"][f"joint_{form}"] = {"train_pairs": result["train_used"], "steps": result["steps"],
                                             "length_filter": result["length_filter"],
                                             "train_seconds": result["train_seconds"],
                                             "last_log": result["history"][-1], "eval": result["eval_by_task"]}
        (out / "report.json").write_text(json.dumps(report, indent=2))
    report["noise"] = {t: {"pairs": report["models"][t]["eval"][t]["pairs"],
                           "binomial_se_at_0.5": round(0.5 / math.sqrt(report["models"][t]["eval"][t]["pairs"]), 3)}
                       for t in tasks}
    report["table"] = [{"model": name, **{t: {"accuracy": round(m["eval"][t]["accuracy"], 3),
                                              "length_baseline": round(m["eval"][t]["length_baseline"], 3),
                                              "pairs": m["eval"][t]["pairs"]} for t in tasks}}
                       for name, m in report["models"].items()]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------- method: probe

FIXED_SETS = ["embedding", "embedding+words", "embedding+interaction", "embedding+interaction+words", "words",
              "words+sentence_words", "sentence_words", "embedding+words+sentence_words"]
PREVIOUS_DEFAULT = [["embedding", "interaction", "words"]]
PROBE_VARIANTS: dict[str, dict] = {  # name -> RMConfig overrides of the method=probe defaults
    "probe": {},  # the shipped defaults: feature set, L2 and epoch chosen by inner 5-fold CV over training prompts
    "single_split": {"probe_selection_folds": 1},  # the previous default: chosen on one 20 % validation split
    "inner_loo": {"probe_selection_folds": 1000},  # inner leave-one-prompt-out (k = the training prompts)
    "inner_10": {"probe_selection_folds": 10},
    "by_loss": {"probe_selection_metric": "loss"},
    "words+sentence_words_by_loss": {"probe_feature_sets": [["words", "sentence_words"]],
                                     "probe_selection_metric": "loss"},
    **{name: {"probe_feature_sets": [name.split("+")]} for name in FIXED_SETS},
    "mlp": {"probe_head": "mlp", "probe_feature_sets": PREVIOUS_DEFAULT},
    "chunks_128": {"probe_chunk_tokens": 128, "probe_chunk_stride": 96, "probe_feature_sets": PREVIOUS_DEFAULT},
    "chunks_384": {"probe_chunk_tokens": 384, "probe_chunk_stride": 288, "probe_feature_sets": PREVIOUS_DEFAULT},
    "chunks_510": {"probe_chunk_tokens": 510, "probe_chunk_stride": 384, "probe_feature_sets": PREVIOUS_DEFAULT},
    "chunks_384_default": {"probe_chunk_tokens": 384, "probe_chunk_stride": 288},
    "no_refit": {"probe_refit": False, "probe_selection_folds": 1, "probe_feature_sets": PREVIOUS_DEFAULT},
    "default_single_split_256": {"probe_selection_folds": 1, "probe_chunk_tokens": 256, "probe_chunk_stride": 192},
}


def probe_splits(task: str, seed: int, folds: int) -> list[tuple[list[D.Pair], list[D.Pair]]]:
    """(train, held-out) pairs: stories by k-fold over prompts (each of the 52 prompts held out once);
    explanations by the seeded question split of `training.data.explanation_task` (20 % of questions)."""
    if task == "stories":
        return D.prompt_folds(D.load_pairs(SHARED_DATA / "writingprompts" / "upvote_ranked_pairs.jsonl",
                                           detok=True), folds, seed)
    train, held, _ = D.explanation_task(SHARED_DATA / "explanations" / "validity_annotation.jsonl", 0.2, seed)
    return [(train, held)]


def probe_run(out: Path, task: str, variant: str, seed: int, folds: int, cache: Path, base: dict | None = None) -> dict:
    """One variant, one seed: a probe per split, every held-out pair scored once, pooled metrics."""
    from training.evaluation import pair_metrics
    from training.probe import score_with_probe

    chosen, rejected, scored, chosen_l2, chosen_features, seconds = [], [], [], [], [], 0.0
    chosen_epochs, inner = [], []
    for k, (train, held) in enumerate(probe_splits(task, seed, folds)):
        where = out / task / variant / f"seed{seed}_fold{k}"
        D.write_pairs(train, where / "train.jsonl")
        D.write_pairs(held, where / "held.jsonl")
        config = RMConfig(method="probe", seed=seed, eval_pairs=str(where / "held.jsonl"), probe_cache_dir=str(cache),
                          **((base or {}) | PROBE_VARIANTS[variant]))
        result = train_reward_model(config, where / "train.jsonl", where / "model")
        c, r, _, _ = score_with_probe(where / "model", held)
        chosen += c.tolist()
        rejected += r.tolist()
        scored += held
        chosen_l2.append(result["probe"]["chosen_l2"])
        chosen_features.append("+".join(result["probe"]["features"]["names"]))
        chosen_epochs.append(result["probe"]["epochs"])
        inner.append(result["probe"]["validation_accuracy"])
        seconds += result["train_seconds"]
    return {"seed": seed, **metrics_summary(pair_metrics(chosen, rejected, scored, seed=seed)),
            "chosen_l2": chosen_l2, "chosen_features": chosen_features, "chosen_epochs": chosen_epochs,
            "inner_accuracy": inner, "folds": len(chosen_features), "train_seconds": round(seconds, 1)}


def metrics_summary(m: dict) -> dict:
    """The evidence tables' columns of a training.evaluation.pair_metrics result, rounded."""
    control, regressed = m["length_controlled"], m["length_regressed"]
    return {"pairs": m["pairs"], "prompts": m["prompts"], "accuracy": round(m["accuracy"], 3),
            "accuracy_ci": _rounded(m["accuracy_ci"]["bootstrap"]), "length_baseline": round(m["length_baseline"], 3),
            "vs_length": round(m["vs_length"]["difference"], 3), "vs_length_ci": _rounded(m["vs_length"]["ci"]),
            "similar_length_pairs": control["pairs"], "similar_length_accuracy": _round(control["accuracy"]),
            "similar_length_ci": _rounded((control["ci"] or {}).get("bootstrap")),
            "length_regressed_accuracy": round(regressed["accuracy"], 3),
            "length_regressed_ci": _rounded(regressed["ci"]["bootstrap"])}


def _round(x):
    return None if x is None else round(x, 3)


def _rounded(pair):
    return None if pair is None else [round(v, 3) for v in pair]


def run_probe(out: Path, task: str, variants: list[str], seeds: list[int], folds: int, cache: Path,
              base: dict | None = None) -> dict:
    """`base`: RMConfig overrides under every variant's own (e.g. the windows)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict = {"task": task, "folds": folds if task == "stories" else 1, "base": base or {}, "variants": {}}
    if task == "stories":
        report["folds"] = len(probe_splits(task, seeds[0], folds))  # --folds past the 52 prompts: one per prompt
    for variant in variants:
        runs = [probe_run(out, task, variant, seed, folds, cache, base) for seed in seeds]
        report["variants"][variant] = {
            "overrides": PROBE_VARIANTS[variant], "runs": runs,
            "mean": {key: round(sum(r[key] for r in runs) / len(runs), 3) for key in
                     ("accuracy", "length_baseline", "vs_length", "length_regressed_accuracy")} |
            {"similar_length_accuracy": _round(_mean([r["similar_length_accuracy"] for r in runs]))}}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"probe_{task}.json").write_text(json.dumps(report, indent=1))
    return report


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def probe_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evidence probe",
                                     description="method=probe on the real pairs: k-fold by prompt, several seeds")
    parser.add_argument("--out", default="runs/evidence_probe")
    parser.add_argument("--task", choices=["stories", "explanations"], default="stories")
    parser.add_argument("--variants", nargs="+", default=["probe"], choices=sorted(PROBE_VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cache", default="runs/embedding_cache")
    parser.add_argument("--chunk", nargs=2, type=int, metavar=("TOKENS", "STRIDE"),
                        help="windows for every variant that sets none (default: RMConfig's)")
    args = parser.parse_args(argv)
    base = {"probe_chunk_tokens": args.chunk[0], "probe_chunk_stride": args.chunk[1]} if args.chunk else None
    report = run_probe(Path(args.out), args.task, args.variants, args.seeds, args.folds, Path(args.cache), base)
    for name, v in report["variants"].items():
        print(name, json.dumps(v["mean"]))
        for r in v["runs"]:
            print("  ", json.dumps({k: r[k] for k in r if k not in ("chosen_l2", "chosen_features", "train_seconds",
                                                                    "chosen_epochs", "inner_accuracy")}))
            picked: dict[str, int] = {}
            for name in r["chosen_features"]:
                picked[name] = picked.get(name, 0) + 1
            print("     chosen:", json.dumps(picked), "l2:", json.dumps(r["chosen_l2"]),
                  "seconds:", r["train_seconds"])
    return 0


def surface_main(argv) -> int:
    """The 7-feature surface scan (training/surface_scan.py) of the story pairs, nested in the outer folds by
    prompt, per seed: the honest estimate and each feature's diagnostic row."""
    from training.surface_scan import embed, surface_scan

    parser = argparse.ArgumentParser(prog="python -m training.evidence surface-scan")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=5, help="outer folds by prompt (52 or more: leave one out)")
    parser.add_argument("--out", default="runs/surface_scan")
    parser.add_argument("--cache", default="runs/embedding_cache")
    parser.add_argument("--no-embeddings", action="store_true", help="the 5 text features only (no encoder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pairs = D.load_pairs(SHARED_DATA / "writingprompts" / "upvote_ranked_pairs.jsonl", detok=True)
    embeddings, stats = (None, None) if args.no_embeddings else embed(pairs, args.cache)
    runs = []
    for seed in args.seeds:
        result = surface_scan(pairs, args.folds, seed, embeddings)
        runs.append({"seed": seed, "folds": result["folds"], "held_wins": result["held_wins"],
                     **metrics_summary(result), "picks": result["picks"],
                     "by_feature_not_honest": {name: {k: _round(v) if isinstance(v, float) else
                                                      _rounded(v) if k.endswith("_ci") else v
                                                      for k, v in row.items()}
                                               for name, row in result["by_feature"].items()}})
    report = {"data": "writingprompts/upvote_ranked_pairs.jsonl (detok)", "embedding": stats,
              "features": result["features"], "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"surface_scan_folds{runs[0]['folds']}_seeds{'-'.join(map(str, args.seeds))}"
    (out / f"{name}{'_text' if args.no_embeddings else ''}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def probe_tasks_run(out: Path, seed: int, cache: Path) -> dict:
    """Two tasks with the probe recipe: a probe per task, one on both tasks' pairs pooled (`joint`), and the
    ensemble of the two per-task probes (training/ensemble.py, standardised on the pooled training pairs),
    each scored on both held-out sets (stories: 20 % of prompts; explanations: 20 % of questions)."""
    from training.ensemble import merge_ensemble
    from training.evaluation import pair_metrics
    from training.rm import score_reward_model

    where = out / f"seed{seed}"
    stories = D.load_pairs(SHARED_DATA / "writingprompts" / "upvote_ranked_pairs.jsonl", detok=True)
    splits = {"stories": D.split_by_prompt(stories, 0.2, seed),
              "explanations": D.explanation_task(SHARED_DATA / "explanations" / "validity_annotation.jsonl", 0.2,
                                                 seed)[:2]}
    splits["joint"] = (splits["stories"][0] + splits["explanations"][0], [])
    for name, (train, held) in splits.items():
        D.write_pairs(train, where / f"{name}_train.jsonl")
        D.write_pairs(held, where / f"{name}_held.jsonl")
        config = RMConfig(method="probe", seed=seed, probe_cache_dir=str(cache),
                          eval_pairs=str(where / f"{name}_held.jsonl") if held else None)
        train_reward_model(config, where / f"{name}_train.jsonl", where / f"rm_{name}")
    merge_ensemble([str(where / "rm_stories"), str(where / "rm_explanations")], where / "rm_ensemble",
                   reference=str(where / "joint_train.jsonl"))
    table = {}
    for model in ("stories", "explanations", "joint", "ensemble"):
        for task in ("stories", "explanations"):
            chosen, rejected, pairs, _ = score_reward_model(where / f"rm_{model}", where / f"{task}_held.jsonl")
            m = pair_metrics(chosen, rejected, pairs, seed=seed)
            table.setdefault(model, {})[task] = {"accuracy": round(m["accuracy"], 3),
                                                 "ci": _rounded(m["accuracy_ci"]["bootstrap"]),
                                                 "length_baseline": round(m["length_baseline"], 3), "pairs": m["pairs"]}
    return {"seed": seed, "table": table}


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        return probe_main(argv[1:])
    if argv[:1] == ["surface-scan"]:
        return surface_main(argv[1:])
    if argv[:1] == ["probe-tasks"]:  # python -m training.evidence probe-tasks OUT CACHE SEED [SEED ...]
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        out, cache, seeds = Path(argv[1]), Path(argv[2]), [int(s) for s in argv[3:]] or [0]
        report = [probe_tasks_run(out, seed, cache) for seed in seeds]
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe_tasks.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/evidence")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(Path(args.out), args.max_length, args.epochs, args.lr, args.seed)
    print(json.dumps(report["table"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
