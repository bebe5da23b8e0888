"""Verbs of the training stage: `train sft|rm|policy`, `merge rm`, `eval rm`.

`eval` is shared with other stages (index adds `eval acts`): whichever package registers first creates
the `eval` parser and stores its sub-command action as `parser._ahf_sub`; the others add to it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys

from ahf.console import emit, progress_bar


def shared_verb(subparsers, name: str, help_text: str):
    """The sub-command action of verb `name`, creating the verb if no package has yet."""
    if name in subparsers.choices:
        parser = subparsers.choices[name]
        sub = getattr(parser, "_ahf_sub", None)
        if sub is None:  # created without the convention: find its sub-parsers action
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser._ahf_sub = sub
        return sub
    parser = subparsers.add_parser(name, help=help_text)
    sub = parser.add_subparsers(dest=f"{name}_command", metavar="WHAT", required=True)
    parser._ahf_sub = sub
    return sub


def quiet_stdout(handler):
    """Libraries (DeepSpeed, transformers) print to stdout; `--json` keeps stdout for the one result line."""
    @functools.wraps(handler)
    def wrapped(args):
        if not getattr(args, "json", False):
            return handler(args)
        real_stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return handler(args, stdout=real_stdout)
    return wrapped


def _emit(result, args, human, stdout=None) -> None:
    if stdout is not None:
        with contextlib.redirect_stdout(stdout):
            emit(result, args.json, human)
    else:
        emit(result, args.json, human)


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", help="config YAML (default configs/train/<verb>.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")


def add_commands(subparsers) -> None:
    train = shared_verb(subparsers, "train", "train models on DeepSpeed (sft, rm, policy)")

    p = train.add_parser("rm", help="pairwise Bradley-Terry (or tier-conditioned) reward model")
    p.add_argument("data", nargs="?", help="pairs (prompt, chosen, rejected[, margin]) or, with objective=tier, "
                                           "pointwise rows (prompt, completion, tier): "
                                           "JSONL / Parquet / CSV / datasets dir")
    p.add_argument("--task", action="append", metavar="NAME=PAIRS",
                   help="joint multi-task training instead of PAIRS: one pairs file per task (two or more; "
                        "conditioning: multitask=task_token|task_head)")
    p.add_argument("--out", required=True, help="output directory (safetensors + model card)")
    _common(p)
    p.set_defaults(handler=run_train_rm)

    p = train.add_parser("sft", help="behaviour cloning: prompt-masked loss, length-aware, sample callback")
    p.add_argument("data", help="rows with prompt, completion (or Fan et al.'s prompt, story CSV)")
    p.add_argument("--out", required=True, help="output directory")
    _common(p)
    p.set_defaults(handler=run_train_sft)

    p = train.add_parser("policy", help="DPO from pairs, or RLOO against a reward model with a KL penalty")
    p.add_argument("data", help="pairs (dpo) or prompts (rloo: any file with a prompt column)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--reward-model", help="reward model directory (rloo)")
    _common(p)
    p.set_defaults(handler=run_train_policy)

    merge = shared_verb(subparsers, "merge", "merge models")
    p = merge.add_parser("rm", help="merge reward models trained from the same base (and the same tasks)")
    p.add_argument("models", nargs="+", help="reward model directories")
    p.add_argument("--method", choices=["average", "task-arithmetic", "ties"], default="average")
    p.add_argument("--base", help="the shared base model (default: the models' recorded base_model)")
    p.add_argument("--scale", type=float, default=1.0, help="task-vector scale (task-arithmetic, ties)")
    p.add_argument("--density", type=float, default=0.2, help="fraction of each task vector TIES keeps")
    p.add_argument("--out", required=True, help="output directory")
    _common(p, config=False)
    p.set_defaults(handler=run_merge_rm)

    evaluate = shared_verb(subparsers, "eval", "evaluate models and taggers")
    p = evaluate.add_parser("rm", help="pairwise accuracy of a reward model, beside the length baseline")
    p.add_argument("--model", required=True, help="reward model directory")
    p.add_argument("--pairs", required=True, help="pairs file (prompt, chosen, rejected[, margin|score_ratio])")
    p.add_argument("--detokenize", action="store_true", default=None,
                   help="undo WritingPrompts tokenisation (default: as the model was trained)")
    p.add_argument("--max-length", type=int, help="default: the training max_length")
    p.add_argument("--task", help="the task to score as (required for a jointly trained multi-task model)")
    _common(p, config=False)
    p.set_defaults(handler=run_eval_rm)


# ----------------------------------------------------------------------------- handlers

def _log_line(entry: dict) -> str:
    return (f"step {entry['step']}: loss {entry['loss']:.4f}  acc {entry['accuracy']:.3f}  "
            f"margin {entry['mean_margin']:+.3f}")


@quiet_stdout
def run_train_rm(args, stdout=None) -> int:
    from ahf.config import load_config
    from ahf.console import UserError, stderr
    from training.multitask import parse_task_specs
    from training.rm import RMConfig, train_reward_model

    if (args.data is None) == (not args.task):
        raise UserError("train rm takes either one PAIRS file or --task NAME=PAIRS for each task (two or more), "
                        "not " + ("both" if args.task else "neither"))
    data = parse_task_specs(args.task) if args.task else args.data
    config = load_config(RMConfig, "train/rm", args.config, args.set)
    log = None if args.json else (lambda e: stderr.print(_log_line(e), highlight=False))
    with progress_bar("train rm", enabled=not args.json) as advance:
        result = train_reward_model(config, data, args.out, progress=advance, log=log)
    lines = [f"reward model -> {result['out_dir']} ({result['steps']} steps, {result['train_used']:,} "
             f"training rows, length filter {result['length_filter']})"]
    for task, ev in result.get("eval_by_task", {}).items():
        lines.append(f"held-out {task} ({result['by_task'][task]['eval_prompts']} prompts, {ev['pairs']} pairs): "
                     f"accuracy {ev['accuracy']:.3f}  length baseline {ev['length_baseline']:.3f}")
    if "eval" in result:
        ev = result["eval"]
        lines.append(f"held-out ({result['eval_prompts']} prompts, {ev['pairs']} pairs): accuracy {ev['accuracy']:.3f}"
                     f"  length baseline {ev['length_baseline']:.3f}")
    _emit(result, args, stdout=stdout, human="\n".join(lines))
    return 0


@quiet_stdout
def run_eval_rm(args, stdout=None) -> int:
    from training.rm import evaluate_reward_model

    result = evaluate_reward_model(args.model, args.pairs, detokenize=args.detokenize, max_length=args.max_length,
                                   task=args.task)
    lines = [f"{result['pairs']} pairs: accuracy {result['accuracy']:.3f}   length baseline (longer wins) "
             f"{result['length_baseline']:.3f}   mean margin {result['mean_margin']:+.3f}"]
    for bucket in result.get("by_bucket", {}).get("buckets", []):
        lines.append(f"  {result['by_bucket']['by']} {bucket['range'][0]:.3g}..{bucket['range'][1]:.3g}: "
                     f"n={bucket['n']} accuracy {bucket['accuracy']:.3f}  length {bucket['length_baseline']:.3f}")
    _emit(result, args, stdout=stdout, human="\n".join(lines))
    return 0


@quiet_stdout
def run_train_sft(args, stdout=None) -> int:
    from ahf.config import load_config
    from ahf.console import stderr
    from training.sft import SFTConfig, train_sft

    config = load_config(SFTConfig, "train/sft", args.config, args.set)
    log = None if args.json else (lambda e: stderr.print(f"step {e['step']}: loss {e['loss']:.4f}", highlight=False))
    with progress_bar("train sft", enabled=not args.json) as advance:
        result = train_sft(config, args.data, args.out, progress=advance, log=log)
    _emit(result, args, stdout=stdout, human=f"model -> {result['out_dir']} ({result['steps']} steps; length filter "
                            f"{result['length_filter']}; eval loss {result.get('eval_loss')})")
    return 0


@quiet_stdout
def run_train_policy(args, stdout=None) -> int:
    from ahf.config import load_config
    from training.policy import PolicyConfig, train_policy

    config = load_config(PolicyConfig, "train/policy", args.config, args.set)
    with progress_bar("train policy", enabled=not args.json) as advance:
        result = train_policy(config, args.data, args.out, reward_model=args.reward_model, progress=advance)
    _emit(result, args, stdout=stdout, human=f"policy -> {result['out_dir']} ({result['algorithm']}, {result['steps']} steps)\n"
                            f"before: {result.get('before')}\nafter:  {result.get('after')}")
    return 0


@quiet_stdout
def run_merge_rm(args, stdout=None) -> int:
    from training.merge import merge_reward_models

    result = merge_reward_models(args.models, args.out, method=args.method, base=args.base,
                                 scale=args.scale, density=args.density)
    _emit(result, args, stdout=stdout, human=f"merged {len(args.models)} reward models ({args.method}) -> {result['out_dir']}")
    return 0
