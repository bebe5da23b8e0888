"""Turn raw Reddit records of any era into store rows, or into a counted skip with a reason.

Two paths give identical rows:
- `normalize_record` handles one decoded dict, whatever its era: `created_utc` as int, float or
  string, BigQuery exports where every value is a string, `_meta` stamps, missing fields.
- `normalize_block` parses a whole block of NDJSON with Arrow's multi-threaded JSON reader and
  converts it column-wise. It only accepts blocks where every record is clean; anything else
  (a bad line, a string where a number was expected, a missing id) makes it return None and the
  caller falls back to `normalize_record` line by line, which names the line and the reason.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from mining.schema import COMMENT_SCHEMA, POST_SCHEMA

COMMENT, POST = "comment", "post"
_RETRIEVAL_FIELDS = ("retrieved_on", "retrieved_utc")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # the store's BIGINT


class SkipRecord(Exception):
    """A record that cannot become a row; `reason` is the counter key (e.g. `bad_type:score`)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RowBuffer:
    """Rows of one batch, from either path: tuples from single records, Arrow tables from blocks."""

    def __init__(self) -> None:
        self._tuples: dict[str, list[tuple]] = {COMMENT: [], POST: []}
        self._tables: dict[str, list[pa.Table]] = {COMMENT: [], POST: []}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add_row(self, kind: str, row: tuple) -> None:
        self._tuples[kind].append(row)
        self._count += 1

    def add_tables(self, comments: pa.Table, posts: pa.Table) -> None:
        for kind, table in ((COMMENT, comments), (POST, posts)):
            if table.num_rows:
                self._flush_tuples(kind)
                self._tables[kind].append(table)
                self._count += table.num_rows

    def take(self) -> tuple[pa.Table, pa.Table]:
        """(comments, posts) in input order; empties the buffer."""
        out = []
        for kind, schema in ((COMMENT, COMMENT_SCHEMA), (POST, POST_SCHEMA)):
            self._flush_tuples(kind)
            tables = self._tables[kind]
            out.append(pa.concat_tables(tables) if tables else schema.empty_table())
            self._tables[kind] = []
        self._count = 0
        return out[0], out[1]

    def _flush_tuples(self, kind: str) -> None:
        # keep input order between the two paths: the last copy of an id in a batch wins
        rows = self._tuples[kind]
        if rows:
            schema = COMMENT_SCHEMA if kind == COMMENT else POST_SCHEMA
            self._tables[kind].append(_to_table(rows, schema))
            self._tuples[kind] = []


def _to_table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows))
    return pa.table([pa.array(c, type=f.type) for c, f in zip(columns, schema)], schema=schema)


# ---------------------------------------------------------------- one record at a time

def _int(record: dict, key: str, required: bool = False) -> int | None:
    value = record.get(key)
    if value is None or value == "":
        if required:
            raise SkipRecord(f"missing_field:{key}")
        return None
    if isinstance(value, bool):
        raise SkipRecord(f"bad_type:{key}")
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise SkipRecord(f"bad_value:{key}")
        return value
    try:
        number = float(value)  # float or numeric string ("1134365188", "1.5e9")
    except (TypeError, ValueError):
        raise SkipRecord(f"bad_type:{key}") from None
    if not math.isfinite(number):
        raise SkipRecord(f"bad_type:{key}")
    whole = math.floor(number)
    if not _INT64_MIN <= whole <= _INT64_MAX:
        raise SkipRecord(f"bad_value:{key}")
    return whole


def _str(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise SkipRecord(f"bad_type:{key}")


def _bool(record: dict, key: str) -> bool | None:
    value = record.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise SkipRecord(f"bad_type:{key}")


def _fullname(value: str | None, prefix: str, key: str) -> str:
    if not value:
        raise SkipRecord(f"missing_field:{key}")
    if value[:3] in ("t1_", "t3_"):
        return value
    if prefix == "t3_":  # a bare link id can only mean a post
        return prefix + value
    raise SkipRecord(f"bad_value:{key}")


def _retrieved(record: dict) -> int | None:
    stamps = [_int(record, k) for k in _RETRIEVAL_FIELDS]
    meta = record.get("_meta")
    if isinstance(meta, dict):
        stamps.append(_int(meta, "retrieved_2nd_on"))
    stamps = [s for s in stamps if s is not None]
    return max(stamps) if stamps else None


def record_kind(record: dict) -> str | None:
    if record.get("title") is not None:
        return POST
    if record.get("body") is not None or record.get("parent_id") is not None:
        return COMMENT
    return None


def _record_id(record: dict) -> str:
    rid = _str(record, "id")
    if not rid:
        name = _str(record, "name")
        if name and name[:3] in ("t1_", "t3_"):
            return name[3:]
        raise SkipRecord("missing_id")
    return rid


def normalize_record(record: Any, retrieved_default: int | None = None) -> tuple[str, tuple]:
    """Return (kind, row) for one decoded record or raise SkipRecord."""
    if not isinstance(record, dict):
        raise SkipRecord("not_an_object")
    kind = record_kind(record)
    if kind is None:
        raise SkipRecord("unknown_kind")
    rid = _record_id(record)
    created = _int(record, "created_utc", required=True)
    retrieved = _retrieved(record)
    if retrieved is None:
        retrieved = retrieved_default
    if kind == COMMENT:
        return COMMENT, (
            rid,
            _fullname(_str(record, "link_id"), "t3_", "link_id"),
            _fullname(_str(record, "parent_id"), "", "parent_id"),
            _str(record, "author"),
            _str(record, "body"),
            _int(record, "score"),
            created,
            _str(record, "subreddit"),
            _str(record, "distinguished"),
            _bool(record, "stickied"),
            retrieved,
        )
    return POST, (
        rid,
        _str(record, "title"),
        _str(record, "selftext"),
        _str(record, "author"),
        _int(record, "score"),
        created,
        _str(record, "subreddit"),
        _bool(record, "over_18"),
        _int(record, "num_comments"),
        _str(record, "link_flair_text"),
        _str(record, "url"),
        retrieved,
    )


# ---------------------------------------------------------------- a block of NDJSON at once

_PARSE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("title", pa.string()),
        ("selftext", pa.string()),
        ("body", pa.string()),
        ("link_id", pa.string()),
        ("parent_id", pa.string()),
        ("author", pa.string()),
        ("score", pa.int64()),
        ("created_utc", pa.float64()),
        ("subreddit", pa.string()),
        ("distinguished", pa.string()),
        ("stickied", pa.bool_()),
        ("over_18", pa.bool_()),
        ("num_comments", pa.int64()),
        ("link_flair_text", pa.string()),
        ("url", pa.string()),
        ("retrieved_on", pa.int64()),
        ("retrieved_utc", pa.int64()),
        ("_meta", pa.struct([("retrieved_2nd_on", pa.int64())])),
    ]
)
# a line whose first non-blank character does not open an object (`null`, a number, junk)
_LINE_NOT_AN_OBJECT = re.compile(rb"\n[ \t\r]*[^{ \t\r\n]")
_PARSE_OPTIONS = pajson.ParseOptions(explicit_schema=_PARSE_SCHEMA, unexpected_field_behavior="ignore")


def normalize_block(block: bytes, expected_lines: int) -> tuple[pa.Table, pa.Table] | None:
    """(comments, posts) for a block of complete NDJSON lines; None when it needs the slow path.

    Arrow's reader is strict about types (a string where a number is expected fails the block),
    so a block that parses and passes the checks below gives exactly `normalize_record`'s rows.
    The checks are whole-column reductions; the common case (a block of only comments or only
    posts) skips the filter that would copy every column.
    """
    if block.lstrip(b" \t\r")[:1] not in (b"{", b"\n") or _LINE_NOT_AN_OBJECT.search(block):
        return None  # Arrow crashes (segfault) on a `null` line at the start of a parse chunk
    try:
        table = pajson.read_json(
            pa.BufferReader(block),
            read_options=pajson.ReadOptions(use_threads=True, block_size=_parse_chunk_bytes(len(block))),
            parse_options=_PARSE_OPTIONS,
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    if table.num_rows != expected_lines:
        return None  # blank lines or a JSON value that is not one object per line
    ids = table["id"]
    created = table["created_utc"]
    if ids.null_count or created.null_count:
        return None
    if pc.min(pc.binary_length(ids)).as_py() == 0:  # "" is no id (the slow path looks for `name`)
        return None
    if not pc.all(pc.is_finite(created)).as_py():
        return None
    n_posts = table.num_rows - table["title"].null_count
    if n_posts == 0:
        comments, posts = table, None
    elif n_posts == table.num_rows:
        comments, posts = None, table
    else:
        is_post = pc.is_valid(table["title"])
        comments, posts = table.filter(pc.invert(is_post)), table.filter(is_post)
    if comments is not None and not _clean_comment_ids(comments):
        return None
    try:
        return _select(comments, COMMENT_SCHEMA), _select(posts, POST_SCHEMA)
    except pa.ArrowInvalid:  # a created_utc beyond BIGINT: the slow path names it
        return None


def _parse_chunk_bytes(size: int) -> int:
    # Arrow parses chunks of one block in parallel: two chunks keep both cores of a small machine
    # busy while the store writes the previous batch; chunks stay large so few records straddle.
    return max(1 << 20, size // 2 + 1)


def _clean_comment_ids(comments: pa.Table) -> bool:
    """Every comment has a `t3_` link_id and a `t1_`/`t3_` parent_id (what `_fullname` accepts as is).

    A non-null parent_id also makes every row a comment for `record_kind`, so no body check is needed.
    """
    link, parent = comments["link_id"], comments["parent_id"]
    if link.null_count or parent.null_count:
        return False
    if not pc.all(pc.starts_with(link, "t3_")).as_py():
        return False
    return pc.all(pc.or_(pc.starts_with(parent, "t1_"), pc.starts_with(parent, "t3_"))).as_py()


def _retrieved_column(table: pa.Table) -> pa.ChunkedArray:
    second = pc.struct_field(table["_meta"], "retrieved_2nd_on")
    return pc.max_element_wise(table["retrieved_on"], table["retrieved_utc"], second, skip_nulls=True)


def _select(table: pa.Table | None, schema: pa.Schema) -> pa.Table:
    if table is None or table.num_rows == 0:
        return schema.empty_table()
    columns = []
    for name in schema.names:
        if name == "created_utc":
            columns.append(pc.cast(pc.floor(table[name]), pa.int64()))
        elif name == "retrieved_utc":
            columns.append(_retrieved_column(table))
        else:
            columns.append(table[name])
    return pa.table(columns, schema=schema)
