"""Ingestion on the real shared files: exact accounting, idempotency, crash safety, the store's merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import orjson
import pytest
import zstandard

from mining.ingest import DEFAULT_BATCH_ROWS, ingest, whole_row_groups
from mining.normalize import COMMENT, POST, RowBuffer, normalize_record
from mining.schema import COMMENT_SCHEMA, POST_SCHEMA
from mining.store import ROW_GROUP_ROWS, Store

RC_2005 = "pushshift/RC_2005-12.zst"


def _fingerprint(store_dir: Path) -> str:
    """Row count and a sum of per-row hashes of both tables: equal stores give equal fingerprints.

    Also checks the store's invariant, which no index enforces: one row per id.
    """
    with Store(store_dir, read_only=True) as store:
        for table in ("comments", "posts"):
            rows, ids = store.con.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}").fetchone()
            assert rows == ids, f"{table}: {rows - ids} repeated ids"
        return str([store.con.execute(f"SELECT count(*), sum(hash(t)) FROM {table} t").fetchone()
                    for table in ("comments", "posts")])


def test_rc_2005_12_exact_figures(shared_data, tmp_path):
    report = ingest([shared_data / RC_2005], tmp_path / "store")
    result = report.to_dict()
    assert result["records_read"] == 1075
    assert result["ingested"] == 1075
    assert result["skipped"] == {}
    assert result["comments"] == 1075 and result["posts"] == 0
    assert result["threads"] == 396
    assert result["orphans"] == 15
    assert result["errors"] == []
    with Store(tmp_path / "store", read_only=True) as store:
        bodies = dict(store.con.execute(
            "SELECT body, count(*) FROM comments WHERE body IN ('[deleted]', '[removed]') GROUP BY body").fetchall())
        assert bodies == {"[deleted]": 105, "[removed]": 15}
        scores = store.con.execute("SELECT min(score), max(score) FROM comments").fetchone()
        assert scores == (-21, 27)


def test_every_shared_file_is_accounted_for(shared_data, tmp_path):
    paths = [shared_data / "pushshift", shared_data / "bigquery", shared_data / "reddit-api"]
    report = ingest(paths, tmp_path / "store")
    assert report.ok, report.errors
    for file in report.files:
        assert file.records_read == file.ingested + sum(file.skipped.values()), file.path
    by_name = {Path(f.path).name: f for f in report.files}
    assert by_name["RS_2019-10_AskWomen.zst"].ingested == 8271
    assert by_name["comments.ndjson"].ingested == 27
    assert by_name["submissions.ndjson"].ingested == 31
    assert by_name["r_MachineLearning_82ymmx.json"].ingested == 13
    # the r/funny cassette: the post, its 541 comments (some fetched twice), and `more` stubs counted
    funny = by_name["TestCommentForest.test_replace__all.json"]
    assert funny.skipped == {"more_stub": 18}
    assert by_name["TestReddit.test_info.json"].skipped == {"unsupported_kind:t5": 100}
    with Store(tmp_path / "store", read_only=True) as store:
        assert store.con.execute("SELECT count(*) FROM comments WHERE link_id = 't3_3hahrw'").fetchone()[0] == 541
        # BigQuery strings were coerced to numbers
        row = store.con.execute("SELECT score, created_utc, retrieved_utc FROM comments WHERE id = 'dveh7r5'").fetchone()
        assert row == (1, 1520550110, 1524963292)


def test_reingest_is_idempotent(shared_data, tmp_path):
    ingest([shared_data / RC_2005], tmp_path / "a")
    ingest([shared_data / RC_2005], tmp_path / "b")
    ingest([shared_data / RC_2005], tmp_path / "b")
    assert _fingerprint(tmp_path / "a") == _fingerprint(tmp_path / "b")
    # in small batches too: every batch after the first meets stored ids
    ingest([shared_data / RC_2005], tmp_path / "b", batch_rows=100)
    assert _fingerprint(tmp_path / "a") == _fingerprint(tmp_path / "b")


def _write_ndjson(path: Path, records: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


T = 1_500_000_000  # a realistic stamp (2017): the store refuses any before Reddit opened


def test_newest_retrieval_wins_in_either_order(tmp_path):
    base = {"id": "c1", "link_id": "t3_p1", "parent_id": "t3_p1", "author": "a", "created_utc": T + 100, "subreddit": "s"}
    old = _write_ndjson(tmp_path / "old.ndjson", [{**base, "body": "first", "score": 1, "retrieved_on": T + 200}])
    new = _write_ndjson(tmp_path / "new.ndjson", [{**base, "body": "edited", "score": 9, "retrieved_on": T + 900}])
    for order, store in (([old, new], "s1"), ([new, old], "s2")):
        ingest(order, tmp_path / store)
        with Store(tmp_path / store, read_only=True) as s:
            assert s.con.execute("SELECT body, score FROM comments").fetchall() == [("edited", 9)]
    # within one file, the newer copy wins too, and an equal stamp goes to the later line
    same = _write_ndjson(tmp_path / "same.ndjson", [
        {**base, "body": "b1", "score": 1, "retrieved_on": T + 500},
        {**base, "body": "b2", "score": 2, "retrieved_on": T + 400},
        {**base, "body": "b3", "score": 3, "retrieved_on": T + 500},
    ])
    ingest([same], tmp_path / "s3")
    with Store(tmp_path / "s3", read_only=True) as s:
        assert s.con.execute("SELECT body FROM comments").fetchall() == [("b3",)]


def test_newer_copy_updates_mutable_columns_and_keeps_the_rest(tmp_path):
    """As the upsert always did: a stored row takes score, body, author... from a newer copy and keeps
    link_id, parent_id, created_utc and subreddit as created; within one batch the newest copy wins whole."""
    first = {"id": "c1", "link_id": "t3_p1", "parent_id": "t3_p1", "author": "a", "body": "first", "score": 1,
             "created_utc": T + 100, "subreddit": "s", "stickied": False, "retrieved_on": T + 200}
    later = {**first, "link_id": "t3_p2", "parent_id": "t1_x", "author": "b", "body": "edited", "score": 9,
             "created_utc": T + 999, "subreddit": "other", "stickied": True, "distinguished": "moderator",
             "retrieved_on": T + 900}
    columns = ("id, link_id, parent_id, author, body, score, created_utc, subreddit, distinguished, stickied, "
               "retrieved_utc")
    a = _write_ndjson(tmp_path / "a.ndjson", [first, {**first, "id": "c2"}])
    b = _write_ndjson(tmp_path / "b.ndjson", [later, {**later, "id": "c3"}])
    ingest([a, b], tmp_path / "two-files")
    with Store(tmp_path / "two-files", read_only=True) as s:
        assert s.con.execute(f"SELECT {columns} FROM comments ORDER BY id").fetchall() == [
            ("c1", "t3_p1", "t3_p1", "b", "edited", 9, T + 100, "s", "moderator", True, T + 900),
            ("c2", "t3_p1", "t3_p1", "a", "first", 1, T + 100, "s", None, False, T + 200),
            ("c3", "t3_p2", "t1_x", "b", "edited", 9, T + 999, "other", "moderator", True, T + 900)]
    one = _write_ndjson(tmp_path / "one.ndjson", [first, later])
    ingest([one], tmp_path / "one-batch")
    with Store(tmp_path / "one-batch", read_only=True) as s:
        assert s.con.execute(f"SELECT {columns} FROM comments").fetchall() == [
            ("c1", "t3_p2", "t1_x", "b", "edited", 9, T + 999, "other", "moderator", True, T + 900)]
    _fingerprint(tmp_path / "two-files")


def test_thread_counts_equal_the_direct_definition(shared_data, tmp_path):
    """The summary's joins against the plain definition, on a store with posts, comments and orphans."""
    ingest([shared_data / "pushshift", shared_data / "reddit-api"], tmp_path / "store")
    with Store(tmp_path / "store", read_only=True) as store:
        counts = store.thread_counts()
        threads, orphans, without_post = store.con.execute(
            """
            WITH ids AS (SELECT 't3_' || id AS link_id FROM posts UNION SELECT link_id FROM comments)
            SELECT (SELECT count(*) FROM ids),
                   (SELECT count(*) FROM comments c WHERE c.parent_id LIKE 't1\\_%' ESCAPE '\\'
                      AND NOT EXISTS (SELECT 1 FROM comments p WHERE p.id = substr(c.parent_id, 4))),
                   (SELECT count(DISTINCT c.link_id) FROM comments c
                      WHERE NOT EXISTS (SELECT 1 FROM posts p WHERE p.id = substr(c.link_id, 4)))
            """).fetchone()
    assert counts == {"threads": threads, "orphans": orphans, "threads_without_post": without_post}
    assert threads > 400 and orphans >= 15 and 0 < without_post < threads


def test_batches_are_whole_row_groups():
    assert DEFAULT_BATCH_ROWS == 2 * ROW_GROUP_ROWS
    assert [whole_row_groups(n) for n in (1, 10_000, ROW_GROUP_ROWS, 250_000, 400_000)] == [
        1, 10_000, ROW_GROUP_ROWS, 2 * ROW_GROUP_ROWS, 3 * ROW_GROUP_ROWS]
    row = normalize_record({"id": "c1", "link_id": "t3_p", "parent_id": "t3_p", "created_utc": T + 1})[1]
    buffer = RowBuffer()
    for i in range(7):
        buffer.add_row(COMMENT, (f"c{i}", *row[1:]))
    comments, posts = buffer.take(5)  # one kind: exactly the first five, the rest stays
    assert comments["id"].to_pylist() == [f"c{i}" for i in range(5)] and posts.schema == POST_SCHEMA
    assert len(buffer) == 2
    buffer.add_row(POST, normalize_record({"id": "p1", "title": "t", "created_utc": T + 1})[1])
    comments, posts = buffer.take(1)  # two kinds: everything, in order within each kind
    assert comments["id"].to_pylist() == ["c5", "c6"] and posts["id"].to_pylist() == ["p1"]
    assert len(buffer) == 0 and buffer.take()[0].schema == COMMENT_SCHEMA


def test_a_store_from_before_schema_2_still_ingests(shared_data, tmp_path):
    """Stores created with a PRIMARY KEY on id (schema 1) keep it, and merge the same way."""
    old = tmp_path / "old"
    old.mkdir()
    con = duckdb.connect(str(old / "ahf.duckdb"))
    for table, schema in (("comments", COMMENT_SCHEMA), ("posts", POST_SCHEMA)):
        types = {"string": "VARCHAR", "int64": "BIGINT", "bool": "BOOLEAN"}
        columns = ", ".join(f"{f.name} {types[str(f.type)]}{' PRIMARY KEY' if f.name == 'id' else ''}" for f in schema)
        con.execute(f"CREATE TABLE {table} ({columns})")
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.close()
    for _ in range(2):
        ingest([shared_data / RC_2005, shared_data / "pushshift/schema-drift"], old)
    ingest([shared_data / RC_2005, shared_data / "pushshift/schema-drift"], tmp_path / "new")
    assert _fingerprint(old) == _fingerprint(tmp_path / "new")


def test_bad_records_are_counted_with_their_line(tmp_path):
    good = {"id": "c1", "link_id": "t3_p1", "parent_id": "t3_p1", "body": "hi there", "created_utc": T + 5}
    path = tmp_path / "mixed.ndjson"
    path.write_bytes(
        orjson.dumps(good) + b"\n"
        + b"{not json\n"
        + orjson.dumps({**good, "id": None}) + b"\n"
        + orjson.dumps({**good, "id": "c2", "score": "lots"}) + b"\n"
        + orjson.dumps({**good, "id": "c3", "created_utc": "1134365188.0"}) + b"\n"
    )
    report = ingest([path], tmp_path / "store")
    file = report.files[0]
    assert (file.records_read, file.ingested) == (5, 2)
    assert dict(file.skipped) == {"bad_json": 1, "missing_id": 1, "bad_type:score": 1}
    assert file.skip_examples["bad_json"] == [f"{path}:2"]
    assert file.skip_examples["bad_type:score"] == [f"{path}:4"]


def test_truncated_file_is_an_error_and_keeps_the_store(shared_data, tmp_path):
    ingest([shared_data / RC_2005], tmp_path / "store")
    before = _fingerprint(tmp_path / "store")
    truncated = tmp_path / "RC_truncated.zst"
    truncated.write_bytes((shared_data / RC_2005).read_bytes()[:50_000])
    result = subprocess.run(
        [sys.executable, "-m", "ahf.cli", "ingest", str(truncated), "--store", str(tmp_path / "store"), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["errors"] and str(truncated) in report["errors"][0] and "byte" in report["errors"][0]
    assert "Traceback" not in result.stderr
    assert report["records_read"] == report["ingested"] + sum(report["skipped"].values())
    # the truncated copy re-ingested records the store already had: nothing changed
    assert _fingerprint(tmp_path / "store") == before


def _big_comment_file(path: Path, n: int) -> Path:
    compressor = zstandard.ZstdCompressor(level=1)
    lines = (orjson.dumps({"id": f"x{i}", "link_id": f"t3_p{i // 50}", "parent_id": f"t3_p{i // 50}",
                           "author": f"u{i % 97}", "body": f"comment number {i} " * 4, "score": i % 13,
                           "created_utc": 1_500_000_000 + i, "subreddit": "big", "retrieved_on": 1_600_000_000})
             for i in range(n))
    path.write_bytes(compressor.compress(b"\n".join(lines) + b"\n"))
    return path


def test_kill_minus_9_then_rerun_equals_one_clean_run(tmp_path, monkeypatch):
    monkeypatch.setenv("AHF_STORE_FORMAT", "duckdb")  # row groups and transactions of the DuckDB file (the
    source = _big_comment_file(tmp_path / "big.zst", 300_000)  # Delta store's kill test: test_delta_store.py)
    clean = tmp_path / "clean"
    ingest([source], clean)
    with Store(clean, read_only=True) as store:  # batches of whole row groups: none rewritten later
        groups = store.con.execute(
            "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('comments')").fetchone()[0]
    assert groups == 3  # 122,880 + 122,880 + 54,240
    crashed = tmp_path / "crashed"
    command = [sys.executable, "-m", "ahf.cli", "ingest", str(source), "--store", str(crashed),
               "--batch-rows", "10000", "--no-turns", "--json"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the killed run's pipe folder stays under tmp_path
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    db = crashed / "ahf.duckdb"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (db.exists() and db.stat().st_size > 2_000_000):
        time.sleep(0.05)  # wait until some batches are committed, then kill mid-run
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    with Store(crashed, read_only=True) as store:
        partial = store.count("comments")
    assert 0 < partial < 300_000
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=300, env=env)
    assert _fingerprint(crashed) == _fingerprint(clean)


def test_missing_path_is_a_clear_error(tmp_path, capsys):
    from ahf.cli import main

    code = main(["ingest", str(tmp_path / "nope.zst"), "--store", str(tmp_path / "s")])
    assert code == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["json", "ndjson"])
def test_api_listing_file_is_ingested(shared_data, tmp_path, suffix):
    cassette = json.loads((shared_data / "reddit-api/TestSubredditListings.test_comments.json").read_text())
    body = cassette["interactions"][1]["response"]["body"]["string"]
    listing = tmp_path / f"listing.{suffix}"
    listing.write_text(body)  # one line: an API envelope, not an NDJSON record
    report = ingest([listing], tmp_path / "store")
    assert (report.records_read, report.ingested) == (100, 100)


@pytest.mark.parametrize("fmt", ["duckdb", "delta"])
def test_store_uses_the_cores_this_process_may_run_on(tmp_path, fmt):
    """DuckDB counts the machine's cores; under taskset / a cpuset the store (and the ingest's bulk
    load, which resets to it) must use only the cores it was given, or its threads share one core."""
    dump = tmp_path / "RC.ndjson"
    dump.write_text(json.dumps({"id": "c1", "link_id": "t3_p", "parent_id": "t3_p", "body": "hi",
                                "author": "a", "score": 1, "created_utc": 1}) + "\n")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from mining.ingest import ingest; from mining.store import Store; "
            f"assert ingest([{str(dump)!r}], {str(tmp_path / 's')!r}, rebuild=False).ok; "
            f"print(Store({str(tmp_path / 's')!r}).value(\"SELECT current_setting('threads')\"))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                         env=os.environ | {"AHF_STORE_FORMAT": fmt})
    assert out.returncode == 0, out.stderr
    assert os.cpu_count() == 1 or duckdb.connect().execute("SELECT current_setting('threads')").fetchone()[0] > 1
    assert out.stdout.split()[-1] == "1"
