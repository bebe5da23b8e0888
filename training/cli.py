"""Verbs of the training stage: `train rm|sft|dpo|rloo`, `train launch` (the commands of a run across
nodes), `merge rm`, `eval rm`, `eval surface` (`eval` is shared with the index stage's `eval acts`, see ahf.args.shared_verb)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys

from ahf.args import add_config, add_json, shared_verb
from ahf.console import UserError, emit, progress_bar


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


def _train_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (safetensors, ahf_model.json, metrics.jsonl)")
    _common(p)
    p.set_defaults(handler=run_train)


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        add_config(p, f"train/{p.prog.split()[-1]}")
    add_json(p)


# verb: (module, config class, train function); the module is imported when the verb runs
TRAIN_VERBS = {
    "rm": ("training.rm", "RMConfig", "train_reward_model"),
    "sft": ("training.sft", "SFTConfig", "train_sft"),
    "dpo": ("training.dpo", "DPOConfig", "train_dpo"),
    "rloo": ("training.rloo", "RLOOConfig", "train_rloo"),
}
EXPORT_NOTE = (" or an `ahf export --format {fmt}` directory (trains on its train split, evaluates on its "
               "validation split)")


def add_commands(subparsers) -> None:
    train = shared_verb(subparsers, "train", "train models on DeepSpeed (rm, sft, dpo, rloo)")

    p = train.add_parser("rm", help="pairwise Bradley-Terry (or tier-conditioned) reward model")
    p.add_argument("data", nargs="?", help="pairs (prompt, chosen, rejected[, margin]) or, with objective=tier, "
                                           "pointwise rows (prompt, completion, tier): JSONL / Parquet / CSV / "
                                           "datasets dir" + EXPORT_NOTE.format(fmt="pairs|pointwise"))
    p.add_argument("--task", action="append", metavar="NAME=PAIRS",
                   help="joint multi-task training instead of PAIRS: one pairs file or export per task (two or "
                        "more; conditioning: multitask=task_token|task_head)")
    _train_common(p)

    p = train.add_parser("sft", help="behaviour cloning: prompt-masked loss, length-aware, sample callback")
    p.add_argument("data", help="rows with prompt, completion (or Fan et al.'s prompt, story CSV)"
                                + EXPORT_NOTE.format(fmt="sft"))
    _train_common(p)

    p = train.add_parser("dpo", help="direct preference optimisation of a causal LM from pairs")
    p.add_argument("data", help="pairs (prompt, chosen, rejected)" + EXPORT_NOTE.format(fmt="pairs"))
    p.add_argument("--reward-model", help="reward model directory to score the before/after samples (optional)")
    _train_common(p)

    p = train.add_parser("rloo", help="REINFORCE leave-one-out against a reward model, KL-penalised")
    p.add_argument("data", help="any rows with a prompt column, or an `ahf export` directory (its prompts)")
    p.add_argument("--reward-model", help="reward model directory whose score is maximised (required)")
    _train_common(p)

    p = train.add_parser("launch", help="the deepspeed and torchrun commands, hostfile and filled DeepSpeed "
                                        "config of a train run across nodes (prints and writes, runs nothing)")
    nodes = p.add_mutually_exclusive_group()
    nodes.add_argument("--nodes", metavar="HOST,HOST", help="the nodes, comma-separated (the first is the master)")
    nodes.add_argument("--hostfile", metavar="FILE", help="DeepSpeed's (MPI-style) hostfile: a `HOST slots=GPUS` "
                                                          "line per node")
    p.add_argument("--gpus-per-node", type=int, metavar="G", help="ranks per node, one per GPU (default: the "
                                                                 "hostfile's slots)")
    p.add_argument("--deepspeed", metavar="NAME", help="a configs/deepspeed name or JSON path (default: the "
                                                      "training config's `deepspeed`)")
    p.add_argument("--master-addr", metavar="HOST", help="rank 0's node, reachable from every node (default: "
                                                         "the first node)")
    p.add_argument("--master-port", type=int, default=29500, metavar="PORT", help="default: 29500")
    p.add_argument("--rdzv-id", metavar="ID", help="torchrun's rendezvous id (default: from the run's arguments)")
    p.add_argument("--write-to", metavar="DIR", help="where hostfile, deepspeed.json and launch.json go "
                                                     "(default: OUT.launch beside the run's --out)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="VERB ...",
                   help="the run, after the launch options: rm|sft|dpo|rloo DATA --out DIR [--config F] [--set k=v ...]")
    _common(p, config=False)
    p.set_defaults(handler=run_launch)

    merge = shared_verb(subparsers, "merge", "merge models")
    p = merge.add_parser("rm", help="merge reward models: their weights (same base, same tasks) or, with "
                                    "--method ensemble, their standardised rewards (any reward models)")
    p.add_argument("models", nargs="+", help="reward model directories")
    p.add_argument("--method", choices=["average", "task-arithmetic", "ties", "ensemble"], default="average",
                   help="weight merges: average | task-arithmetic | ties; ensemble: the mean of the members' "
                        "standardised rewards (training/ensemble.py)")
    p.add_argument("--reference", metavar="PAIRS",
                   help="ensemble: pairs on which each member's reward mean and std are fixed (e.g. the training "
                        "pairs); default: standardise on whatever is scored")
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
    p = evaluate.add_parser("surface", help="which surface statistics of the replies already predict the pairs "
                                            "(7 features, chosen per fold by prompt): the floor beside length")
    p.add_argument("--pairs", required=True, help="pairs file (prompt, chosen, rejected)")
    p.add_argument("--folds", type=int, default=5, help="folds by prompt (at or past the prompt count: leave one "
                                                        "prompt out)")
    p.add_argument("--seed", type=int, default=0, help="which prompts share a fold; the bootstrap's seed")
    p.add_argument("--detokenize", action="store_true", help="undo WritingPrompts tokenisation")
    p.add_argument("--text-only", action="store_true", help="the 5 text features only: no encoder for prompt "
                                                            "similarity and originality")
    _common(p, config=False)
    p.set_defaults(handler=run_eval_surface)


# ----------------------------------------------------------------------------- handlers

def _log_line(entry: dict) -> str:
    """`step 4: loss 0.6931  accuracy 0.500  ...  1,234 tokens/s  mfu 12.3%` from one metrics.jsonl entry."""
    speed = {"micro_step", "lr", "tokens_per_s", "flops_per_s", "mfu", "step"}
    stats = "  ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in speed and isinstance(v, float))
    mfu = f"  mfu {entry['mfu']:.1%}" if entry.get("mfu") is not None else ""
    return f"step {entry['step']}: {stats}  {entry['tokens_per_s']:,.0f} tokens/s{mfu}"


def _summary(verb: str, result: dict) -> str:
    rows = result.get("train_used", result["train_rows"])
    lines = [f"{verb} -> {result['out_dir']} ({result['steps']} steps, {rows:,} training rows; "
             f"held out: {result.get('eval_source', 'per task')})"]
    if "length_filter" in result:
        lines.append(f"length filter {result['length_filter']}")
    for task, ev in result.get("eval_by_task", {}).items():
        lines.append(f"held-out {task} ({result['by_task'][task]['eval_prompts']} prompts, {ev['pairs']} pairs): "
                     f"accuracy {ev['accuracy']:.3f}  length baseline {ev['length_baseline']:.3f}")
    if "eval" in result:
        ev = result["eval"]
        lines.append(f"held-out ({result['eval_prompts']} prompts, {ev['pairs']} pairs): accuracy {ev['accuracy']:.3f}"
                     f"  length baseline {ev['length_baseline']:.3f}")
    lines += [f"{key}: {result[key]}" for key in ("eval_loss", "eval_implicit_reward_accuracy", "before", "after")
              if key in result]
    return "\n".join(lines)


@quiet_stdout
def run_train(args, stdout=None) -> int:
    import importlib

    from ahf.config import load_config
    from ahf.console import stderr

    verb = args.train_command
    module_name, config_class, train_function = TRAIN_VERBS[verb]
    module = importlib.import_module(module_name)
    data = _rm_data(args) if verb == "rm" else args.data
    config = load_config(getattr(module, config_class), f"train/{verb}", args.config, args.set)
    extra = {"reward_model": args.reward_model} if verb in {"dpo", "rloo"} else {}
    log = None if args.json else (lambda e: stderr.print(_log_line(e), highlight=False))
    with progress_bar(f"train {verb}", enabled=not args.json) as advance:
        result = getattr(module, train_function)(config, data, args.out, progress=advance, log=log, **extra)
    _emit(result, args, stdout=stdout, human=_summary(verb, result))
    return 0


@quiet_stdout
def run_launch(args, stdout=None) -> int:
    import shlex

    from training.launch import plan_launch

    plan = plan_launch(args.train_args, nodes=args.nodes.split(",") if args.nodes is not None else None,
                       hostfile=args.hostfile, gpus_per_node=args.gpus_per_node, deepspeed=args.deepspeed,
                       master_addr=args.master_addr, master_port=args.master_port, rdzv_id=args.rdzv_id,
                       write_to=args.write_to)
    batch = plan["global_batch"]
    lines = [f"{len(plan['nodes'])} nodes x {plan['gpus_per_node']} GPUs = world size {plan['world_size']}; "
             f"global batch {batch['micro_batch_size']} x {batch['grad_accum']} x {batch['world_size']} = "
             f"{batch['rows']} rows per optimizer step (micro batch x grad_accum x world size)"]
    lines += [batch["note"]] if "note" in batch else []
    lines += [f"hostfile {plan['hostfile']}:", *("  " + line for line in plan["hostfile_text"].splitlines()),
              f"DeepSpeed launcher, run once on {plan['nodes'][0]} (pdsh over passwordless ssh to the others):",
              "  " + shlex.join(plan["deepspeed_command"]),
              f"or torchrun, the same command on every node (c10d rendezvous at {plan['master_addr']}:"
              f"{plan['master_port']}):", "  " + shlex.join(plan["torchrun_commands"][0]["command"]),
              f"filled DeepSpeed config ({plan['deepspeed_config_name']}, ZeRO-{plan['zero_stage']}): "
              f"{plan['deepspeed_config_path']}",
              f"rank 0 writes {plan['out_dir']} (metrics.jsonl, the model): put it on a filesystem every node shares"]
    _emit(plan, args, stdout=stdout, human="\n".join(lines))
    return 0


def _rm_data(args):
    """One DATA, or {task: DATA} from `--task NAME=DATA` (two or more): exactly one of the two."""
    from training.multitask import parse_task_specs

    if (args.data is None) == (not args.task):
        raise UserError("train rm takes either one PAIRS file or --task NAME=PAIRS for each task (two or more), "
                        "not " + ("both" if args.task else "neither"))
    return parse_task_specs(args.task) if args.task else args.data


def _interval(ci: dict | list | None) -> str:
    bounds = ci.get("bootstrap") if isinstance(ci, dict) else ci
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "[-]"


def _eval_rm_lines(result: dict, reward_scale: bool = True) -> list[str]:
    """The headline figures of training.evaluation.pair_metrics (95 % intervals: bootstrap over prompts);
    `reward_scale=False` (rewards that are raw features, not a model's logits) leaves out the mean margin and
    the calibration."""
    vs, similar, regressed = result["vs_length"], result["length_controlled"], result["length_regressed"]
    similar_text = (f"{similar['accuracy']:.3f} {_interval(similar['ci'])} (length baseline "
                    f"{similar['length_baseline']:.3f})" if similar["pairs"] else "-")
    margin = f"   mean margin {result['mean_margin']:+.3f}" if reward_scale else ""
    lines = [f"{result['pairs']} pairs, {result['prompts']} prompts: accuracy {result['accuracy']:.3f} "
             f"{_interval(result['accuracy_ci'])}{margin}",
             f"length baseline (longer wins) {result['length_baseline']:.3f} {_interval(result['length_baseline_ci'])}"
             f"   model - baseline {vs['difference']:+.3f} {_interval(vs['ci'])}",
             f"length-controlled: {similar['pairs']} pairs within {similar['tolerance']:.0%} in words "
             f"{similar_text}; after a monotone length fit {regressed['accuracy']:.3f} {_interval(regressed['ci'])}"]
    if reward_scale:
        lines.append(f"calibration (sigmoid of the reward difference vs observed): ECE {result['calibration']['ece']:.3f}")
    return lines


@quiet_stdout
def run_eval_rm(args, stdout=None) -> int:
    from training.rm import evaluate_reward_model

    result = evaluate_reward_model(args.model, args.pairs, detokenize=args.detokenize, max_length=args.max_length,
                                   task=args.task)
    lines = _eval_rm_lines(result)
    if "max_length_clamped" in result:
        clamp = result["max_length_clamped"]
        lines.append(f"max_length {clamp['asked']} is past the backbone's {clamp['positions']} positions: "
                     f"scored at {result['max_length']}")
    for bucket in result.get("by_bucket", {}).get("buckets", []):
        lines.append(f"  {result['by_bucket']['by']} {bucket['range'][0]:.3g}..{bucket['range'][1]:.3g}: "
                     f"n={bucket['n']} accuracy {bucket['accuracy']:.3f}  length {bucket['length_baseline']:.3f}")
    _emit(result, args, stdout=stdout, human="\n".join(lines))
    return 0


@quiet_stdout
def run_eval_surface(args, stdout=None) -> int:
    from training.surface_scan import evaluate_surface

    if args.folds < 2:
        raise UserError(f"--folds {args.folds}: at least 2 (each fold's rule is chosen on the other folds)")
    with progress_bar("embedding windows", enabled=not args.json) as advance:
        result = evaluate_surface(args.pairs, args.folds, args.seed, args.detokenize, args.text_only,
                                  progress=advance)
    chosen = sorted({(p["feature"], p["direction"]) for p in result["picks"]})
    picked = ", ".join(f"{name} ({'larger' if d > 0 else 'smaller'} wins) in "
                       f"{sum((p['feature'], p['direction']) == (name, d) for p in result['picks'])}" for name, d in chosen)
    lines = [f"the best surface rule, chosen on each of {result['folds']} folds' training prompts: {picked}",
             *_eval_rm_lines(result, reward_scale=False), "each feature alone (diagnostic: the best of these rows is optimistic):"]
    lines += [f"  {name:<18} {row['accuracy']:.3f} {_interval(row['accuracy_ci'])}  similar length "
              + (f"{row['similar_length_accuracy']:.3f}" if row["similar_length_accuracy"] is not None else "-")
              for name, row in result["by_feature"].items()]
    _emit(result, args, stdout=stdout, human="\n".join(lines))
    return 0


@quiet_stdout
def run_merge_rm(args, stdout=None) -> int:
    from training.merge import merge_reward_models

    if args.method == "ensemble":
        from training.ensemble import merge_ensemble

        result = merge_ensemble(args.models, args.out, reference=args.reference)
    else:
        if args.reference:
            raise UserError("--reference is for --method ensemble (a weight merge has no rewards to standardise)")
        result = merge_reward_models(args.models, args.out, method=args.method, base=args.base,
                                     scale=args.scale, density=args.density)
    _emit(result, args, stdout=stdout, human=f"merged {len(args.models)} reward models ({args.method}) -> {result['out_dir']}")
    return 0
