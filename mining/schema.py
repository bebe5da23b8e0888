"""The store's row schema: one row per Reddit id, columns named as Reddit names them.

Posts and comments keep Reddit's own identifiers (`id` bare, `parent_id` and `link_id` as
fullnames `t1_…`/`t3_…`) so that a row maps 1:1 to the record it came from (as in ConvoKit).
`retrieved_utc` is the newest of the retrieval stamps a record carries (`retrieved_on`,
`retrieved_utc`, `_meta.retrieved_2nd_on`); it decides which copy of an id wins on re-ingest.
"""

from __future__ import annotations

import pyarrow as pa

COMMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("link_id", pa.string()),
        ("parent_id", pa.string()),
        ("author", pa.string()),
        ("body", pa.string()),
        ("score", pa.int64()),
        ("created_utc", pa.int64()),
        ("subreddit", pa.string()),
        ("distinguished", pa.string()),
        ("stickied", pa.bool_()),
        ("retrieved_utc", pa.int64()),
    ]
)

POST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("title", pa.string()),
        ("selftext", pa.string()),
        ("author", pa.string()),
        ("score", pa.int64()),
        ("created_utc", pa.int64()),
        ("subreddit", pa.string()),
        ("over_18", pa.bool_()),
        ("num_comments", pa.int64()),
        ("link_flair_text", pa.string()),
        ("url", pa.string()),
        ("retrieved_utc", pa.int64()),
    ]
)

DELETED_BODIES = ("[deleted]", "[removed]")

# Columns a newer retrieval may change; everything else is fixed at creation.
MUTABLE_COMMENT_COLUMNS = ("author", "body", "score", "distinguished", "stickied", "retrieved_utc")
MUTABLE_POST_COLUMNS = ("title", "selftext", "author", "score", "over_18", "num_comments",
                        "link_flair_text", "retrieved_utc")


def base36(n: int) -> str:
    """Reddit's id alphabet: 0 -> '0', 35 -> 'z', 36 -> '10' (for generated ids)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def empty_table(schema: pa.Schema) -> pa.Table:
    # not schema.empty_table() nor pa.array([]): both import pandas (~0.5 s) on their first call
    return pa.Table.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)


def duckdb_type(arrow_type: pa.DataType) -> str:
    return {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.bool_(): "BOOLEAN"}[arrow_type]
