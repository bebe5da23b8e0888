"""The data model: every table of a store, its columns and who writes it, in one place.

A store holds what Reddit said and what the stages derived from it (ConvoKit's corpus /
conversation / utterance, mapped onto tables):

| table | one row per | written by | schema |
|---|---|---|---|
| `posts` | Reddit post (t3), as Reddit names its fields | `ahf ingest`, `ahf crawl` | `POST_SCHEMA` |
| `comments` | Reddit comment (t1), as Reddit names its fields | `ahf ingest`, `ahf crawl` | `COMMENT_SCHEMA` |
| `turns` | comment that is a reply in a dialog (docs/turns.md) | `ahf turns` (and ingest) | `TURN_SCHEMA` |
| `acts` | turn: its dialog act and confidence | `ahf acts tag` | `ACT_SCHEMA` |
| `act_types` | act the tagger knew, found or not | `ahf acts tag` | `ACT_TYPE_SCHEMA` |
| `labels` | turn: vote tiers, reply sentiment, reward | `ahf label` | `LABEL_SCHEMA` |
| `pairs` | preference pair between sibling turns | `ahf label` | `PAIR_SCHEMA` |
| `crawl_state`, `crawl_subreddits` | finished crawled thread; subreddit walked | `ahf crawl` | `CRAWL_STATE_SCHEMA`, ... |
| `meta` | key: schema version, the configs derived tables were built with | every writer | |

Posts and comments keep Reddit's identifiers (`id` bare, `parent_id` and `link_id` as fullnames
`t1_…`/`t3_…`) so that a row maps 1:1 to the record it came from. `retrieved_utc` is the newest of
the retrieval stamps a record carries (`retrieved_on`, `retrieved_utc`, `_meta.retrieved_2nd_on`);
it decides which copy of an id wins on re-ingest.

The dialog context of a turn is defined here once (`turn_rows_sql`) and read by every stage
(index, acts, export): the post title, the post's selftext, then every ancestor comment's body from
the top-level comment down to the parent, the non-empty ones joined by `CONTEXT_SEPARATOR`.
"""

from __future__ import annotations

import time

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

# docs/turns.md describes every column.
TURN_SCHEMA = pa.schema(
    [
        ("comment_id", pa.string()),
        ("post_id", pa.string()),
        ("parent_id", pa.string()),
        ("subreddit", pa.string()),
        ("author", pa.string()),
        ("is_op", pa.bool_()),
        ("reply", pa.string()),
        ("post_title", pa.string()),
        ("post_selftext", pa.string()),
        ("parent_body", pa.string()),
        ("ancestor_ids", pa.list_(pa.string())),
        ("depth", pa.int32()),
        ("score", pa.int64()),
        ("created_utc", pa.int64()),
        ("delay_post_s", pa.int64()),
        ("delay_parent_s", pa.int64()),
        ("sibling_rank", pa.int32()),
        ("n_siblings", pa.int32()),
        ("n_children", pa.int32()),
        ("child_ids", pa.list_(pa.string())),
        ("post_score", pa.int64()),
        ("post_created_utc", pa.int64()),
        ("over_18", pa.bool_()),
    ]
)

# docs/index.md: the tagger's best act per turn (`other` below min_confidence) and its confidence.
ACT_SCHEMA = pa.schema([("comment_id", pa.string()), ("act", pa.string()), ("confidence", pa.float64())])
ACT_TYPE_SCHEMA = pa.schema([("act", pa.string())])

# docs/feedback.md describes both.
LABEL_SCHEMA = pa.schema(
    [
        ("comment_id", pa.string()),
        ("post_id", pa.string()),
        ("subreddit", pa.string()),
        ("group_size", pa.int32()),
        ("z_rank", pa.float64()),
        ("z_time", pa.float64()),
        ("adjusted", pa.float64()),
        ("tier", pa.string()),
        ("reply_count", pa.int32()),
        ("reply_sentiment_mean", pa.float64()),
        ("reply_sentiment_weighted", pa.float64()),
        ("reply_positive_share", pa.float64()),
        ("reward", pa.float64()),
        ("sentiment_tier", pa.string()),
    ]
)

PAIR_SCHEMA = pa.schema(
    [
        ("post_id", pa.string()),
        ("parent_id", pa.string()),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("rule", pa.string()),
        ("margin", pa.float64()),
        ("chosen_score", pa.int64()),
        ("rejected_score", pa.int64()),
        ("chosen_created_utc", pa.int64()),
        ("rejected_created_utc", pa.int64()),
    ]
)

# `ahf crawl`'s resumption (mining.crawl.CrawlState): threads finished, and each subreddit's newest listed post.
CRAWL_STATE_SCHEMA = pa.schema([("submission_id", pa.string()), ("subreddit", pa.string()),
                                ("created_utc", pa.int64()), ("comments", pa.int64()), ("finished_utc", pa.int64())])
CRAWL_SUBREDDITS_SCHEMA = pa.schema([("subreddit", pa.string()), ("newest_created_utc", pa.int64()),
                                     ("last_walk_utc", pa.int64())])

SCHEMAS = {"posts": POST_SCHEMA, "comments": COMMENT_SCHEMA, "turns": TURN_SCHEMA, "acts": ACT_SCHEMA,
           "act_types": ACT_TYPE_SCHEMA, "labels": LABEL_SCHEMA, "pairs": PAIR_SCHEMA,
           "crawl_state": CRAWL_STATE_SCHEMA, "crawl_subreddits": CRAWL_SUBREDDITS_SCHEMA}

# The valid range of every integer a record brings (docs/store.md). Outside it the record is skipped
# and counted as `bad_value:<field>`, so that no stored value can overflow a later stage's arithmetic.
FIRST_UTC = 1_117_584_000  # 2005-06-01 00:00 UTC: Reddit opened on 2005-06-23
CLOCK_SLACK_S = 86_400  # a stamp may lie this far past the ingesting machine's clock
SCORE_RANGE = (-(2**31), 2**31 - 1)  # int32: real scores stay within about +-10^6
COUNT_RANGE = (0, 2**31 - 1)


def int_ranges(now: float | None = None) -> dict[str, tuple[int, int]]:
    """{field: (lowest, highest)} for the integer fields of a record, timestamps bounded by `now`."""
    stamps = (FIRST_UTC, int(time.time() if now is None else now) + CLOCK_SLACK_S)
    return {"created_utc": stamps, "retrieved_on": stamps, "retrieved_utc": stamps, "retrieved_2nd_on": stamps,
            "score": SCORE_RANGE, "num_comments": COUNT_RANGE}


# Columns a newer retrieval may change; everything else is fixed at creation.
MUTABLE_COMMENT_COLUMNS = ("author", "body", "score", "distinguished", "stickied", "retrieved_utc")
MUTABLE_POST_COLUMNS = ("title", "selftext", "author", "score", "over_18", "num_comments",
                        "link_flair_text", "retrieved_utc")

# The thread a row belongs to, as one string per table: partitions of threads (`hash(key) % parts`,
# Store.partitioned) keep a post, its comments and everything derived from them together, so a
# thread's tree, siblings, replies and contexts are whole in one partition.
THREAD_KEYS = {"comments": "link_id", "posts": "'t3_' || id", "turns": "'t3_' || post_id",
               "labels": "'t3_' || post_id", "pairs": "'t3_' || post_id"}

# Between the parts of a turn's context, and after it where a prompt ends (exports, trainers).
CONTEXT_SEPARATOR = "\n\n"


def turn_rows_sql(where: str = "", columns: str = "t.*") -> str:
    """SELECT `columns` of the turns with two derived texts, the one definition every stage reads:

    - `context`: the dialog before the reply: post title, selftext, then the ancestor bodies, oldest
      first; NULL and empty parts left out; joined by CONTEXT_SEPARATOR ('' without any part).
    - `parent_text`: what the reply answers: the parent comment's body, or for a top-level reply
      the post title and selftext joined the same way ('' when the post is not in the store).

    `where` filters `turns` (alias-free, e.g. "WHERE comment_id IN (...)") before the contexts
    are assembled, so a lookup of a few turns never builds them all. Rows come in comment_id order.
    """
    sep = CONTEXT_SEPARATOR.replace("'", "''")
    return f"""
WITH picked AS (SELECT * FROM turns {where}),
ancestors AS (
  SELECT comment_id, unnest(ancestor_ids) AS ancestor_id, generate_subscripts(ancestor_ids, 1) AS position
  FROM picked
),
chain AS (
  SELECT a.comment_id, string_agg(nullif(c.body, ''), '{sep}' ORDER BY a.position) AS bodies
  FROM ancestors a JOIN comments c ON c.id = a.ancestor_id
  GROUP BY a.comment_id
)
SELECT {columns},
       concat_ws('{sep}', nullif(t.post_title, ''), nullif(t.post_selftext, ''), chain.bodies) AS context,
       coalesce(t.parent_body, concat_ws('{sep}', nullif(t.post_title, ''), nullif(t.post_selftext, ''))) AS parent_text
FROM picked t LEFT JOIN chain USING (comment_id)
ORDER BY t.comment_id
"""


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
    """The DuckDB column type of an Arrow type of these schemas."""
    if pa.types.is_list(arrow_type):
        return duckdb_type(arrow_type.value_type) + "[]"
    return {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.bool_(): "BOOLEAN",
            pa.float64(): "DOUBLE"}[arrow_type]


def create_table_sql(table: str, schema: pa.Schema, if_not_exists: bool = False) -> str:
    columns = ", ".join(f"{f.name} {duckdb_type(f.type)}" for f in schema)
    return f"CREATE TABLE {'IF NOT EXISTS ' if if_not_exists else ''}{table} ({columns})"
