"""Report sections of trained models (`--model`) and of exports (`--export`).

A model section reads the model's own records: `metrics.jsonl` (training curves) and `ahf_model.json`
(the train config, the data lineage and the held-out evaluation made after training). The figures are
`training.evaluation.pair_metrics`'s (the same as `ahf eval rm`): accuracy with its interval, the length
baseline, length-controlled accuracy. A record made before that module has no length-controlled accuracy
and no per-pair scores: the held-out pairs are read again exactly as the trainer read them
(`training.data.held_out` with the recorded config, checked against the recorded count), or taken from
`--pairs FILE`, and the subset whose replies are of similar length is scored with
`training.rm.evaluate_reward_model`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from ahf.console import UserError
from ahf.report import figures as F
from ahf.report.page import Figure, Section, Table
from training.evaluation import LENGTH_TOLERANCE, similar_length_pairs

CURVES = ("loss", "accuracy", "mean_margin", "reward", "kl", "lr")  # logged stats drawn, in this order
MAX_CURVES = 3


def length_controlled(pairs: list) -> list:
    """The pairs whose chosen and rejected replies differ in length (words, as the length baseline counts
    them) by less than LENGTH_TOLERANCE of the longer: the longer reply cannot explain a model's pick.
    The one rule `ahf eval rm` uses too (training.evaluation.similar_length)."""
    return similar_length_pairs(pairs)


# ----------------------------------------------------------------------------- models

def model_section(model_dir: str | Path, index: int, pairs_file: str | Path | None = None) -> tuple[Section, dict]:
    """The section of one model directory, and its figures for `--json`."""
    from training.models import read_card

    directory = Path(model_dir)
    card = read_card(directory)
    kind, config = card.get("kind", "model"), card.get("train_config", {})
    result = card.get("train_result", {})
    section = Section(f"model-{index}", f"Model: {directory.name}",
                      f"{kind.replace('_', ' ')} in {directory}: training curves, then held-out accuracy beside the "
                      "length baseline (the longer reply wins), by margin and on pairs of similar length.")
    data = card.get("data") or {}
    section.tables.append(Table("What it is and what it was trained on (ahf_model.json).", ["field", "value"], [
        [k, v] for k, v in (("kind", kind), ("backbone", card.get("base_model") or config.get("model")),
                            ("objective", config.get("objective")), ("tasks", ", ".join(card.get("tasks") or [])),
                            ("data", data.get("path")), ("held-out rows", data.get("eval"))) if v]))
    history, evaluation = _metrics(directory)
    recorded = result.get("eval") or evaluation.get("eval")
    held_out = recorded or {}
    section.facts = [(k, v) for k, v in (
        ("held-out accuracy", held_out.get("accuracy")), ("95 % interval (bootstrap over prompts)",
                                                          _bounds(held_out.get("accuracy_ci"))),
        ("length baseline", held_out.get("length_baseline")),
        ("accuracy after a monotone length fit", (held_out.get("length_regressed") or {}).get("accuracy")),
        ("calibration error (ECE)", (held_out.get("calibration") or {}).get("ece")),
        ("held-out pairs", held_out.get("pairs")), ("training rows", result.get("train_rows")),
        ("steps", result.get("steps")), ("train seconds", result.get("train_seconds")),
        ("tokens / s", result.get("tokens_per_s"))) if v is not None]
    summary: dict = {"dir": str(directory), "kind": kind, "evaluations": []}
    curves = _curves(history, recorded)
    if curves:
        section.figures.append(curves)
    else:
        section.notes.append(f"No training log lines in {directory / 'metrics.jsonl'}.")
    if kind != "reward_model":
        section.notes.append("Not a reward model: no pairwise evaluation.")
        return section, summary
    if config.get("objective", "pairwise") != "pairwise":
        section.notes.append("A tier reward model: its recorded held-out figures are for pairs of tiers (a "
                             "better-tier completion against a worse one of the same prompt).")
    tasks = card.get("tasks") or [None]
    by_task = result.get("eval_by_task") or {}
    held = _held_out_pairs(card) if pairs_file is None else None
    for task in tasks:
        recorded = by_task.get(task) if task else result.get("eval")
        unit = _evaluate(directory, section, task, recorded, pairs_file, (held or {}).get(task),
                         config.get("objective", "pairwise") == "pairwise", config.get("detokenize", False))
        summary["evaluations"].append(unit)
    return section, summary


def _metrics(directory: Path) -> tuple[list[dict], dict]:
    """(the log lines with a step, the eval line) of metrics.jsonl; nothing when it is absent."""
    path = directory / "metrics.jsonl"
    history, evaluation = [], {}
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if "step" in entry:
                history.append(entry)
            elif "eval" in entry:
                evaluation = entry["eval"]
    return history, evaluation


def _curves(history: list[dict], recorded: dict | None) -> Figure | None:
    keys = [k for k in CURVES if any(isinstance(h.get(k), (int, float)) for h in history)][:MAX_CURVES]
    if not keys:
        return None

    def draw(axes):
        axes = axes if isinstance(axes, list) else [axes]
        for ax, key in zip(axes, keys):
            points = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
            ax.plot([s for s, _ in points], [v for _, v in points], "o-", markersize=3, color=F.PALETTE[0],
                    label="training window")
            if key == "accuracy" and recorded and "accuracy" in recorded:
                ax.axhline(recorded["accuracy"], color=F.PALETTE[3], linestyle="--", label="held out")
                ax.axhline(recorded["length_baseline"], color="#888888", linestyle=":", label="length baseline")
                ax.legend(loc="best")
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            F.titled(ax, key)
    steps = history[-1]["step"]
    caption = (f"Logged stats per window of {len(history)} log line(s) over {steps:,} optimizer steps "
               "(metrics.jsonl)" + ("; dashed: held-out accuracy after training." if recorded else "."))
    return Figure("Training curves", caption, F.render(draw, size=(F.WIDE, 3.0), grid=(1, len(keys))), wide=True)


def _held_out_pairs(card: dict) -> dict | None:
    """{task or None: the held-out pairs}, read as training read them, when the data is still there and
    gives as many held-out rows as were recorded; else None (then `--pairs FILE` is needed)."""
    from training import data as D
    from training import multitask as M

    config, data, result = card.get("train_config", {}), card.get("data") or {}, card.get("train_result", {})
    if config.get("objective", "pairwise") != "pairwise":
        return None
    detok, fraction, seed = config.get("detokenize", False), config.get("eval_fraction", 0.2), config.get("seed", 0)
    try:
        if card.get("tasks"):
            paths = {name: task["path"] for name, task in (data.get("tasks") or {}).items()}
            _, held, _ = M.load_task_pairs(paths, config.get("eval_pairs"), fraction, seed, detok)
            expected = {n: (result.get("by_task") or {}).get(n, {}).get("eval_rows") for n in held}
            return held if all(len(held[n]) == expected[n] for n in held) else None
        source = D.read_source(data["path"], D.load_pairs, detok, ("pairs",))
        _, rows, how = D.held_out(source, config.get("eval_pairs"), D.load_pairs, detok, fraction, seed)
    except (UserError, KeyError, OSError):
        return None
    return {None: rows} if how == data.get("eval") and len(rows) == result.get("eval_rows") else None


def _evaluate(directory: Path, section: Section, task: str | None, recorded: dict | None,
              pairs_file: str | Path | None, held: list | None, pairwise: bool, detok: bool) -> dict:
    """Accuracy by margin (recorded, or on `pairs_file`) and length-controlled accuracy, for one task."""
    from training import data as D
    from training.rm import evaluate_reward_model

    name = f" ({task})" if task else ""
    full, source = recorded, "the held-out pairs of training (ahf_model.json)"
    if pairs_file is not None:
        full = evaluate_reward_model(directory, pairs_file, task=task)
        source, held = f"{pairs_file} (--pairs)", D.load_pairs(pairs_file, detok=detok)
    unit: dict = {"task": task, "pairs_from": source,
                  "eval": {k: full[k] for k in ("pairs", "accuracy", "length_baseline")} if full else None}
    if not full:
        section.notes.append(f"No held-out evaluation{name} was recorded: pass `--pairs FILE` to score the model.")
        return unit
    section.figures.append(_by_margin(full, name, source))
    recorded_similar = full.get("length_controlled")  # training.evaluation's, on these pairs: nothing to re-score
    if recorded_similar is not None:
        similar, total = recorded_similar["pairs"], recorded_similar["of"]
        controlled = recorded_similar if recorded_similar["accuracy"] is not None else None
    elif held is None:
        if pairwise:
            section.notes.append(f"The held-out pairs{name} are not at hand (the training data moved or changed): "
                                 "pass `--pairs FILE` for length-controlled accuracy.")
        return unit
    else:  # a record from before training.evaluation: score the pairs of similar length
        kept = length_controlled(held)
        similar, total, controlled = len(kept), len(held), _score_similar(directory, kept, task) if kept else None
    unit["length_controlled"] = {"pairs": similar, "of": total,
                                 **({k: controlled[k] for k in ("accuracy", "length_baseline", "ci") if k in controlled}
                                    if controlled else {})}
    section.figures.append(_length_figure(full, controlled, similar, total, name))
    return unit


def _score_similar(directory: Path, similar: list, task: str | None) -> dict:
    """Accuracy, its interval and the length baseline on the pairs of similar length (scored on their own)."""
    from training.rm import evaluate_reward_model

    with tempfile.TemporaryDirectory(prefix="ahf-report-") as tmp:
        path = Path(tmp) / "similar-length.jsonl"
        path.write_text("".join(json.dumps({k: v for k, v in asdict(p).items() if v is not None}) + "\n"
                                for p in similar))
        scored = evaluate_reward_model(directory, path, detokenize=False, task=task)
    return {"accuracy": scored["accuracy"], "length_baseline": scored["length_baseline"], "ci": scored["accuracy_ci"]}


def _bounds(ci: dict | None) -> str | None:
    return f"{ci['bootstrap'][0]:.3f} – {ci['bootstrap'][1]:.3f}" if ci else None


def _accuracy_bars(ax, groups: list[str], model: list[float], baseline: list[float]) -> None:
    F.bars(ax, groups, {"reward model": model, "length baseline": baseline}, value_label="accuracy",
           colours={"reward model": F.PALETTE[0], "length baseline": "#A0A0A0"})
    for container in ax.containers:
        ax.bar_label(container, fmt="{:.2f}", fontsize=7, padding=2)
    ax.axhline(0.5, color="#888888", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, 1.1)


def _by_margin(full: dict, name: str, source: str) -> Figure:
    buckets = (full.get("by_bucket") or {}).get("buckets", [])
    by = (full.get("by_bucket") or {}).get("by", "margin")
    groups = [f"all\n(n={full['pairs']})"] + [f"{by} {b['range'][0]:.2g}–{b['range'][1]:.2g}\n(n={b['n']})"
                                              for b in buckets]
    model = [full["accuracy"]] + [b["accuracy"] for b in buckets]
    baseline = [full["length_baseline"]] + [b["length_baseline"] for b in buckets]
    return Figure(f"Held-out accuracy by {by}{name}",
                  f"Share of pairs whose chosen reply scores higher, overall and per {by} tercile, beside the length "
                  f"baseline; pairs: {source}.",
                  F.render(lambda ax: _accuracy_bars(ax, groups, model, baseline)))


def _length_figure(full: dict, controlled: dict | None, similar: int, total: int, name: str) -> Figure:
    groups = [f"all pairs\n(n={full['pairs']})", f"lengths within {LENGTH_TOLERANCE:.0%}\n(n={similar})"]
    model = [full["accuracy"], controlled["accuracy"] if controlled else 0.0]
    baseline = [full["length_baseline"], controlled["length_baseline"] if controlled else 0.0]
    caption = (f"Accuracy on the {similar} of {total} held-out pairs whose replies differ in length by less than "
               f"{LENGTH_TOLERANCE:.0%} (words), where length cannot explain the pick"
               + ("." if controlled else ": none, so no bar."))
    return Figure(f"Length-controlled accuracy{name}", caption,
                  F.render(lambda ax: _accuracy_bars(ax, groups, model, baseline)))


# ----------------------------------------------------------------------------- exports

def export_section(export_dir: str | Path, index: int) -> tuple[Section, dict]:
    """The section of one `ahf export` directory: its card's counts, from its manifest."""
    from feedback.export import MANIFEST

    directory = Path(export_dir)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        report, provenance = manifest["report"], manifest.get("provenance", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--export {directory}: not an ahf export (no readable {MANIFEST}: {exc})") from exc
    fmt = report.get("format", "?")
    section = Section(f"export-{index}", f"Export: {directory.name} ({fmt})",
                      f"The dataset in {directory}: rows and posts per split, and what was dropped on the way "
                      "(its card, README.md, has the distributions).")
    rows, posts, dropped = report.get("rows", {}), report.get("posts", {}), report.get("dropped", {})
    kept = sum(rows.values())
    section.facts = [(k, v) for k, v in (("rows", kept), ("candidates", report.get("candidates")),
                                         ("posts", sum(posts.values())), ("subreddits", provenance.get("subreddits")),
                                         ("act filter", report.get("act"))) if v is not None]
    section.notes.append(f"Format `{fmt}`, exported from the store {provenance.get('store', '?')} "
                         "(.ahf-export.json has the label and export configs).")
    splits = list(rows)

    section.figures.append(Figure(
        "Rows and posts per split", "Rows and posts of each split (split by post: no post is in two splits).",
        F.render(lambda ax: F.bars(ax, splits, {"rows": [rows[s] for s in splits],
                                                "posts": [posts.get(s, 0) for s in splits]},
                                   value_label="count", annotate=True))))
    reasons = ["kept", *dropped]
    section.figures.append(Figure(
        "Kept and dropped", f"The {report.get('candidates', 0):,} candidate rows: kept, or dropped and why.",
        F.render(lambda ax: F.bars(ax, reasons, {"rows": [kept, *dropped.values()]}, horizontal=True,
                                   annotate=True, value_label="candidate rows"),
                 size=(5.6, 1.2 + 0.35 * len(reasons)))))
    return section, {"dir": str(directory), "format": fmt, "rows": rows, "dropped": dropped}
