"""Rebuild comment trees and extract dialog turns: (post, ancestor chain) -> reply.

`rebuild_turns` derives the `turns` table (mining.schema.TURN_SCHEMA) from `posts` and `comments`
inside DuckDB: one tree walk classifies every comment (a turn, or the first reason it is not), then
the turns are assembled with their siblings, children and post. Every comment ends up either as a
turn or under exactly one filter reason, so `comments == turns + sum(filtered)`. The table is
replaced atomically: a failed rebuild leaves the previous turns. The dialog context of a turn is
defined once, in mining.schema.turn_rows_sql. The contract is documented in docs/turns.md.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from ahf.config import StageConfig, load_config
from mining.store import COMMENTS_VERSION, Store

DEFAULT_BOTS = ["AutoModerator", "RemindMeBot", "WikiTextBot", "sneakpeekbot", "RepostSleuthBot",
                "TweetPoster", "autowikibot", "image_linker_bot", "SaveVideo", "B0tRank", "GifReversingBot"]


class TurnConfig(StageConfig):
    """Which comments become turns. Each rule that drops a comment is counted under its name."""

    min_chars: int = Field(5, ge=0, description="replies shorter than this (after stripping) -> too_short")
    drop_deleted: bool = Field(True, description="'[deleted]' / '[removed]' / empty bodies are never reply texts")
    bot_authors: list[str] = Field(default_factory=lambda: list(DEFAULT_BOTS),
                                   description="comments by these authors -> bot_author (and their replies to "
                                               "a turn never count as its reply sentiment)")
    drop_nsfw: bool = Field(True, description="replies under posts marked over_18 -> nsfw")
    partition_comments: int = Field(
        2_000_000, ge=1, description="comments per partition of threads on a parallel engine (--engine ray); "
                                     "the local engine builds all threads in one partition")


class MiningConfig(StageConfig):
    """The mining stage's config (configs/mining.yaml)."""

    turns: TurnConfig = Field(default_factory=TurnConfig, description="which comments become turns")


@dataclass
class TurnReport:
    comments: int = 0
    turns: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    max_depth: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"comments": self.comments, "turns": self.turns, "filtered": self.filtered,
                "max_depth": self.max_depth, "seconds": round(self.seconds, 3)}


# The reason a comment is not a turn; the first matching rule wins (NULL: it is a turn).
_REASON_SQL = """
CASE
  WHEN $drop_deleted AND c.body = '[deleted]' THEN 'deleted_body'
  WHEN $drop_deleted AND c.body = '[removed]' THEN 'removed_body'
  WHEN c.body IS NULL OR trim(c.body) = '' THEN 'empty_body'
  WHEN list_contains($bots, c.author) THEN 'bot_author'
  WHEN t.id IS NULL THEN 'orphan'
  WHEN $drop_nsfw AND coalesce(p.over_18, false) THEN 'nsfw'
  WHEN length(trim(c.body)) < $min_chars THEN 'too_short'
END
"""

# Pass 1, the tree walk, once: every comment with its ancestors (a recursive walk from the
# top-level comments down, so a comment whose ancestor is missing is never reached: an orphan) and
# the reason it is not a turn (NULL: it is one). The walk stays inside a thread: a comment whose
# parent is another thread's (its link_id and its parent's disagree) is not reached either, so a
# turn depends only on its own thread, and partitions of threads (Ray's) give the same turns.
_CLASSIFY_SQL = f"""
CREATE OR REPLACE TEMP TABLE turn_classes AS
WITH RECURSIVE
  edges AS (
    SELECT id, link_id, CASE WHEN starts_with(parent_id, 't1_') THEN substr(parent_id, 4) END AS parent_comment
    FROM comments
  ),
  tree(id, link_id, ancestor_ids) AS (
    SELECT c.id, c.link_id, []::VARCHAR[] FROM comments c
    WHERE starts_with(c.parent_id, 't3_') AND c.parent_id = c.link_id
    UNION ALL
    SELECT e.id, e.link_id, list_append(tree.ancestor_ids, tree.id)
    FROM edges e JOIN tree ON e.parent_comment = tree.id AND e.link_id = tree.link_id
  )
SELECT c.id, t.ancestor_ids, {_REASON_SQL} AS reason
FROM comments c
LEFT JOIN tree t ON t.id = c.id
LEFT JOIN posts p ON p.id = substr(c.link_id, 4)
"""

# Pass 2: the turns (TURN_SCHEMA, docs/turns.md) of the comments that have no reason.
_TURNS_SQL = """
WITH
  siblings AS (
    SELECT id,
           row_number() OVER (PARTITION BY link_id, parent_id ORDER BY score DESC NULLS LAST, created_utc, id)
             AS sibling_rank,
           count(*) OVER (PARTITION BY link_id, parent_id) AS n_siblings
    FROM comments
  ),
  kids AS (
    SELECT substr(parent_id, 4) AS id, link_id, count(*) AS n_children, list(id ORDER BY created_utc, id) AS child_ids
    FROM comments WHERE starts_with(parent_id, 't1_') GROUP BY ALL
  ),
  classified AS (
    SELECT c.*, k.ancestor_ids,
           p.title AS post_title, p.selftext AS post_selftext_raw, p.author AS post_author,
           p.score AS post_score, p.created_utc AS post_created_utc, p.over_18,
           pc.body AS parent_body, pc.created_utc AS parent_created_utc,
           p.id IS NOT NULL AS has_post
    FROM turn_classes k
    JOIN comments c ON c.id = k.id
    LEFT JOIN posts p ON p.id = substr(c.link_id, 4)
    LEFT JOIN comments pc ON starts_with(c.parent_id, 't1_') AND pc.id = substr(c.parent_id, 4)
    WHERE k.reason IS NULL
  )
SELECT
  k.id AS comment_id,
  substr(k.link_id, 4) AS post_id,
  k.parent_id,
  k.subreddit,
  k.author,
  CASE WHEN NOT k.has_post THEN NULL
       ELSE k.author = k.post_author AND k.author NOT IN ('[deleted]', '[removed]') END AS is_op,
  k.body AS reply,
  k.post_title,
  CASE WHEN k.post_selftext_raw IS NULL OR k.post_selftext_raw IN ('[deleted]', '[removed]') THEN ''
       ELSE k.post_selftext_raw END AS post_selftext,
  k.parent_body,
  k.ancestor_ids,
  len(k.ancestor_ids) + 1 AS depth,
  k.score,
  k.created_utc,
  -- differences in HUGEINT: a store written before ingest bounded stamps may hold any BIGINT
  TRY_CAST(k.created_utc::HUGEINT - k.post_created_utc AS BIGINT) AS delay_post_s,
  TRY_CAST(k.created_utc::HUGEINT - CASE WHEN starts_with(k.parent_id, 't3_') THEN k.post_created_utc
                                         ELSE k.parent_created_utc END AS BIGINT) AS delay_parent_s,
  s.sibling_rank,
  s.n_siblings,
  coalesce(kids.n_children, 0) AS n_children,
  coalesce(kids.child_ids, []::VARCHAR[]) AS child_ids,
  k.post_score,
  k.post_created_utc,
  k.over_18
FROM classified k
JOIN siblings s ON s.id = k.id
LEFT JOIN kids ON kids.id = k.id AND kids.link_id = k.link_id
"""


def _params(config: TurnConfig) -> dict:
    return {"drop_deleted": config.drop_deleted, "bots": config.bot_authors,
            "drop_nsfw": config.drop_nsfw, "min_chars": config.min_chars}


@dataclass
class TurnsTask:
    """One partition of threads: plain values, or this process's open store (local engine)."""

    store: str | Store
    config: TurnConfig
    part: int
    parts: int
    out: str  # the Parquet file this partition's turns go to


def turns_partition(task: TurnsTask) -> dict[str | None, int]:
    """The turns of the threads in partition `task.part` (`hash(link_id) % parts`), written to
    `task.out`; returns how many comments got each reason (None: a turn). The same function for
    every engine: the local one calls it on its open store, a Ray task on the store's path."""
    with Store.reading(task.store) as store, store.partitioned(("comments", "posts"), task.part, task.parts, copy=True):
        store.execute(_CLASSIFY_SQL, _params(task.config))
        try:
            store.execute(f"COPY ({_TURNS_SQL}) TO '{_quoted(task.out)}' (FORMAT parquet, COMPRESSION uncompressed)")
            return dict(store.rows("SELECT reason, count(*) FROM turn_classes GROUP BY reason"))
        finally:
            store.execute("DROP TABLE IF EXISTS turn_classes")


def _quoted(path: str) -> str:
    return str(path).replace("'", "''")


def build_turns(store_dir: str | Path, config: TurnConfig | None = None, engine=None) -> TurnReport:
    """(Re)build the `turns` table of the store at `store_dir`; see `rebuild_turns`."""
    with Store(store_dir, create=False) as store:
        return rebuild_turns(store, config, engine)


def rebuild_turns(store: Store, config: TurnConfig | None = None, engine=None) -> TurnReport:
    """(Re)build the `turns` table of an open store; returns the accounting of every comment.

    `config=None` reads configs/mining.yaml (`turns:`). Partitions of threads run on `engine`
    (ahf.engine; default: this process, one partition: DuckDB parallelises inside it), each into a
    Parquet file; the new table replaces the old one from those files in one transaction with the
    config it was built with and the comments version it reflects (`ahf stats` compares that with the
    store's, to say when turns are stale).
    """
    from ahf.engine import LocalEngine

    config = config or load_config(MiningConfig, "mining").turns
    engine = engine or LocalEngine()
    started = time.perf_counter()
    source_version = store.meta(COMMENTS_VERSION)
    parts = engine.partitions(store.count("comments"), config.partition_comments)
    with store.scratch_dir("turns") as scratch:
        ref = store if engine.name == "local" else str(store.path)
        tasks = [TurnsTask(ref, config, part, parts, str(scratch / f"part-{part:05d}.parquet"))
                 for part in range(parts)]
        reasons: Counter = Counter()
        with store.released(engine.name):
            for counts in engine.map(turns_partition, tasks):
                reasons.update(counts)
        files = ", ".join(f"'{_quoted(task.out)}'" for task in tasks)
        store.replace_tables({"turns": f"SELECT * FROM read_parquet([{files}]) "
                                       "ORDER BY post_id, depth, sibling_rank, comment_id"},
                             meta={"turns_config": config.model_dump(mode="json"),
                                   "turns_comments_version": source_version})
    report = TurnReport(comments=store.count("comments"), turns=reasons.pop(None, 0),
                        filtered=dict(sorted(reasons.items())),
                        max_depth=store.value("SELECT coalesce(max(depth), 0) FROM turns"))
    report.seconds = time.perf_counter() - started
    return report
