"""Turn raw Reddit records of any era into store rows, or into a counted skip with a reason.

Two paths give identical rows:
- `normalize_record` handles one decoded dict, whatever its era: `created_utc` as int, float or
  string, BigQuery exports where every value is a string, `_meta` stamps, missing fields.
- `BlockParser` reads a whole block of NDJSON with DuckDB's JSON reader (fed through a pipe, so
  nothing is written to disk) and converts it column-wise in SQL. Every field is read as text and
  checked against what `normalize_record` would make of it: a line with a value that a cast
  could change (`1.5` as a score, `true` as an author, an object as a body, a bare parent id) is
  handed back by line number and redone by `normalize_record`, which names the line and the
  reason of a skip. A block DuckDB cannot read as one JSON object per line (bad JSON, a duplicate
  key, a blank line, a record over 16 MiB) comes back whole, to be redone line by line.
"""

from __future__ import annotations

import math
import os
import queue
import select
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mining.schema import COMMENT_SCHEMA, POST_SCHEMA, empty_table, int_ranges

COMMENT, POST = "comment", "post"
_RETRIEVAL_FIELDS = ("retrieved_on", "retrieved_utc")


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

    def take(self, limit: int | None = None) -> tuple[pa.Table, pa.Table]:
        """(comments, posts) in input order; empties the buffer.

        With `limit`, a buffer holding one kind only gives its first `limit` rows and keeps the
        rest (zero-copy slices), so that the store receives whole row groups.
        """
        out = []
        for kind, schema in ((COMMENT, COMMENT_SCHEMA), (POST, POST_SCHEMA)):
            self._flush_tuples(kind)
            tables = self._tables[kind]
            out.append(pa.concat_tables(tables) if tables else empty_table(schema))
            self._tables[kind] = []
        self._count = 0
        comments, posts = out
        if limit is not None and min(comments.num_rows, posts.num_rows) == 0:
            kind, table = (COMMENT, comments) if comments.num_rows else (POST, posts)
            if table.num_rows > limit:
                rest = table.slice(limit)
                self._tables[kind].append(rest)
                self._count = rest.num_rows
                table = table.slice(0, limit)
                comments, posts = (table, posts) if kind == COMMENT else (comments, table)
        return comments, posts

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

def _int(record: dict, key: str, ranges: dict[str, tuple[int, int]], required: bool = False) -> int | None:
    """An integer field: an int, a float or a numeric string, floored; outside `ranges[key]` a skip."""
    value = record.get(key)
    if value is None or value == "":
        if required:
            raise SkipRecord(f"missing_field:{key}")
        return None
    if isinstance(value, bool):
        raise SkipRecord(f"bad_type:{key}")
    if isinstance(value, int):
        whole = value
    else:
        try:
            number = float(value)  # float or numeric string ("1134365188", "1.5e9")
        except (TypeError, ValueError):
            raise SkipRecord(f"bad_type:{key}") from None
        if not math.isfinite(number):
            raise SkipRecord(f"bad_type:{key}")
        whole = math.floor(number)
    lowest, highest = ranges[key]
    if not lowest <= whole <= highest:
        raise SkipRecord(f"bad_value:{key}")
    return whole


def _str(record: dict, key: str) -> str | None:
    value = record.get(key)
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (documents read by the standard library)
                raise SkipRecord(f"bad_value:{key}") from None
        return value
    if value is None:
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


def _retrieved(record: dict, ranges: dict[str, tuple[int, int]]) -> int | None:
    stamps = [_int(record, k, ranges) for k in _RETRIEVAL_FIELDS]
    meta = record.get("_meta")
    if isinstance(meta, dict):
        stamps.append(_int(meta, "retrieved_2nd_on", ranges))
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
    ranges = int_ranges()
    rid = _record_id(record)
    created = _int(record, "created_utc", ranges, required=True)
    retrieved = _retrieved(record, ranges)
    if retrieved is None:
        retrieved = retrieved_default
    if kind == COMMENT:
        return COMMENT, (
            rid,
            _fullname(_str(record, "link_id"), "t3_", "link_id"),
            _fullname(_str(record, "parent_id"), "", "parent_id"),
            _str(record, "author"),
            _str(record, "body"),
            _int(record, "score", ranges),
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
        _int(record, "score", ranges),
        created,
        _str(record, "subreddit"),
        _bool(record, "over_18"),
        _int(record, "num_comments", ranges),
        _str(record, "link_flair_text"),
        _str(record, "url"),
        retrieved,
    )


# ---------------------------------------------------------------- a block of NDJSON at once

def _unless_null(col: str, check: str) -> str:
    # CASE, not `col IS NULL OR check`: a CASE branch runs only on the rows that reach it
    return f"CASE WHEN {col} IS NULL THEN true ELSE {check} END"


# A text field may take a JSON string as it is, or an integer of up to 18 digits: `normalize_record`
# writes str(int) and DuckDB's text of an integer is the same digits (orjson reads a longer one as a
# float). Any other non-string value (true, 1.5, {...}, [...], NaN) arrives as its JSON text, which
# is valid JSON and not such an integer: that line goes to the record path, and so does a string
# that merely looks like one ("true", "[1]"), with the same result. The text of a non-string never
# starts with `"`.
def _text_ok(col: str) -> str:
    return (f"CASE WHEN {col} IS NULL OR ascii({col}) = 34 THEN true "
            f"WHEN json_valid({col}) THEN regexp_full_match({col}, '-?[0-9]{{1,18}}') ELSE true END")


# An integer field takes up to 15 digits, as a JSON number or a string: `normalize_record` gives the
# same int for both (below 2**53 a string's float is exact), and inside the field's valid range.
# Anything else ("", 1.5, "1e3", out of range) goes to the record path, which floors, rejects or counts it.
def _int_ok(col: str, ranges: dict[str, tuple[int, int]]) -> str:
    lowest, highest = ranges[col.rsplit(".", 1)[-1]]
    return _unless_null(col, f"regexp_full_match({col}, '-?[0-9]{{1,15}}') "
                             f"AND TRY_CAST({col} AS BIGINT) BETWEEN {lowest} AND {highest}")


def _sql_int(col: str) -> str:
    return f"TRY_CAST({col} AS BIGINT)"


# true / false as JSON, or as a string in any case ("True"): what `normalize_record` accepts. The
# integers 0 and 1 it also accepts are left to it: as text they look like the strings "0" and "1".
def _flag_ok(col: str) -> str:
    return _unless_null(col, f"lower({col}) IN ('true', 'false')")


def _sql_flag(col: str) -> str:
    return f"lower({col}) = 'true'"


# created_utc is required: an integer, or a decimal that both sides floor from the same double.
_CREATED = ("CASE WHEN contains(created_utc, '.') THEN TRY_CAST(floor(TRY_CAST(created_utc AS DOUBLE)) AS BIGINT) "
            "ELSE TRY_CAST(created_utc AS BIGINT) END")
_STAMPS = ("retrieved_on", "retrieved_utc", "_meta.retrieved_2nd_on")
_RETRIEVED = f"greatest({', '.join(_sql_int(c) for c in _STAMPS)})"  # NULLs are skipped, as in _retrieved
_ID_OK = f"id <> '' AND {_text_ok('id')}"  # an empty id makes the record path look for `name`
_LINK_OK = ("CASE WHEN prefix(link_id, 't1_') OR prefix(link_id, 't3_') THEN true "
            f"ELSE link_id <> '' AND {_text_ok('link_id')} END")  # a bare link id means a post
_LINK = "CASE WHEN prefix(link_id, 't1_') OR prefix(link_id, 't3_') THEN link_id ELSE 't3_' || link_id END"
_PARENT_OK = "(prefix(parent_id, 't1_') OR prefix(parent_id, 't3_'))"  # a bare parent id is ambiguous
_KEYS = ("id", "title", "selftext", "body", "link_id", "parent_id", "author", "score", "created_utc",
         "subreddit", "distinguished", "stickied", "over_18", "num_comments", "link_flair_text", "url",
         "retrieved_on", "retrieved_utc")
_COLUMNS = "{" + ", ".join(f"'{k}': 'VARCHAR'" for k in _KEYS) + ", '_meta': 'STRUCT(retrieved_2nd_on VARCHAR)'}"


def _select_sql(path: str, ranges: dict[str, tuple[int, int]]) -> str:
    """The block statement: the store columns of both kinds, then the record kind as `record_kind`
    decides it, and whether the fast path may keep the row (every check `normalize_record` makes)."""
    lowest, highest = ranges["created_utc"]
    created_ok = (f"regexp_full_match(created_utc, '-?[0-9]{{1,15}}(\\.[0-9]+)?') "
                  f"AND {_CREATED} BETWEEN {lowest} AND {highest}")
    stamps_ok = " AND ".join(_int_ok(c, ranges) for c in _STAMPS)
    comment_ok = " AND ".join([
        _ID_OK, _LINK_OK, _PARENT_OK, created_ok, stamps_ok, _int_ok("score", ranges), _flag_ok("stickied"),
        *(_text_ok(c) for c in ("author", "body", "subreddit", "distinguished")),
    ])
    post_ok = " AND ".join([
        _ID_OK, created_ok, stamps_ok, _int_ok("score", ranges), _int_ok("num_comments", ranges),
        _flag_ok("over_18"),
        *(_text_ok(c) for c in ("title", "selftext", "author", "subreddit", "link_flair_text", "url")),
    ])
    return f"""
SELECT id, title, selftext, body, {_LINK} AS link_id, parent_id, author, {_sql_int('score')} AS score,
       {_CREATED} AS created_utc, subreddit, distinguished, {_sql_flag('stickied')} AS stickied,
       {_sql_flag('over_18')} AS over_18, {_sql_int('num_comments')} AS num_comments, link_flair_text, url,
       {_RETRIEVED} AS retrieved_utc, title IS NOT NULL AS is_post,
       coalesce(CASE WHEN title IS NOT NULL THEN {post_ok}
                     WHEN body IS NOT NULL OR parent_id IS NOT NULL THEN {comment_ok}
                     ELSE false END, false) AS ok
FROM read_json('{path.replace("'", "''")}', format = 'newline_delimited', compression = 'none', columns = {_COLUMNS})
"""


_F_SETPIPE_SZ = 1031  # Linux: a 1 MiB pipe buffer means fewer switches between the two ends


@dataclass
class ParsedBlock:
    """The rows DuckDB took from a block, and the lines (0-based in the block) it left to the record path."""

    comments: pa.Table
    posts: pa.Table
    slow: np.ndarray  # sorted line indices
    _parts: Sequence[bytes | memoryview]
    _ok_comment: np.ndarray | None = None
    _ok_post: np.ndarray | None = None
    _data: bytes = b""
    _line_ends: np.ndarray | None = None

    def pieces(self) -> Iterator[tuple[pa.Table, pa.Table] | int]:
        """In line order: (comments, posts) slices of fast rows, and the index of each slow line between them."""
        if not len(self.slow):
            yield self.comments, self.posts
            return
        comments_upto = np.cumsum(self._ok_comment)  # fast rows of each kind up to each line
        posts_upto = np.cumsum(self._ok_post)
        c_start = p_start = 0
        for line in self.slow:
            c_end, p_end = int(comments_upto[line]), int(posts_upto[line])
            yield self.comments.slice(c_start, c_end - c_start), self.posts.slice(p_start, p_end - p_start)
            yield int(line)
            c_start, p_start = c_end, p_end
        yield self.comments.slice(c_start), self.posts.slice(p_start)

    def line(self, index: int) -> bytes:
        """The raw bytes of line `index` (0-based in the block), without its newline."""
        if self._line_ends is None:  # joined once, and only for a block with slow lines
            self._data = b"".join(self._parts)
            self._line_ends = np.flatnonzero(np.frombuffer(self._data, np.uint8) == 10)
        start = int(self._line_ends[index - 1]) + 1 if index else 0
        return self._data[start:int(self._line_ends[index])]


class BlockParser:
    """Parses NDJSON blocks with DuckDB's JSON reader: an in-memory connection reading a private FIFO.

    Use as a context manager (it owns a temporary directory with the FIFO, under `tmp_root`: the
    ingest puts it inside the store, which a later ingest cleans after a kill -9) from one thread.
    Where the OS has no named pipes (Windows) each block is written to a file there instead: one
    block (≈ 16 MiB) on disk at a time, never the decompressed dump.
    """

    def __init__(self, tmp_root: str | os.PathLike | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="ahf-blocks-", dir=tmp_root)
        self._fifo = os.path.join(self._dir, "block.ndjson")
        self.uses_pipe = hasattr(os, "mkfifo")
        if self.uses_pipe:
            os.mkfifo(self._fifo, 0o600)
        else:
            open(self._fifo, "wb").close()  # the statement below is bound to an existing file
        self._con = duckdb.connect()
        # one thread: the ingest runs the decompressor and the store writer beside it
        self._con.execute("SET threads = 1")
        self._con.execute("SET enable_progress_bar = false")
        self._con.execute("SET enable_external_file_cache = false")
        # prepared once: planning this statement costs more than reading a small block; the stamps'
        # upper bound is this parser's clock, as the record path's is its own
        self._con.execute("PREPARE parse_block AS " + _select_sql(self._fifo, int_ranges()))

    def __enter__(self) -> BlockParser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._con.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def parse(self, block: bytes | Sequence[bytes | memoryview], n_lines: int) -> ParsedBlock | None:
        """The block's rows, or None when DuckDB cannot read it as `n_lines` JSON objects.

        `block` is bytes, or parts whose concatenation is the block (`LineBlock.parts`).
        """
        parts = [block] if isinstance(block, (bytes, bytearray, memoryview)) else block
        writer = None
        if self.uses_pipe:  # fed by a thread while DuckDB reads: no copy on disk
            writer = threading.Thread(target=self._feed, args=(parts,), name="block-feed", daemon=True)
            writer.start()
        else:
            with open(self._fifo, "wb") as file:
                for part in parts:
                    file.write(part)
        try:
            table = self._con.sql("EXECUTE parse_block").to_arrow_table()
        except duckdb.Error:
            return None  # bad JSON, a duplicate key, a line that is not an object, a huge record
        finally:
            if writer is not None:
                self._drain(writer)
        if table.num_rows != n_lines:
            return None  # blank lines: DuckDB skips them, so rows no longer match lines
        return _split(table, parts)

    def _feed(self, parts: Sequence[bytes | memoryview]) -> None:
        try:
            import fcntl  # POSIX, like the pipe itself

            with open(self._fifo, "wb", buffering=0) as pipe:
                try:
                    fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, 1 << 20)
                except OSError:
                    pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default buffer works too
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[pipe.write(view):]
        except BrokenPipeError:  # Python ignores SIGPIPE: a write to a closed pipe raises instead
            pass  # DuckDB stopped reading: it failed on this block, and parse() says so

    def _drain(self, writer: threading.Thread) -> None:
        """Let the feeding thread finish when DuckDB did not read the block to its end."""
        writer.join(0.0)
        if not writer.is_alive():
            return
        fd = os.open(self._fifo, os.O_RDONLY | os.O_NONBLOCK)  # also frees a writer waiting in open()
        try:
            while writer.is_alive():
                select.select([fd], [], [], 0.05)
                try:
                    os.read(fd, 1 << 20)
                except BlockingIOError:
                    pass
        finally:
            os.close(fd)
        writer.join()


class ParserPool:
    """`size` BlockParsers that parse blocks in worker threads, so that blocks are parsed in parallel
    (DuckDB holds no GIL while it reads). `submit` returns a future of `BlockParser.parse`'s result;
    the caller consumes the futures in submission order. Use as a context manager."""

    def __init__(self, size: int = 1, tmp_root: str | os.PathLike | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.size = max(1, size)
        self._parsers = [BlockParser(tmp_root) for _ in range(self.size)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for parser in self._parsers:
            self._free.put(parser)
        self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="block-parse")

    def __enter__(self) -> ParserPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for parser in self._parsers:
            parser.close()

    def _parse(self, parts: Sequence[bytes | memoryview], n_lines: int) -> ParsedBlock | None:
        parser = self._free.get()
        try:
            return parser.parse(parts, n_lines)
        finally:
            self._free.put(parser)

    def submit(self, parts: Sequence[bytes | memoryview], n_lines: int):
        return self._executor.submit(self._parse, parts, n_lines)


def _split(table: pa.Table, block: Sequence[bytes | memoryview]) -> ParsedBlock:
    ok, is_post = table["ok"], table["is_post"]
    n_posts = pc.sum(is_post).as_py() or 0
    if pc.all(ok).as_py() and n_posts in (0, table.num_rows):  # the usual block: one kind, all clean
        comments, posts = (None, table) if n_posts else (table, None)
        return ParsedBlock(_select(comments, COMMENT_SCHEMA), _select(posts, POST_SCHEMA),
                           np.empty(0, np.int64), block)
    ok_comment, ok_post = pc.and_(ok, pc.invert(is_post)), pc.and_(ok, is_post)
    return ParsedBlock(
        _select(table.filter(ok_comment), COMMENT_SCHEMA), _select(table.filter(ok_post), POST_SCHEMA),
        np.flatnonzero(~ok.to_numpy(zero_copy_only=False)), block,
        ok_comment.to_numpy(zero_copy_only=False), ok_post.to_numpy(zero_copy_only=False))


def _select(table: pa.Table | None, schema: pa.Schema) -> pa.Table:
    if table is None or table.num_rows == 0:
        return empty_table(schema)
    return pa.table([table[name] for name in schema.names], schema=schema)


def normalize_block(block: bytes, expected_lines: int) -> tuple[pa.Table, pa.Table] | None:
    """(comments, posts) when the fast path takes every line of the block, else None (tests, benchmarks)."""
    with BlockParser() as parser:
        parsed = parser.parse(block, expected_lines)
    if parsed is None or len(parsed.slow):
        return None
    return parsed.comments, parsed.posts
