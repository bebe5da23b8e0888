"""Training inputs in TRL's column conventions, read from JSONL / Parquet / CSV / a `datasets` directory.

- pairs (reward models, DPO): `prompt, chosen, rejected` and optionally `margin` (a float the
  Bradley-Terry loss subtracts) and `score_ratio` (used only for bucketed evaluation).
- sft (behaviour cloning): `prompt, completion`.
- pointwise (tier-conditioned reward model): `prompt, completion` and `tier` (good/ok/bad) or
  `label` (bool), optionally `reward`.
- prompts (RLOO): any rows with a `prompt` column.

A trainer's DATA is such a file or an `ahf export` directory (`read_source`): then it trains on the
export's `train` split, evaluates on its `validation` split, and records the export's manifest.

Every malformed row raises a `UserError` naming file, line and field; nothing is dropped silently.
Length filtering returns what it kept *and* the counts of what it dropped or truncated.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ahf.console import UserError
from ahf.text import detokenize

TIERS = ("bad", "ok", "good")  # index = class id; higher is better


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    score_ratio: float | None = None
    rejected_prompt: str | None = None  # extension: the rejected reply answers another prompt (None = same)


@dataclass
class SFTExample:
    prompt: str
    completion: str


@dataclass
class PointExample:
    prompt: str
    completion: str
    tier: int  # index into TIERS
    reward: float | None = None


@dataclass
class Prompt:
    prompt: str


# ----------------------------------------------------------------------------- reading rows

def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (`file:line` location, row dict) for JSONL/JSON-lines, Parquet, CSV or a datasets dir."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if path.is_dir():
        yield from _read_datasets_dir(path)
        return
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json", ".ndjson"}:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield f"{path}:{number}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}:row {number}", row
    elif suffix == ".csv":
        csv.field_size_limit(1 << 30)
        with path.open(encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), 1):
                yield f"{path}:row {number}", row
    else:
        raise UserError(f"{path}: unsupported input format {suffix!r} (use .jsonl, .parquet, .csv or a datasets dir)")


def _read_datasets_dir(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise UserError(f"{path}: not a saved `datasets` directory ({exc})") from exc
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise UserError(f"{path}: DatasetDict without a 'train' split (has {list(data)})")
        data = data["train"]
    for number, row in enumerate(data, 1):
        yield f"{path}:row {number}", row


def _text(row: dict, name: str, where: str, aliases: tuple[str, ...] = ()) -> str:
    for key in (name, *aliases):
        if key in row and row[key] is not None:
            value = row[key]
            if not isinstance(value, str):
                raise UserError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise UserError(f"{where}: field {key!r} is empty")
            return value
    raise UserError(f"{where}: missing field {name!r}" + (f" (or {', '.join(aliases)})" if aliases else ""))


def _optional_float(row: dict, name: str, where: str) -> float | None:
    value = row.get(name)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: field {name!r} must be a number, got {value!r}") from exc


def _maybe_detok(text: str, enabled: bool) -> str:
    return detokenize(text) if enabled else text


# ----------------------------------------------------------------------------- loaders

def load_pairs(path: str | Path, detok: bool = False) -> list[Pair]:
    pairs = []
    for where, row in read_rows(path):
        pairs.append(Pair(
            prompt=_maybe_detok(_text(row, "prompt", where), detok),
            chosen=_maybe_detok(_text(row, "chosen", where), detok),
            rejected=_maybe_detok(_text(row, "rejected", where), detok),
            margin=_optional_float(row, "margin", where),
            score_ratio=_optional_float(row, "score_ratio", where),
            rejected_prompt=_maybe_detok(_text(row, "rejected_prompt", where), detok)
            if row.get("rejected_prompt") is not None else None,
        ))
    if not pairs:
        raise UserError(f"{path}: no pairs")
    return pairs


def load_sft(path: str | Path, detok: bool = False) -> list[SFTExample]:
    """`prompt, completion`; Fan et al.'s CSV names the completion `story` (its `completion` is machine-written)."""
    rows = list(read_rows(path))
    if rows and "story" in rows[0][1]:
        completion_field, aliases = "story", ()
    else:
        completion_field, aliases = "completion", ()
    examples = [SFTExample(_maybe_detok(_text(row, "prompt", where), detok),
                           _maybe_detok(_text(row, completion_field, where, aliases), detok))
                for where, row in rows]
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def load_pointwise(path: str | Path, detok: bool = False) -> list[PointExample]:
    """`prompt, completion, tier` (good/ok/bad) or `label` (True = good, False = bad)."""
    examples = []
    for where, row in read_rows(path):
        if row.get("tier") is not None:
            tier = str(row["tier"]).strip().lower()
            if tier not in TIERS:
                raise UserError(f"{where}: field 'tier' must be one of {TIERS}, got {row['tier']!r}")
            tier_id = TIERS.index(tier)
        elif row.get("label") is not None:
            label = row["label"]
            if isinstance(label, str) and label.lower() in {"true", "false", "1", "0"}:
                label = label.lower() in {"true", "1"}
            if not isinstance(label, (bool, int)):
                raise UserError(f"{where}: field 'label' must be a boolean, got {label!r}")
            tier_id = TIERS.index("good") if label else TIERS.index("bad")
        else:
            raise UserError(f"{where}: missing field 'tier' (or 'label')")
        examples.append(PointExample(_maybe_detok(_text(row, "prompt", where), detok),
                                     _maybe_detok(_text(row, "completion", where), detok),
                                     tier_id, _optional_float(row, "reward", where)))
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def load_prompts(path: str | Path, detok: bool = False) -> list[Prompt]:
    """The distinct `prompt` values of any rows file, sorted (RLOO's input; other columns are ignored)."""
    prompts = {_maybe_detok(_text(row, "prompt", where), detok) for where, row in read_rows(path)
               if row.get("prompt") is not None}
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return [Prompt(p) for p in sorted(prompts)]


def explanation_task(path: str | Path, eval_fraction: float = 0.2, seed: int = 0,
                     per_invalid: int = 2) -> tuple[list[Pair], list[Pair], dict[str, int]]:
    """Pairs from the lfqa validity annotations (answers judged valid / invalid), split by question.

    Questions are split first; within each side every invalid answer is paired with the valid answers
    to its own question, and with `per_invalid` valid answers to *other* questions of the same source
    (`dataset`: ELI5, NQ, ...; so the source's style is no shortcut). Those cross pairs carry
    `rejected_prompt`: the reward compares (question, answer) wholes. Returns train, eval and counts.
    """
    answers = []
    for where, row in read_rows(path):
        if not isinstance(row.get("is_valid"), bool):
            raise UserError(f"{where}: field 'is_valid' must be a boolean")
        answers.append({"qid": str(row.get("q_id") or _text(row, "question", where)),
                        "question": " ".join(_text(row, "question", where).split()),
                        "answer": " ".join(_text(row, "answer_paragraph", where).split()),
                        "valid": row["is_valid"], "source": str(row.get("dataset", ""))})
    qids = sorted({a["qid"] for a in answers})
    random.Random(seed).shuffle(qids)
    held_out = set(qids[: round(len(qids) * eval_fraction)])
    rng = random.Random(seed)
    counts: Counter = Counter()
    sides = []
    for side in (False, True):
        pool = [a for a in answers if (a["qid"] in held_out) == side]
        valid = [a for a in pool if a["valid"]]
        pairs = []
        for bad in (a for a in pool if not a["valid"]):
            for good in (a for a in valid if a["qid"] == bad["qid"]):
                pairs.append(Pair(bad["question"], good["answer"], bad["answer"]))
                counts["same_question"] += 1
            others = [a for a in valid if a["qid"] != bad["qid"] and a["source"] == bad["source"]]
            for good in rng.sample(others, min(per_invalid, len(others))):
                pairs.append(Pair(good["question"], good["answer"], bad["answer"], rejected_prompt=bad["question"]))
                counts["cross_question"] += 1
        sides.append(pairs)
    counts.update({"answers": len(answers), "questions": len(qids), "eval_questions": len(held_out),
                   "train_pairs": len(sides[0]), "eval_pairs": len(sides[1])})
    return sides[0], sides[1], dict(counts)


def write_pairs(pairs: list[Pair], path: str | Path) -> Path:
    """TRL-column JSONL (optional fields only when set)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
            row.update({k: getattr(pair, k) for k in ("margin", "score_ratio", "rejected_prompt")
                        if getattr(pair, k) is not None})
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------- sources and lineage

@dataclass
class Source:
    """The rows a trainer reads, and where they came from (`data`, recorded in `ahf_model.json`).

    A file: `train` = its rows, `validation` = None. An `ahf export` directory: its `train` and
    `validation` splits (the latter possibly empty), and `data["export"]` = the export's manifest
    (`report`, `provenance`: store, tables, dates; `labels_config`, `export_config`).
    """
    train: list
    validation: list | None
    data: dict


def is_export(path: str | Path) -> bool:
    from feedback.export import MANIFEST

    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def read_source(path: str | Path, load: Callable, detok: bool, formats: tuple[str, ...] | None = None) -> Source:
    """Rows of a file, or the train and validation splits of an export directory in one of `formats`."""
    from feedback.export import MANIFEST

    path = Path(path)
    if not is_export(path):
        return Source(load(path, detok=detok), None, {"path": str(path.resolve())})
    manifest = json.loads((path / MANIFEST).read_text())
    report = manifest.get("report") or {}
    if formats and report.get("format") not in formats:
        raise UserError(f"{path}: a {report.get('format')!r} export; this trainer reads "
                        f"{' or '.join(formats)} exports (`ahf export --format {formats[0]}`)")
    rows = report.get("rows") or {}
    if not rows.get("train"):
        raise UserError(f"{path}: the export's train split is empty ({rows})")
    validation = load(path / "validation.jsonl", detok=detok) if rows.get("validation") else []
    export = {key: manifest.get(key) for key in ("report", "provenance", "labels_config", "export_config")}
    return Source(load(path / "train.jsonl", detok=detok), validation,
                  {"path": str(path.resolve()), "export": export, "train_split": "train"})


def held_out(source: Source, eval_path: str | Path | None, load: Callable, detok: bool, eval_fraction: float,
             seed: int) -> tuple[list, list, str]:
    """(train rows, held-out rows, where the held-out rows come from). In order: the file `eval_path`,
    the export's validation split, else `eval_fraction` of the training prompts (`split_by_prompt`)."""
    if eval_path:
        return source.train, load(eval_path, detok=detok), f"eval file {eval_path}"
    if source.validation:
        return source.train, source.validation, "validation split"
    train, held = split_by_prompt(source.train, eval_fraction, seed)
    why = " (the export's validation split is empty)" if source.validation is not None else ""
    return train, held, f"{eval_fraction:.0%} of the training prompts{why}"


# ----------------------------------------------------------------------------- split and filter

def split_by_prompt(examples: list, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Held-out prompts, not held-out rows: no prompt appears on both sides (exact, seeded)."""
    if not 0 <= eval_fraction < 1:
        raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    prompts = sorted({e.prompt for e in examples})
    random.Random(seed).shuffle(prompts)
    n_eval = round(len(prompts) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and len(prompts) > 1:
        n_eval = 1
    held_out = set(prompts[:n_eval])
    return ([e for e in examples if e.prompt not in held_out], [e for e in examples if e.prompt in held_out])


def prompt_folds(examples: list, folds: int, seed: int) -> list[tuple[list, list]]:
    """k-fold cross-validation by prompt: every prompt is held out exactly once (seeded assignment); `folds` at
    or past the prompt count is leave-one-prompt-out (one fold per prompt, no assignment noise)."""
    prompts = sorted({e.prompt for e in examples})
    folds = min(folds, len(prompts))
    random.Random(seed).shuffle(prompts)
    fold_of = {prompt: i % folds for i, prompt in enumerate(prompts)}
    return [([e for e in examples if fold_of[e.prompt] != k], [e for e in examples if fold_of[e.prompt] == k])
            for k in range(folds)]


@dataclass
class FilterReport:
    """What length filtering did: `kept` rows, and per-reason counts of dropped / truncated ones; where a
    LengthPolicy counted them, the reply tokens the model sees of the kept rows against their whole length;
    under reply windows (training.rm, long_replies), the replies split into windows and how many windows."""
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    reply_tokens_seen: int = 0
    reply_tokens_whole: int = 0
    sides_split: int = 0  # long_replies=windows (training.rm): replies scored as several windows
    windows: int = 0  # ... and their windows, all together

    def to_dict(self) -> dict:
        counts = {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped),
                  "truncated": dict(self.truncated)}
        if self.reply_tokens_whole:
            counts["reply_tokens"] = {"seen": self.reply_tokens_seen, "whole": self.reply_tokens_whole,
                                      "share_seen": round(self.reply_tokens_seen / self.reply_tokens_whole, 4)}
        if self.sides_split:
            counts["windows"] = {"sides_split": self.sides_split, "windows": self.windows}
        return counts

    def add(self, other: FilterReport) -> None:
        """Count `other`'s rows in this report too (one report over several encodings)."""
        self.total += other.total
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.truncated.update(other.truncated)
        self.reply_tokens_seen += other.reply_tokens_seen
        self.reply_tokens_whole += other.reply_tokens_whole
        self.sides_split += other.sides_split
        self.windows += other.windows


def tier_pairs(points: list[PointExample]) -> list[Pair]:
    """Pairs from tiered rows: a better-tier and a worse-tier completion of the same prompt (held-out
    pairwise accuracy of a tier model, its length baseline and buckets)."""
    by_prompt: dict[str, list[PointExample]] = {}
    for p in points:
        by_prompt.setdefault(p.prompt, []).append(p)
    return [Pair(prompt, a.completion, b.completion) for prompt, group in by_prompt.items()
            for a in group for b in group if a.tier > b.tier]
