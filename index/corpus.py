"""The turns as the indexes see them: read through the store's one turn definition.

One row per turn: `comment_id`, `subreddit`, `reply` (what we index and tag), `parent_text` (what it
answers), `title` (the post title, where prompt tags such as `[WP]` live) and `context` (the dialog
before the reply). `context` and `parent_text` are mining.schema.turn_rows_sql's, the definition
every stage reads; the index keeps the last `CONTEXT_TAIL_CHARS` characters of a context (the end
is what the reply answers), which bounds what Lucene stores for replies deep in long threads.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from mining.schema import turn_rows_sql
from mining.store import Store

CONTEXT_TAIL_CHARS = 4000
_COLUMNS = "t.comment_id, coalesce(t.subreddit, '') AS subreddit, t.reply, coalesce(t.post_title, '') AS title"
_HINT = "run `ahf turns --store DIR` (or `ahf ingest`) first"


def _sql(where: str = "") -> str:
    return (f"SELECT comment_id, subreddit, reply, title, parent_text, right(context, {CONTEXT_TAIL_CHARS}) "
            f"AS context FROM ({turn_rows_sql(where, _COLUMNS)}) ORDER BY comment_id")


def require_turns(store: Store) -> int:
    """The number of turns; a clear error when the store has no `turns` table yet."""
    return store.require("turns", _HINT)


def iter_turn_batches(store: Store, batch_rows: int = 100_000) -> Iterator[pa.RecordBatch]:
    """All turns ordered by comment_id, as Arrow batches of the columns above."""
    require_turns(store)
    yield from store.reader(_sql(), batch_rows=batch_rows)


def read_turns(store: Store) -> pa.Table:
    require_turns(store)
    return store.arrow(_sql())


def fetch_turns(store: Store, comment_ids: list[str]) -> dict[str, dict]:
    """The columns above for a few turns (query results), keyed by comment id."""
    if not comment_ids:
        return {}
    rows = store.arrow(_sql("WHERE comment_id IN (SELECT unnest($ids))"), {"ids": list(comment_ids)})
    return {row["comment_id"]: row for row in rows.to_pylist()}
