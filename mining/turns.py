"""Rebuild comment trees and extract dialog turns: (post, ancestor chain) -> reply.

`build_turns` derives the `turns` table from `posts` and `comments` in one SQL pass inside
DuckDB (the tree walk is a recursive CTE from the top-level comments down, so a comment whose
ancestor is missing is never reached: it is an orphan). Every comment ends up either as a turn or
under exactly one filter reason, so `comments == turns + sum(filtered)`. The table is replaced
atomically: a failed rebuild leaves the previous turns. The contract is documented in docs/turns.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from mining.store import Store, transaction

DEFAULT_BOTS = ["AutoModerator", "RemindMeBot", "WikiTextBot", "sneakpeekbot", "RepostSleuthBot",
                "TweetPoster", "autowikibot", "image_linker_bot", "SaveVideo", "B0tRank", "GifReversingBot"]


class TurnConfig(BaseModel):
    """Which comments become turns. Each rule that drops a comment is counted under its name."""

    min_chars: int = Field(5, ge=0, description="replies shorter than this (after stripping) -> too_short")
    drop_deleted: bool = Field(True, description="'[deleted]' / '[removed]' / empty bodies are never reply texts")
    bot_authors: list[str] = Field(default_factory=lambda: list(DEFAULT_BOTS))
    drop_nsfw: bool = Field(True, description="replies under posts marked over_18 -> nsfw")


class MiningConfig(BaseModel):
    turns: TurnConfig = Field(default_factory=TurnConfig)


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

_TURNS_SQL = f"""
CREATE TABLE turns_new AS
WITH RECURSIVE
  edges AS (
    SELECT id, CASE WHEN starts_with(parent_id, 't1_') THEN substr(parent_id, 4) END AS parent_comment
    FROM comments
  ),
  tree(id, ancestor_ids) AS (
    SELECT c.id, []::VARCHAR[] FROM comments c WHERE starts_with(c.parent_id, 't3_')
    UNION ALL
    SELECT e.id, list_append(tree.ancestor_ids, tree.id)
    FROM edges e JOIN tree ON e.parent_comment = tree.id
  ),
  siblings AS (
    SELECT id,
           row_number() OVER (PARTITION BY parent_id ORDER BY score DESC NULLS LAST, created_utc, id)
             AS sibling_rank,
           count(*) OVER (PARTITION BY parent_id) AS n_siblings
    FROM comments
  ),
  kids AS (
    SELECT parent_comment AS id, count(*) AS n_children,
           list(e.id ORDER BY c.created_utc, e.id) AS child_ids
    FROM edges e JOIN comments c USING (id)
    WHERE parent_comment IS NOT NULL GROUP BY parent_comment
  ),
  classified AS (
    SELECT c.*, t.ancestor_ids, {_REASON_SQL} AS reason,
           p.title AS post_title, p.selftext AS post_selftext_raw, p.author AS post_author,
           p.score AS post_score, p.created_utc AS post_created_utc, p.over_18,
           pc.body AS parent_body, pc.created_utc AS parent_created_utc,
           p.id IS NOT NULL AS has_post
    FROM comments c
    LEFT JOIN tree t ON t.id = c.id
    LEFT JOIN posts p ON p.id = substr(c.link_id, 4)
    LEFT JOIN comments pc ON starts_with(c.parent_id, 't1_') AND pc.id = substr(c.parent_id, 4)
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
  CAST(len(k.ancestor_ids) + 1 AS INTEGER) AS depth,
  k.score,
  k.created_utc,
  k.created_utc - k.post_created_utc AS delay_post_s,
  k.created_utc - CASE WHEN starts_with(k.parent_id, 't3_') THEN k.post_created_utc
                       ELSE k.parent_created_utc END AS delay_parent_s,
  CAST(s.sibling_rank AS INTEGER) AS sibling_rank,
  CAST(s.n_siblings AS INTEGER) AS n_siblings,
  CAST(coalesce(kids.n_children, 0) AS INTEGER) AS n_children,
  coalesce(kids.child_ids, []::VARCHAR[]) AS child_ids,
  k.post_score,
  k.post_created_utc,
  k.over_18
FROM classified k
JOIN siblings s ON s.id = k.id
LEFT JOIN kids ON kids.id = k.id
WHERE k.reason IS NULL
ORDER BY post_id, depth, sibling_rank
"""

_REASONS_SQL = f"""
WITH RECURSIVE
  edges AS (
    SELECT id, CASE WHEN starts_with(parent_id, 't1_') THEN substr(parent_id, 4) END AS parent_comment
    FROM comments
  ),
  tree(id) AS (
    SELECT c.id FROM comments c WHERE starts_with(c.parent_id, 't3_')
    UNION ALL
    SELECT e.id FROM edges e JOIN tree ON e.parent_comment = tree.id
  )
SELECT {_REASON_SQL} AS reason, count(*)
FROM comments c
LEFT JOIN tree t ON t.id = c.id
LEFT JOIN posts p ON p.id = substr(c.link_id, 4)
GROUP BY ALL
"""


def _params(config: TurnConfig) -> dict:
    return {"drop_deleted": config.drop_deleted, "bots": config.bot_authors,
            "drop_nsfw": config.drop_nsfw, "min_chars": config.min_chars}


def build_turns(store_dir: str | Path, config: TurnConfig | None = None) -> TurnReport:
    """(Re)build the `turns` table of a store; returns the accounting of every comment."""
    config = config or TurnConfig()
    started = time.perf_counter()
    with Store(store_dir, create=False) as store:
        con = store.con
        with transaction(con):
            con.execute("DROP TABLE IF EXISTS turns_new")
            con.execute(_TURNS_SQL, _params(config))
            con.execute("DROP TABLE IF EXISTS turns")
            con.execute("ALTER TABLE turns_new RENAME TO turns")
        reasons = dict(con.execute(_REASONS_SQL, _params(config)).fetchall())
        report = TurnReport(
            comments=store.count("comments"),
            turns=reasons.pop(None, 0),
            filtered=dict(sorted(reasons.items())),
            max_depth=con.execute("SELECT coalesce(max(depth), 0) FROM turns").fetchone()[0],
        )
    report.seconds = time.perf_counter() - started
    return report


def turn_contexts(con, comment_ids: list[str]) -> dict[str, list[str]]:
    """The dialog context of each turn, oldest first: post title (+ selftext), then ancestor bodies."""
    rows = con.execute(
        "SELECT comment_id, post_title, post_selftext, ancestor_ids FROM turns "
        "WHERE comment_id IN (SELECT unnest($ids))", {"ids": comment_ids}
    ).fetchall()
    wanted = sorted({a for row in rows for a in row[3]})
    bodies = dict(con.execute("SELECT id, body FROM comments WHERE id IN (SELECT unnest($ids))",
                              {"ids": wanted}).fetchall())
    contexts = {}
    for comment_id, title, selftext, ancestors in rows:
        post = "\n\n".join(part for part in (title, selftext) if part)
        contexts[comment_id] = [post] * bool(post) + [bodies[a] for a in ancestors]
    return contexts
