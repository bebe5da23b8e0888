"""The fast block path (`normalize_block`, Arrow) against the per-record path (`normalize_record`).

On every record of the real files the two give the same rows in the same order; a block the fast
path cannot take (schema drift, a bad line) comes back as None and is redone line by line, where
every skip is counted with its reason and line. Also: the readers behind them (block cutting and
line numbers, truncated and concatenated zstd, gzip / bz2 / xz).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import orjson
import pytest
import zstandard

from mining.ingest import ingest
from mining.normalize import COMMENT, POST, SkipRecord, normalize_block, normalize_record
from mining.readers import LineBlock, read_items, split_lines
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


@pytest.mark.parametrize("name", DRIFT)
def test_schema_drift_lines_are_fast_and_equal_or_fall_back(shared_data, name):
    """Line by line over 2005-2024 records: the fast path either declines or gives the same row."""
    lines = _lines(shared_data / name)
    taken = 0
    for line in lines:
        fast = _fast([line])
        if fast is not None:
            taken += 1
            assert fast == _reference([line]), line[:200]
    # most eras parse directly; the ones with created_utc as a string fall back
    string_created = sum(isinstance(orjson.loads(line)["created_utc"], str) for line in lines)
    assert taken == len(lines) - string_created
    assert _fast(lines) is None  # the whole file mixes types: one block falls back as a whole


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
    fast = _fast([orjson.dumps(record)])
    if isinstance(created, str):
        assert fast is None  # Arrow will not read a string as a number: the record path does
    else:
        assert fast == {COMMENT: [row], POST: []}
    ingest([_write_ndjson(tmp_path / "c.ndjson", [record])], tmp_path / "store")
    assert _store_rows(tmp_path / "store", "comments")[0][6] == 1134365188


def test_bigquery_all_string_values(shared_data, tmp_path):
    """The real BigQuery export (every value a string): same rows as a JSON array and as NDJSON."""
    records = orjson.loads((shared_data / "bigquery/r_MachineLearning_82ymmx.json").read_bytes())
    assert all(isinstance(v, str) for r in records for v in r.values() if v is not None)
    assert _fast([orjson.dumps(r) for r in records]) is None
    rows = [normalize_record(r)[1] for r in records]
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
    for meta, expected in (({"retrieved_2nd_on": 300}, 300), ({"retrieved_2nd_on": 50}, 100), (None, 100), ({}, 100)):
        record = {**COMMENT_BASE, "retrieved_on": 100, "_meta": meta}
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
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec]
    path = tmp_path / f"RC_2005-12.ndjson.{codec}"
    path.write_bytes(compress(raw))
    report = ingest([path], tmp_path / "store")
    assert report.ok and (report.records_read, report.ingested) == (1075, 1075)
    assert _store_rows(tmp_path / "store", "comments") == sorted(_reference(_lines(shared_data / RC_2005))[COMMENT])
    # damaged: an error naming the file, not a crash
    broken = tmp_path / f"broken.ndjson.{codec}"
    broken.write_bytes(compress(raw)[: len(compress(raw)) // 2])
    report = ingest([broken], tmp_path / "store2")
    assert report.errors and str(broken) in report.errors[0]
    assert report.records_read == report.ingested
