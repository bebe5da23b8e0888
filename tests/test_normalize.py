"""The fast block path (`BlockParser`, DuckDB) against the per-record path (`normalize_record`).

On every record of the real files the two give the same rows in the same order. A line with a
value a cast could change comes back by line number and is redone by the record path; a block
DuckDB cannot read as one object per line (bad JSON, a duplicate key, a blank line) comes back
whole and is redone line by line; either way every skip is counted with its reason and line.
Also: the readers behind them (block cutting and line numbers, truncated and concatenated zstd,
gzip / bz2 / xz).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from collections import Counter
from pathlib import Path

import orjson
import pytest
import zstandard

from mining.ingest import ingest
from mining.normalize import COMMENT, POST, BlockParser, SkipRecord, normalize_block, normalize_record
from mining.readers import LineBlock, read_items, split_lines
from mining.schema import FIRST_UTC
from mining.store import Store

RC_2005 = "pushshift/RC_2005-12.zst"
RS_ASKWOMEN = "pushshift/RS_2019-10_AskWomen.zst"
DRIFT = ("pushshift/schema-drift/comments.ndjson", "pushshift/schema-drift/submissions.ndjson")

COMMENT_BASE = {"id": "c1", "link_id": "t3_p1", "parent_id": "t3_p1", "author": "a", "body": "hello",
                "score": 3, "created_utc": 1134365188, "subreddit": "s", "retrieved_on": 1473738411}


def _lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if path.suffix == ".zst":
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(data, read_across_frames=True)
        data = reader.read()
    return [line for line in data.split(b"\n") if line.strip()]


def _reference(lines: list[bytes]) -> dict[str, list[tuple]]:
    """The per-record path alone: rows by kind, in input order (every record here is valid)."""
    rows: dict[str, list[tuple]] = {COMMENT: [], POST: []}
    for line in lines:
        kind, row = normalize_record(orjson.loads(line))
        rows[kind].append(row)
    return rows


def _fast(lines: list[bytes]) -> dict[str, list[tuple]] | None:
    result = normalize_block(b"".join(line + b"\n" for line in lines), len(lines))
    if result is None:
        return None
    comments, posts = result
    return {COMMENT: [tuple(r.values()) for r in comments.to_pylist()],
            POST: [tuple(r.values()) for r in posts.to_pylist()]}


def _store_rows(store_dir: Path, table: str) -> list[tuple]:
    with Store(store_dir, read_only=True) as store:
        return store.con.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def _write_ndjson(path: Path, records: list) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


# ---------------------------------------------------------------- parity on the real files

@pytest.mark.parametrize("name,comments,posts", [(RC_2005, 1075, 0), (RS_ASKWOMEN, 0, 8271)])
def test_fast_path_equals_record_path_on_real_dumps(shared_data, name, comments, posts):
    lines = _lines(shared_data / name)
    reference = _reference(lines)
    assert (len(reference[COMMENT]), len(reference[POST])) == (comments, posts)
    fast = _fast(lines)
    assert fast is not None, "a real dump must take the fast path"
    assert fast == reference  # same rows, same order


@pytest.mark.parametrize("name", [RC_2005, RS_ASKWOMEN])
def test_blocks_as_the_reader_cuts_them_give_the_same_rows(shared_data, name):
    """Small blocks: the reader's cuts, line numbers and per-block parsing together keep every row."""
    lines = _lines(shared_data / name)
    got: dict[str, list[tuple]] = {COMMENT: [], POST: []}
    blocks = list(read_items(shared_data / name, block_bytes=32 << 10))
    assert len(blocks) > 5
    next_line = 1
    for block in blocks:
        assert isinstance(block, LineBlock) and block.first_line == next_line
        next_line += block.n_lines
        comments, posts = normalize_block(block.data, block.n_lines)
        got[COMMENT] += [tuple(r.values()) for r in comments.to_pylist()]
        got[POST] += [tuple(r.values()) for r in posts.to_pylist()]
    assert next_line - 1 == len(lines)
    assert got == _reference(lines)


def test_without_named_pipes_each_block_goes_through_a_file(shared_data, tmp_path, monkeypatch):
    """Where os.mkfifo is missing (Windows) the parser writes each block to a file: same rows, same
    fallbacks, and a whole ingest gives the same store."""
    lines = _lines(shared_data / RC_2005)
    monkeypatch.delattr(os, "mkfifo")
    got: dict[str, list[tuple]] = {COMMENT: [], POST: []}
    with BlockParser() as parser:  # one parser, one file, many blocks: each read afresh
        assert not parser.uses_pipe
        for block in read_items(shared_data / RC_2005, block_bytes=32 << 10):
            parsed = parser.parse(block.data, block.n_lines)
            got[COMMENT] += [tuple(r.values()) for r in parsed.comments.to_pylist()]
    assert got == _reference(lines)
    assert normalize_block(b"{not json\n" + lines[0] + b"\n", 2) is None  # a bad block is refused, not lost
    report = ingest([shared_data / RC_2005], tmp_path / "store")
    assert report.ok and report.ingested == 1075
    monkeypatch.undo()
    assert ingest([shared_data / RC_2005], tmp_path / "piped").ok
    assert _store_rows(tmp_path / "store", "comments") == _store_rows(tmp_path / "piped", "comments")


@pytest.mark.parametrize("name", DRIFT)
def test_schema_drift_lines_all_take_the_fast_path_with_the_same_rows(shared_data, name):
    """2005-2024 records (created_utc as int, float or string; `_meta` stamps): every line is fast and equal."""
    lines = _lines(shared_data / name)
    assert any(isinstance(orjson.loads(line)["created_utc"], str) for line in lines)
    assert any(isinstance(orjson.loads(line)["created_utc"], float) for line in lines)
    for line in lines:
        assert _fast([line]) == _reference([line]), line[:200]
    assert _fast(lines) == _reference(lines)  # and as one block mixing the eras


def test_mixed_block_keeps_order_within_each_kind(shared_data):
    comments = [line for line in _lines(shared_data / DRIFT[0]) if _fast([line]) is not None]
    posts = [line for line in _lines(shared_data / DRIFT[1]) if _fast([line]) is not None]
    interleaved = [line for pair in zip(comments, posts) for line in pair]
    assert _fast(interleaved) == _reference(interleaved)


def test_ingest_of_drift_files_equals_the_record_path(shared_data, tmp_path):
    """End to end (fast blocks, fallback, batches, store) against rows built one record at a time."""
    paths = [shared_data / name for name in DRIFT] + [shared_data / RC_2005]
    report = ingest(paths, tmp_path / "store")
    assert report.ok and report.skipped == {}
    reference = _reference([line for path in paths for line in _lines(path)])
    assert len(reference[COMMENT]) == 27 + 1075 and len(reference[POST]) == 31
    # five 2005 comments are in both files with the same retrieval stamp: the later write wins
    # (this also takes the store's upsert path: the plain insert of the last file conflicts)
    last_copy = {row[0]: row for row in reference[COMMENT]}
    assert len(last_copy) == 27 + 1075 - 5
    assert _store_rows(tmp_path / "store", "comments") == sorted(last_copy.values())
    assert _store_rows(tmp_path / "store", "posts") == sorted(reference[POST])


# ---------------------------------------------------------------- drift, one case at a time

@pytest.mark.parametrize("created", [1134365188, 1134365188.0, 1134365188.9, "1134365188", "1134365188.7"])
def test_created_utc_as_int_float_or_string(created, tmp_path):
    record = {**COMMENT_BASE, "created_utc": created}
    kind, row = normalize_record(record)
    assert kind == COMMENT and row[6] == 1134365188
    assert _fast([orjson.dumps(record)]) == {COMMENT: [row], POST: []}  # a string or a float too
    ingest([_write_ndjson(tmp_path / "c.ndjson", [record])], tmp_path / "store")
    assert _store_rows(tmp_path / "store", "comments")[0][6] == 1134365188


def test_bigquery_all_string_values(shared_data, tmp_path):
    """The real BigQuery export (every value a string): same rows as a JSON array and as NDJSON."""
    records = orjson.loads((shared_data / "bigquery/r_MachineLearning_82ymmx.json").read_bytes())
    assert all(isinstance(v, str) for r in records for v in r.values() if v is not None)
    rows = [normalize_record(r)[1] for r in records]
    assert _fast([orjson.dumps(r) for r in records]) == {COMMENT: rows, POST: []}  # numbers as strings too
    by_id = {row[0]: row for row in rows}
    assert by_id["dveh7r5"][5:7] == (1, 1520550110) and by_id["dveh7r5"][10] == 1524963292
    as_lines = _write_ndjson(tmp_path / "bq.ndjson", records)
    for source, store in ((shared_data / "bigquery/r_MachineLearning_82ymmx.json", "a"), (as_lines, "b")):
        report = ingest([source], tmp_path / store)
        assert (report.ingested, report.skipped) == (13, {})
        assert _store_rows(tmp_path / store, "comments") == sorted(rows)
    # booleans as strings too
    kind, row = normalize_record({k: str(v) for k, v in {**COMMENT_BASE, "stickied": True}.items()})
    assert row[9] is True and row[5] == 3


def test_meta_retrieved_2nd_on_is_the_newest_stamp(shared_data):
    lines = [line for line in _lines(shared_data / DRIFT[0]) if b'"_meta"' in line]
    assert lines, "the 2024 records carry _meta"
    for line in lines:
        record = orjson.loads(line)
        kind, row = normalize_record(record)
        second = record["_meta"]["retrieved_2nd_on"]
        assert row[10] == max(second, record.get("retrieved_on") or 0) == second
        assert _fast([line]) in (None, {COMMENT: [row], POST: []})
    t = 1_473_738_411
    for meta, expected in (({"retrieved_2nd_on": t + 300}, t + 300), ({"retrieved_2nd_on": t - 50}, t), (None, t),
                           ({}, t)):
        record = {**COMMENT_BASE, "retrieved_on": t, "_meta": meta}
        kind, row = normalize_record(record)
        assert row[10] == expected
        assert _fast([orjson.dumps(record)]) == {COMMENT: [row], POST: []}


def test_skips_are_counted_with_reason_field_and_line(tmp_path):
    good = dict(COMMENT_BASE)
    records = [
        good,                                                   # 1
        {**good, "id": None},                                   # 2 missing id
        {k: v for k, v in good.items() if k != "id"} | {"name": "t1_fromname"},  # 3 id taken from name
        {**good, "id": "c4", "score": "lots"},                  # 4 wrong type: score
        {**good, "id": "c5", "stickied": "maybe"},              # 5 wrong type: stickied
        {**good, "id": "c6", "author": {"name": "x"}},          # 6 wrong type: author
        {**good, "id": "c7", "created_utc": None},              # 7 missing created_utc
        {**good, "id": "c8", "parent_id": "x9"},                # 8 a bare parent id is ambiguous
        None,                                                   # 9 not an object
    ]
    path = _write_ndjson(tmp_path / "mixed.ndjson", records)
    with open(path, "ab") as fh:
        fh.write(orjson.dumps({**good, "id": "c10"}).replace(b'"score":3', b'"score":99999999999999999999') + b"\n")
        fh.write(b'{"id": "c11", "body": \n')  # 11 bad JSON
        fh.write(b"\n")                          # blank: not a record
        fh.write(orjson.dumps({**good, "id": "c12"}) + b"\n")  # 13
    assert normalize_block(path.read_bytes(), 13) is None
    report = ingest([path], tmp_path / "store")
    file = report.files[0]
    assert dict(file.skipped) == {"missing_id": 1, "bad_type:score": 1, "bad_type:stickied": 1,
                                  "bad_type:author": 1, "missing_field:created_utc": 1,
                                  "bad_value:parent_id": 1, "not_an_object": 1, "bad_value:score": 1,
                                  "bad_json": 1}
    assert (file.records_read, file.ingested) == (12, 3)
    where = {reason: examples[0].rsplit(":", 1)[1] for reason, examples in file.skip_examples.items()}
    assert where == {"missing_id": "2", "bad_type:score": "4", "bad_type:stickied": "5", "bad_type:author": "6",
                     "missing_field:created_utc": "7", "bad_value:parent_id": "8", "not_an_object": "9",
                     "bad_value:score": "10", "bad_json": "11"}
    assert all(examples[0].startswith(str(path)) for examples in file.skip_examples.values())
    assert [row[0] for row in _store_rows(tmp_path / "store", "comments")] == ["c1", "c12", "fromname"]
    with pytest.raises(SkipRecord) as skip:
        normalize_record({**good, "score": [1]})
    assert skip.value.reason == "bad_type:score"


@pytest.mark.parametrize("where", ["first", "middle", "last", "indented"])
def test_null_line_falls_back_instead_of_crashing(where, tmp_path):
    """Arrow's reader segfaults on a `null` line at the start of a chunk: the block path must decline it."""
    lines = [orjson.dumps({**COMMENT_BASE, "id": f"c{i}"}) for i in range(6)]
    position = {"first": 0, "middle": 3, "last": 6, "indented": 3}[where]
    lines.insert(position, b"  null" if where == "indented" else b"null")
    block = b"".join(line + b"\n" for line in lines)
    assert normalize_block(block, len(lines)) is None
    path = tmp_path / "with_null.ndjson"
    path.write_bytes(block)
    report = ingest([path], tmp_path / "store")
    assert (report.ingested, report.skipped) == (6, {"not_an_object": 1})


def test_line_numbers_across_blocks(shared_data, tmp_path):
    """A bad line deep in a file is reported with its own line number, whatever the block cuts."""
    lines = _lines(shared_data / RC_2005)
    lines[700] = b'{"broken": '
    path = tmp_path / "RC_broken.ndjson"
    path.write_bytes(b"\n".join(lines))  # and no newline after the last line
    for block_bytes in (4 << 10, 64 << 10, 16 << 20):
        numbered = [(n, line) for block in read_items(path, block_bytes) for n, line in split_lines(block)]
        assert [n for n, _ in numbered] == list(range(1, 1076))
        assert numbered[700] == (701, b'{"broken": ')
        assert numbered[-1][1] == lines[-1]
    report = ingest([path], tmp_path / "store")
    assert report.files[0].skip_examples == {"bad_json": [f"{path}:701"]}
    assert (report.records_read, report.ingested) == (1075, 1074)


# ---------------------------------------------------------------- what the fast path may take

POST_BASE = {"id": "p1", "title": "a title", "selftext": "text", "author": "a", "score": 5,
             "created_utc": 1134365188, "subreddit": "s", "over_18": False, "num_comments": 3,
             "link_flair_text": None, "url": "https://example.com", "retrieved_on": 1473738411}
FAST, SLOW = True, False
# (base, field, value, whether the fast path keeps it): values a cast could change go to the
# record path; the ones it keeps must give exactly the record path's row.
CASES = [
    *((COMMENT_BASE, "author", v, SLOW) for v in (True, False, 1.5, {"a": 1}, [1], "true", "[1, 2]", "-1.5")),
    *((COMMENT_BASE, "author", v, FAST) for v in (7, -7, "7", "[deleted]", '"quoted"', "", None,
                                                  123456789012345678, "t", "{not json")),
    (COMMENT_BASE, "author", 12345678901234567890123, SLOW),  # orjson reads it as a float
    (COMMENT_BASE, "body", '{"a": 1}', SLOW), (COMMENT_BASE, "body", "null", SLOW),
    (COMMENT_BASE, "subreddit", 3.0, SLOW), (COMMENT_BASE, "distinguished", True, SLOW),
    (COMMENT_BASE, "distinguished", "moderator", FAST),
    (COMMENT_BASE, "id", 123, FAST), (COMMENT_BASE, "id", "", SLOW), (COMMENT_BASE, "id", True, SLOW),
    (COMMENT_BASE, "id", None, SLOW),
    *((COMMENT_BASE, "score", v, FAST) for v in (3, -3, "3", "007", None)),
    *((COMMENT_BASE, "score", v, SLOW) for v in (1.5, "1.5", True, "", "abc", 2**63, 1e3, " 3", "+3",
                                                 "1e3", 10**15)),
    *((COMMENT_BASE, "created_utc", v, FAST) for v in (1134365188, 1134365188.9, "1134365188",
                                                       "1134365188.7", FIRST_UTC, "1117584000.0")),
    *((COMMENT_BASE, "created_utc", v, SLOW) for v in ("1.1e9", True, None, "", "x", 1e300, "1_134", -5.5, 0,
                                                       FIRST_UTC - 1, -(2**63), 2**63 - 1, 4102444800)),
    *((COMMENT_BASE, "score", v, FAST) for v in (-(2**31), 2**31 - 1)),
    *((COMMENT_BASE, "score", v, SLOW) for v in (-(2**31) - 1, 2**31, -(2**63), "2147483648")),
    *((COMMENT_BASE, "retrieved_on", v, SLOW) for v in (0, -1, 2**62)),
    *((POST_BASE, "num_comments", v, SLOW) for v in (-1, 2**31)),
    *((COMMENT_BASE, "stickied", v, FAST) for v in (True, False, "true", "True", "FALSE", None)),
    *((COMMENT_BASE, "stickied", v, SLOW) for v in (1, 0, "1", "yes", 1.0)),
    *((COMMENT_BASE, "link_id", v, FAST) for v in ("t3_x", "t1_x", "x", 5)),
    *((COMMENT_BASE, "link_id", v, SLOW) for v in (True, "", None, 1.5)),
    *((COMMENT_BASE, "parent_id", v, SLOW) for v in ("x", None, "", 5, "T1_x")),
    (COMMENT_BASE, "retrieved_on", "1473738411", FAST), (COMMENT_BASE, "retrieved_on", 1.5, SLOW),
    (COMMENT_BASE, "retrieved_utc", 1500000000, FAST),
    *((COMMENT_BASE, "_meta", v, FAST) for v in ({"retrieved_2nd_on": 1500000000}, {"retrieved_2nd_on": "1500000000"},
                                                 {}, None, {"note": "x"})),
    *((COMMENT_BASE, "_meta", v, SLOW) for v in ({"retrieved_2nd_on": 1.5}, {"retrieved_2nd_on": True}, "s", [1])),
    *((POST_BASE, "title", v, FAST) for v in ("t", 5, "")),
    *((POST_BASE, "title", v, SLOW) for v in (True, {"a": 1})),
    (POST_BASE, "over_18", "false", FAST), (POST_BASE, "over_18", 0, SLOW),
    (POST_BASE, "num_comments", "3", FAST), (POST_BASE, "num_comments", 2.5, SLOW),
    (POST_BASE, "url", {"x": 1}, SLOW), (POST_BASE, "link_flair_text", "Flair", FAST),
    (POST_BASE, "selftext", False, SLOW),
]


def _case_line(i: int, base: dict, field: str, value) -> bytes:
    record = {**base, "id": f"{base['id']}{i}", field: value}
    return json.dumps(record).encode()  # not orjson: it refuses integers beyond 64 bits


def _outcome(line: bytes):
    """What the record path alone makes of one line: (kind, row) or the skip reason."""
    try:
        return normalize_record(orjson.loads(line))
    except orjson.JSONDecodeError:
        return "bad_json"
    except SkipRecord as skip:
        return skip.reason


@pytest.mark.parametrize("i", range(len(CASES)))
def test_fast_path_keeps_a_value_only_if_the_record_path_gives_the_same_row(i):
    base, field, value, fast = CASES[i]
    line = _case_line(i, base, field, value)
    expected = _outcome(line)
    with BlockParser() as parser:
        parsed = parser.parse(line + b"\n", 1)
    if fast:
        assert parsed is not None and not len(parsed.slow), (field, value)
        kind, row = expected
        table = parsed.comments if kind == COMMENT else parsed.posts
        assert [tuple(r.values()) for r in table.to_pylist()] == [row], (field, value)
        assert (parsed.posts if kind == COMMENT else parsed.comments).num_rows == 0
    else:  # handed back: the whole block (DuckDB refused it) or the line
        assert parsed is None or list(parsed.slow) == [0], (field, value, expected)


def test_every_case_ingested_together_equals_the_record_path(tmp_path):
    """All the cases above in one file, fast and slow lines mixed: the same rows and skips."""
    lines = [_case_line(i, base, field, value) for i, (base, field, value, _) in enumerate(CASES)]
    lines += [b'{"id": "nan1", "link_id": "t3_p1", "parent_id": "t3_p1", "created_utc": 1, "score": NaN}',
              b"null", b'{"id": "u1", "created_utc": 1}']  # NaN in a kept field, not an object, no kind
    outcomes = [_outcome(line) for line in lines]
    # without the `_meta` values DuckDB refuses outright, the block mixes fast rows and slow lines
    kept = [line for line, (_, field, value, _) in zip(lines, CASES)
            if field != "_meta" or isinstance(value, dict) or value is None]
    with BlockParser() as parser:
        parsed = parser.parse(b"".join(line + b"\n" for line in kept), len(kept))
    assert parsed.comments.num_rows > 30 and parsed.posts.num_rows > 3 and len(parsed.slow) > 50
    for name, subset in (("all", lines), ("kept", kept)):
        path = tmp_path / f"{name}.ndjson"
        path.write_bytes(b"".join(line + b"\n" for line in subset))
        report = ingest([path], tmp_path / f"store-{name}")
        wanted = [_outcome(line) for line in subset]
        assert report.files[0].skipped == Counter(o for o in wanted if isinstance(o, str)), name
        rows = {kind: sorted(row for k, row in (o for o in wanted if not isinstance(o, str)) if k == kind)
                for kind in (COMMENT, POST)}
        assert _store_rows(tmp_path / f"store-{name}", "comments") == rows[COMMENT], name
        assert _store_rows(tmp_path / f"store-{name}", "posts") == rows[POST], name
    assert "bad_json" in outcomes and "not_an_object" in outcomes and "unknown_kind" in outcomes


def test_slow_lines_keep_their_place_among_fast_rows(tmp_path):
    """A line redone by the record path sits where it was: on equal stamps the later line still wins."""
    fast = {**COMMENT_BASE, "id": "x", "body": "fast", "retrieved_on": 1_500_000_000}
    slow = {**COMMENT_BASE, "id": "x", "body": "slow", "score": 2.5, "retrieved_on": 1_500_000_000}  # 2.5: record path
    for order, winner in (((fast, slow), "slow"), ((slow, fast), "fast")):
        records = [{**COMMENT_BASE, "id": "a"}, *order, {**COMMENT_BASE, "id": "b"}]
        path = _write_ndjson(tmp_path / f"{winner}.ndjson", records)
        ingest([path], tmp_path / f"store-{winner}")
        rows = _store_rows(tmp_path / f"store-{winner}", "comments")
        assert [(r[0], r[4]) for r in rows] == [("a", "hello"), ("b", "hello"), ("x", winner)]
    # the pieces of a mixed block, in line order
    records = [{**COMMENT_BASE, "id": "c1"}, {**POST_BASE, "id": "p1"}, {**COMMENT_BASE, "id": "c2", "score": 1.5},
               {**COMMENT_BASE, "id": "c3"}, {**POST_BASE, "id": "p2", "over_18": 1}, {**POST_BASE, "id": "p3"}]
    block = b"".join(orjson.dumps(r) + b"\n" for r in records)
    with BlockParser() as parser:
        parsed = parser.parse(block, len(records))
        pieces = [p if isinstance(p, int) else (p[0]["id"].to_pylist(), p[1]["id"].to_pylist())
                  for p in parsed.pieces()]
        assert pieces == [(["c1"], ["p1"]), 2, (["c3"], []), 4, ([], ["p3"])]
        assert orjson.loads(parsed.line(2))["id"] == "c2" and orjson.loads(parsed.line(4))["id"] == "p2"


def test_a_duplicate_key_sends_the_block_to_the_record_path(tmp_path):
    """DuckDB refuses a repeated key; orjson keeps the last value, and so does the store."""
    line = orjson.dumps({**COMMENT_BASE, "id": "d1"})[:-1] + b', "body": "second"}'
    with BlockParser() as parser:
        assert parser.parse(orjson.dumps(COMMENT_BASE) + b"\n" + line + b"\n", 2) is None
    path = tmp_path / "dup.ndjson"
    path.write_bytes(orjson.dumps(COMMENT_BASE) + b"\n" + line + b"\n")
    ingest([path], tmp_path / "store")
    assert [(r[0], r[4]) for r in _store_rows(tmp_path / "store", "comments")] == [("c1", "hello"), ("d1", "second")]


@pytest.mark.timeout(60)
def test_a_refused_block_does_not_leave_the_pipe_writer_waiting():
    """DuckDB stops on the first line of an 8 MiB block: the rest must still drain from the FIFO."""
    good = orjson.dumps(COMMENT_BASE) + b"\n"
    block = b'{"id": \n' + good * (8 * 2**20 // len(good))
    with BlockParser() as parser:
        for _ in range(3):  # and the parser is usable afterwards
            assert parser.parse(block, block.count(b"\n")) is None
            assert parser.parse(good * 3, 3).comments.num_rows == 3
        folder = parser._dir
    assert not Path(folder).exists()  # the FIFO's folder is removed on close


def test_known_leniency_nan_or_trailing_comma_outside_the_kept_fields(tmp_path):
    """DuckDB's reader accepts NaN and a trailing comma, which orjson refuses (bad_json).

    In a field the store keeps, NaN fails its check and the line goes to the record path; elsewhere
    in the record the fast path keeps the row (Arrow's reader, before it, accepted NaN there too).
    """
    nan = orjson.dumps(COMMENT_BASE)[:-1] + b', "ups": NaN}'
    comma = orjson.dumps({**COMMENT_BASE, "id": "c2"})[:-1] + b", }"
    assert _outcome(nan) == _outcome(comma) == "bad_json"
    assert _fast([nan, comma]) == {COMMENT: [normalize_record(COMMENT_BASE)[1],
                                             normalize_record({**COMMENT_BASE, "id": "c2"})[1]], POST: []}


# ---------------------------------------------------------------- compression and damage

def test_truncated_zstd_names_file_and_byte_and_keeps_what_came_before(shared_data, tmp_path):
    store = tmp_path / "store"
    ingest([shared_data / RS_ASKWOMEN], store)  # already in the store: must survive
    compressed = (shared_data / RC_2005).read_bytes()
    cut = len(compressed) // 2
    truncated = tmp_path / "RC_truncated.zst"
    truncated.write_bytes(compressed[:cut])
    # what a decoder can still recover from the first half: its complete lines
    partial = zstandard.ZstdDecompressor(max_window_size=2**31).decompressobj().decompress(compressed[:cut])
    complete = partial.count(b"\n")
    assert 0 < complete < 1075
    report = ingest([truncated], store, batch_rows=100)
    file = report.files[0]
    assert file.error == f"{truncated}: truncated zstd stream at byte {cut}"
    assert file.records_read == file.ingested == complete
    with Store(store, read_only=True) as s:
        assert s.count("comments") == complete
        assert s.count("posts") == 8271


def test_concatenated_zstd_frames_are_one_stream(shared_data, tmp_path):
    lines = _lines(shared_data / RC_2005)
    compressor = zstandard.ZstdCompressor(level=3)
    frames = [compressor.compress(b"".join(line + b"\n" for line in lines[i:i + 100]))
              for i in range(0, len(lines), 100)]
    path = tmp_path / "RC_frames.zst"
    path.write_bytes(b"".join(frames))
    report = ingest([path], tmp_path / "store")
    assert report.ok and report.ingested == 1075
    assert _store_rows(tmp_path / "store", "comments") == sorted(_reference(lines)[COMMENT])


@pytest.mark.parametrize("codec", ["gz", "bz2", "xz"])
def test_gzip_bz2_xz_inputs_give_the_same_store(shared_data, tmp_path, codec):
    raw = b"".join(line + b"\n" for line in _lines(shared_data / RC_2005))
    # bzip2 -1: 100 kB blocks (bz2 decodes whole blocks: the records of a damaged block are lost)
    compress = {"gz": gzip.compress, "bz2": lambda data: bz2.compress(data, 1), "xz": lzma.compress}[codec]
    path = tmp_path / f"RC_2005-12.ndjson.{codec}"
    path.write_bytes(compress(raw))
    report = ingest([path], tmp_path / "store")
    assert report.ok and (report.records_read, report.ingested) == (1075, 1075)
    assert _store_rows(tmp_path / "store", "comments") == sorted(_reference(_lines(shared_data / RC_2005))[COMMENT])
    # cut in half: the records before the damage are kept (as for zstd), the error names file and byte
    broken = tmp_path / f"broken.ndjson.{codec}"
    broken.write_bytes(compress(raw)[: len(compress(raw)) // 2])
    report = ingest([broken], tmp_path / "store2")
    assert report.errors and str(broken) in report.errors[0] and "byte" in report.errors[0]
    assert report.records_read == report.ingested
    kept = _store_rows(tmp_path / "store2", "comments")
    assert 300 < len(kept) < 1075 and set(kept) <= set(_store_rows(tmp_path / "store", "comments"))


def test_parser_pool_keeps_line_order_across_many_blocks(shared_data, tmp_path, monkeypatch):
    """Small blocks parsed ahead by three parsers: each comment's second copy (same retrieval stamp,
    another score, one or two blocks later) still wins, as the later line; a bad line in the middle
    is counted at its own line; the store equals the record path's rows."""
    import functools

    import mining.ingest as ingest_module

    lines = _lines(shared_data / RC_2005)
    ordered, second_copies = [], []
    for start in range(0, len(lines), 40):  # 40 originals, then their second copies: ~1.5 blocks apart
        chunk = lines[start:start + 40]
        ordered += chunk
        for line in chunk:
            record = orjson.loads(line)
            record["score"] = record.get("score", 0) + 1000
            second_copies.append(orjson.dumps(record))
            ordered.append(second_copies[-1])
    ordered.insert(600, b"{broken")
    path = tmp_path / "two_copies.ndjson"
    path.write_bytes(b"\n".join(ordered) + b"\n")
    monkeypatch.setattr(ingest_module, "read_items", functools.partial(read_items, block_bytes=16 << 10))
    monkeypatch.setattr(ingest_module, "parse_threads", lambda: 3)
    report = ingest([path], tmp_path / "store")
    (file_report,) = report.files
    assert report.records_read == 2 * len(lines) + 1 and report.skipped == {"bad_json": 1}
    assert file_report.skip_examples["bad_json"] == [f"{path}:601"]
    valid = ordered[:600] + ordered[601:]
    last_copy = {row[0]: row for row in _reference(valid)[COMMENT]}
    assert last_copy == {row[0]: row for row in _reference(second_copies)[COMMENT]}  # the second copies won
    assert _store_rows(tmp_path / "store", "comments") == sorted(last_copy.values())
