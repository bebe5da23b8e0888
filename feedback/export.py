"""`ahf export`: labelled turns -> TRL-ready datasets (JSONL, Parquet, `datasets.DatasetDict`).

Formats and their columns (TRL's conventions first, then provenance columns that TRL drops):

- `pairs` (RewardTrainer, DPO): `prompt`, `chosen`, `rejected`, `margin`, + `rule`, `post_id`,
  `chosen_id`, `rejected_id`, `subreddit`, `chosen_score`, `rejected_score`.
- `pointwise` (KTO-style, regression): `prompt`, `completion`, `label` (true for tier good),
  `tier`, `reward`, + `adjusted`, `reply_sentiment`, `comment_id`, `post_id`, `subreddit`.
- `sft` (SFTTrainer): `prompt`, `completion`, + `tier`, `comment_id`, `post_id`, `subreddit`.

`prompt` is the turn's dialog context (docs/turns.md: post title, selftext when present, then every
ancestor comment down to the parent, joined by a blank line) followed by a blank line, so that
TRL's `prompt + completion` reads naturally. Rows are split train / validation / test by a hash of the
post id (no post in two splits), and exact duplicates (same prompt and texts) are removed before the
split. DIR receives `{split}.jsonl`, `{split}.parquet`, `dataset/` (`DatasetDict.save_to_disk`),
`README.md` (the dataset card) with `plots/*.png`, and `.ahf-export.json` (the manifest that marks
DIR as an export, so `--force` never deletes a directory it did not write).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ahf.config import load_config
from ahf.console import UserError
from feedback import card
from feedback.labels import ExportConfig, LabelConfig
from mining.schema import CONTEXT_SEPARATOR, turn_rows_sql
from mining.store import Store

Format = Literal["pairs", "pointwise", "sft"]
FORMATS = ("pairs", "pointwise", "sft")
MANIFEST = ".ahf-export.json"

# The context of every turn (mining.schema.turn_rows_sql, the one definition) as a temp table.
_CONTEXT_SQL = f"CREATE OR REPLACE TEMP TABLE export_context AS SELECT comment_id, context FROM ({turn_rows_sql(columns='t.comment_id')})"

_ACT_FILTER = "(SELECT comment_id FROM acts WHERE act = $act AND coalesce(confidence, 1) >= $min_conf)"

_ROWS_SQL = {
    "pairs": """
SELECT x.context || $sep AS prompt, c.reply AS chosen, r.reply AS rejected, p.margin,
       p.rule, p.post_id, p.chosen_id, p.rejected_id, c.subreddit, p.chosen_score, p.rejected_score
FROM pairs p
JOIN turns c ON c.comment_id = p.chosen_id
JOIN turns r ON r.comment_id = p.rejected_id
JOIN export_context x ON x.comment_id = p.chosen_id
WHERE list_contains($rules, p.rule) {act_pairs}
""",
    "pointwise": """
SELECT x.context || $sep AS prompt, t.reply AS completion, l.tier = 'good' AS label, l.tier, l.reward,
       l.adjusted, l.reply_sentiment_weighted AS reply_sentiment, t.comment_id, t.post_id, t.subreddit
FROM labels l
JOIN turns t USING (comment_id)
JOIN export_context x USING (comment_id)
WHERE list_contains($tiers, l.tier) {act_turns}
""",
    "sft": """
SELECT x.context || $sep AS prompt, t.reply AS completion, l.tier, t.comment_id, t.post_id, t.subreddit
FROM labels l
JOIN turns t USING (comment_id)
JOIN export_context x USING (comment_id)
WHERE list_contains($tiers, l.tier) {act_turns}
""",
}

# Columns that identify a duplicate row, and the order that decides which copy stays.
_DEDUP = {
    "pairs": ("prompt, chosen, rejected", "margin DESC, rule, chosen_id, rejected_id"),
    "pointwise": ("prompt, completion", "post_id, comment_id"),
    "sft": ("prompt, completion", "post_id, comment_id"),
}


@dataclass
class ExportReport:
    format: str
    out: str
    rows: dict[str, int] = field(default_factory=dict)  # per split
    candidates: int = 0  # rows before dropping empty prompts and duplicates
    dropped: dict[str, int] = field(default_factory=dict)
    posts: dict[str, int] = field(default_factory=dict)  # per split
    act: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        return out


def split_of(post_id: str, splits: dict[str, float], seed: int) -> str:
    """A stable split for a post: the same post id always lands in the same split (any machine)."""
    u = int(hashlib.md5(f"{seed}:{post_id}".encode()).hexdigest()[:12], 16) / 16**12
    edge = 0.0
    names = list(splits)
    for name in names:
        edge += splits[name]
        if u < edge:
            return name
    return names[-1]


def _check_out(out: Path, force: bool, store_dir: Path) -> None:
    out_abs, store_abs = out.resolve(), store_dir.resolve()
    if out_abs == store_abs or out_abs in store_abs.parents:
        raise UserError(f"--out {out} would contain the store {store_dir}; choose another directory")
    if out.is_symlink():  # replacing would swap the link for a folder: which of the two was meant is unclear
        raise UserError(f"--out {out} is a symbolic link (to {os.readlink(out)}); give the folder itself as --out")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()):
            if not force:
                raise UserError(f"--out {out} is not empty; pass --force to replace an earlier export")
            if not (out / MANIFEST).exists():
                raise UserError(f"--out {out} is not empty and is not an ahf export (no {MANIFEST}); "
                                "refusing to replace it even with --force")
            _check_manifest(out / MANIFEST)


def _check_manifest(path: Path) -> None:
    """--force deletes only what an export wrote: a manifest with the keys `export_dataset` writes."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or not {"report", "provenance"} <= manifest.keys():
        raise UserError(f"{path} is not an ahf export manifest (an export writes one with its report and "
                        "provenance); refusing to replace its folder even with --force")


def export_dataset(store_dir: str | Path, fmt: Format, out: str | Path, act: str | None = None,
                   force: bool = False, config: ExportConfig | None = None, engine=None) -> ExportReport:
    """Write one export of the store's labels into `out` (replaced atomically with `force`).
    `config=None` reads configs/labels.yaml (`export:`). The rows of each partition of posts (their
    contexts are the costly part) are made on `engine` (ahf.engine; default: this process, one
    partition); the duplicates across posts, the splits and the files are made here."""
    from ahf.engine import LocalEngine

    engine = engine or LocalEngine()
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    config = config or load_config(LabelConfig, "labels").export
    started = time.perf_counter()
    store_dir, out = Path(store_dir), Path(out)
    _check_out(out, force, store_dir)
    report = ExportReport(format=fmt, out=str(out), act=act)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with Store(store_dir, read_only=True) as store:
            for table in ("turns", "labels", "pairs"):
                store.require(table, f"run `ahf label --store {store_dir}` first")
            counts = _select_rows(store, fmt, act, config, report, engine, tmp / ".parts")
            _write_splits(store, fmt, tmp, config)
            provenance = _provenance(store, store_dir)
            labels_config = store.meta("labels_config")
        _save_datasets(tmp, list(config.splits))
        card.write_card(tmp, fmt, report, config, labels_config, provenance, counts)
        report.seconds = time.perf_counter() - started
        (tmp / MANIFEST).write_text(json.dumps({"report": report.to_dict(), "provenance": provenance,
                                                "labels_config": labels_config, "export_config": config.model_dump()},
                                               indent=1))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


@dataclass
class ExportTask:
    """One partition of posts: the rows SQL and its parameters, and where its rows go: a Parquet file
    (a Ray task), or, with `out=None`, the temp table `export_candidates` of the open store (local)."""

    store: str | Store
    sql: str
    params: dict
    part: int
    parts: int
    out: str | None = None


def export_partition(task: ExportTask) -> str | None:
    """The candidate rows of the posts in partition `task.part`, with their contexts. The same function
    for every engine: the local one runs it on its open store, a Ray task on the store's path."""
    with Store.reading(task.store) as store, store.partitioned(("turns", "labels", "pairs", "comments"), task.part, task.parts):
        store.execute(_CONTEXT_SQL)
        try:
            sink = (f"CREATE OR REPLACE TEMP TABLE export_candidates AS {task.sql}" if task.out is None else
                    f"COPY ({task.sql}) TO '{_quoted(task.out)}' (FORMAT parquet, COMPRESSION uncompressed)")
            store.execute(sink, task.params)
        finally:
            store.execute("DROP TABLE IF EXISTS export_context")
    return task.out


def _quoted(path: str | Path) -> str:
    return str(path).replace("'", "''")


def _select_rows(store: Store, fmt: str, act: str | None, config: ExportConfig, report: ExportReport,
                 engine, parts_dir: Path) -> dict:
    """Materialise the export rows (deduplicated, with their split) in a temp table `export_rows`."""
    params: dict = {"sep": CONTEXT_SEPARATOR}
    act_turns = act_pairs = ""
    if act is not None:
        store.require("acts", "tag dialog acts first (`ahf acts tag`)")
        known = [r[0] for r in store.rows("SELECT DISTINCT act FROM acts ORDER BY act")]
        if act not in known:
            raise UserError(f"--act {act}: no turn has this act; the acts table has {known}")
        params |= {"act": act, "min_conf": config.act_min_confidence}
        act_turns = f"AND t.comment_id IN {_ACT_FILTER}"
        act_pairs = f"AND p.chosen_id IN {_ACT_FILTER} AND p.rejected_id IN {_ACT_FILTER}"
    if fmt == "pairs":
        params["rules"] = list(config.rules)
    else:
        params["tiers"] = list(config.tiers if fmt == "pointwise" else config.sft_tiers)
    rows_sql = _ROWS_SQL[fmt].format(act_turns=act_turns, act_pairs=act_pairs)
    if fmt != "pairs" and config.tier_source == "sentiment":
        rows_sql = _with_sentiment_tiers(store, rows_sql)
    if engine.name == "local":  # one partition, straight into this connection's temp table
        list(engine.map(export_partition, [ExportTask(store, rows_sql, params, 0, 1)]))
    else:
        parts = engine.partitions(store.count("turns"), config.partition_turns)
        parts_dir.mkdir(parents=True, exist_ok=True)
        files = list(engine.map(export_partition, [
            ExportTask(str(store.path), rows_sql, params, part, parts, str(parts_dir / f"part-{part:05d}.parquet"))
            for part in range(parts)]))
        listed = ", ".join(f"'{_quoted(f)}'" for f in files)
        store.execute(f"CREATE OR REPLACE TEMP TABLE export_candidates AS SELECT * FROM read_parquet([{listed}])")
        shutil.rmtree(parts_dir, ignore_errors=True)
    report.candidates = store.count("export_candidates")
    # A top-level reply to a post missing from the store (comment-only dumps) has no context.
    empty = store.value("SELECT count(*) FROM export_candidates WHERE prompt = $sep", {"sep": CONTEXT_SEPARATOR})
    # A pair of identical texts (two siblings both saying "this") teaches nothing.
    same = store.value("SELECT count(*) FROM export_candidates WHERE prompt <> $sep AND chosen = rejected",
                       {"sep": CONTEXT_SEPARATOR}) if fmt == "pairs" else 0
    key, order = _DEDUP[fmt]
    post_ids = [r[0] for r in store.rows("SELECT DISTINCT post_id FROM export_candidates")]
    splits = pa.table({"post_id": pa.array(post_ids, pa.string()),
                       "split": pa.array([split_of(p, config.splits, config.seed) for p in post_ids], pa.string())})
    with store.registered("post_splits", splits):
        store.execute(f"""
            CREATE OR REPLACE TEMP TABLE export_rows AS
            SELECT e.*, s.split FROM export_candidates e JOIN post_splits s USING (post_id)
            WHERE e.prompt <> $sep {"AND e.chosen <> e.rejected" if fmt == "pairs" else ""}
            QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {order}) = 1
        """, {"sep": CONTEXT_SEPARATOR})
    kept = store.count("export_rows")
    report.dropped = {"no_context": empty, "duplicate": report.candidates - empty - same - kept}
    if fmt == "pairs":
        report.dropped["same_text"] = same
    by_split = dict(store.rows("SELECT split, count(*) FROM export_rows GROUP BY split"))
    report.rows = {s: by_split.get(s, 0) for s in config.splits}
    posts = dict(store.rows("SELECT split, count(DISTINCT post_id) FROM export_rows GROUP BY split"))
    report.posts = {s: posts.get(s, 0) for s in config.splits}
    return _distributions(store, fmt)


# `export.tier_source: sentiment`: the same rows SQL over the labels with `tier` taken from `sentiment_tier`.
_LABELS = "FROM labels l"
_SENTIMENT_TIER_LABELS = "FROM (SELECT * REPLACE (sentiment_tier AS tier) FROM labels) l"


def _with_sentiment_tiers(store: Store, rows_sql: str) -> str:
    has_column = store.value("SELECT count(*) FROM information_schema.columns "
                             "WHERE table_name = 'labels' AND column_name = 'sentiment_tier'")
    if not has_column:
        raise UserError(f"export.tier_source: sentiment: the labels of {store.path} have no sentiment_tier "
                        f"column (labelled by an older ahf); run `ahf label --store {store.path}` again")
    assert rows_sql.count(_LABELS) == 1, "the pointwise and sft rows read `labels l` once"
    return rows_sql.replace(_LABELS, _SENTIMENT_TIER_LABELS)


def _distributions(store: Store, fmt: str) -> dict:
    """Figures for the card: per-split category counts and the numeric values to plot."""
    category = "rule" if fmt == "pairs" else "tier"
    counts: dict = {"by": category, "table": {}}
    for split, value, n in store.rows(f"SELECT split, {category}, count(*) FROM export_rows GROUP BY ALL ORDER BY ALL"):
        counts["table"].setdefault(split, {})[value] = n
    numeric = {"pairs": ["margin"], "pointwise": ["reward", "reply_sentiment"], "sft": []}[fmt]
    counts["values"] = {
        col: [r[0] for r in store.rows(f"SELECT {col} FROM export_rows WHERE {col} IS NOT NULL "
                                       f"USING SAMPLE reservoir(20000 ROWS) REPEATABLE (0)")]
        for col in numeric}
    counts["subreddits"] = dict(store.rows(
        "SELECT subreddit, count(*) FROM export_rows GROUP BY ALL ORDER BY 2 DESC, 1 LIMIT 20"))
    return counts


def _write_splits(store: Store, fmt: str, tmp: Path, config: ExportConfig) -> None:
    """Stream each split into JSONL and Parquet (record batches: memory stays bounded)."""
    order = "post_id, chosen_id, rejected_id, rule" if fmt == "pairs" else "post_id, comment_id"
    for split in config.splits:
        reader = store.reader(f"SELECT * EXCLUDE (split) FROM export_rows WHERE split = $s ORDER BY {order}",
                              {"s": split}, batch_rows=10_000)
        with (tmp / f"{split}.jsonl").open("wb") as jsonl, \
                pq.ParquetWriter(tmp / f"{split}.parquet", reader.schema) as parquet:
            for batch in reader:
                parquet.write_batch(batch)
                for row in batch.to_pylist():
                    jsonl.write(orjson.dumps(row) + b"\n")


def _save_datasets(tmp: Path, splits: list[str]) -> None:
    import datasets

    cache = tmp / ".cache"  # datasets' arrow cache stays inside the export until it is removed
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        parts, shards = {}, {}
        for s in splits:
            path = tmp / f"{s}.parquet"
            if pq.ParquetFile(path).metadata.num_rows == 0:
                # from_parquet rejects empty files, and an empty split saved with 0 shards
                # cannot be loaded again: one empty shard can.
                parts[s], shards[s] = datasets.Dataset(pq.read_table(path)), 1
            else:  # memory-mapped from the cache, not loaded into RAM
                parts[s] = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache))
        datasets.DatasetDict(parts).save_to_disk(str(tmp / "dataset"), num_shards=shards or None)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if bars_were_on:
            datasets.enable_progress_bars()


def _provenance(store: Store, store_dir: Path) -> dict:
    first, last, subs = store.rows("SELECT min(created_utc), max(created_utc), count(DISTINCT subreddit) FROM turns")[0]
    return {
        "store": str(store_dir.resolve()),
        "tables": {t: store.count(t) for t in ("posts", "comments", "turns", "labels", "pairs", "acts")
                   if store.has_table(t)},
        "turns_created_utc": [first, last],
        "subreddits": subs,
        "exported_utc": int(time.time()),
    }


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an earlier one is swapped out, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
