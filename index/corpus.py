"""Read the `turns` table (the mining stage's contract) as what the indexes need.

One row per turn: `comment_id`, `subreddit`, `reply` (what we index and tag), `parent_text` (what it
answers: the parent comment, or the post title + selftext for a top-level reply), `title` (the
post title, where prompt tags such as `[WP]` live) and `context` (the whole dialog before the reply:
post title, selftext, then every ancestor body, oldest first). The context is assembled in DuckDB
so that a million turns never pass through Python one row at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from ahf.console import UserError

# Very long contexts (deep threads under long self-posts) are cut to their last characters:
# the end of the context is what the reply answers.
MAX_CONTEXT_CHARS = 4000

def _turns_sql(where: str = "") -> str:
    """The turns as TURN_COLUMNS; `where` filters `turns` before the (costly) context assembly."""
    return f"""
WITH picked AS (SELECT * FROM turns {where}),
anc AS (
  SELECT comment_id, unnest(ancestor_ids) AS ancestor_id, generate_subscripts(ancestor_ids, 1) AS pos
  FROM picked
),
chain AS (
  SELECT anc.comment_id, string_agg(c.body, '\n\n' ORDER BY anc.pos) AS bodies
  FROM anc JOIN comments c ON c.id = anc.ancestor_id
  GROUP BY anc.comment_id
)
SELECT t.comment_id,
       coalesce(t.subreddit, '') AS subreddit,
       t.reply,
       coalesce(t.post_title, '') AS title,
       coalesce(t.parent_body,
                concat_ws('\n\n', t.post_title, nullif(t.post_selftext, '')), '') AS parent_text,
       right(concat_ws('\n\n', t.post_title, nullif(t.post_selftext, ''), chain.bodies),
             {MAX_CONTEXT_CHARS}) AS context
FROM picked t LEFT JOIN chain USING (comment_id)
ORDER BY t.comment_id
"""


TURN_COLUMNS = ("comment_id", "subreddit", "reply", "title", "parent_text", "context")


def require_turns(con) -> int:
    """The number of turns; a clear error when the store has no `turns` table yet."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'turns'"
    ).fetchall()[0][0]
    if not exists:
        raise UserError("the store has no `turns` table: run `ahf turns --store DIR` (or `ahf ingest`) first")
    return con.execute("SELECT count(*) FROM turns").fetchall()[0][0]


def iter_turn_batches(con, batch_rows: int = 100_000) -> Iterator[pa.RecordBatch]:
    """All turns ordered by comment_id, as Arrow batches with TURN_COLUMNS."""
    require_turns(con)
    # A cursor of its own: the stream stays open while the caller works on the connection.
    reader = con.cursor().sql(_turns_sql()).to_arrow_reader(batch_rows)
    yield from reader


def read_turns(con) -> pa.Table:
    require_turns(con)
    return con.sql(_turns_sql()).to_arrow_table()


def fetch_turns(con, comment_ids: list[str]) -> dict[str, dict]:
    """Context, reply and subreddit for a few turns (query results), keyed by comment id."""
    if not comment_ids:
        return {}
    sql = _turns_sql("WHERE comment_id IN (SELECT unnest($ids))")
    rows = con.execute(sql, {"ids": list(comment_ids)}).fetchall()
    return {r[0]: dict(zip(TURN_COLUMNS, r)) for r in rows}
