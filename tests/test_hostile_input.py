"""Bad input never poisons a store (issue 12): each case as a user or an attacker would bring it.

Every case checks the accounting (`records_read == ingested + sum(skipped)`) and that every later
stage (turns, label, export) still runs on the store the ingest left.
"""

from __future__ import annotations

import bz2
import json
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from feedback.export import export_dataset
from feedback.labels import label_store
from mining.ingest import ingest
from mining.schema import FIRST_UTC, SCORE_RANGE
from mining.stats import store_stats
from mining.store import Store
from mining.turns import build_turns

T = 1_600_000_000


def _thread(post: str = "p1", n: int = 6) -> list[dict]:
    """A post and `n` scored top-level replies: enough for tiers and pairs."""
    records = [{"id": post, "title": "What is the best way to learn?", "selftext": "", "author": "op",
                "score": 50, "created_utc": T, "subreddit": "s", "num_comments": n}]
    records += [{"id": f"{post}c{i}", "link_id": f"t3_{post}", "parent_id": f"t3_{post}", "author": f"u{i}",
                 "body": f"reply number {i} with some words", "score": 2 ** (i + 1), "created_utc": T + 60 * i,
                 "subreddit": "s"} for i in range(n)]
    return records


def _ndjson(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _every_stage_runs(store: Path, tmp_path: Path) -> None:
    turns = build_turns(store)
    assert turns.comments == turns.turns + sum(turns.filtered.values())
    labels = label_store(store)
    assert labels.turns == turns.turns
    for fmt in ("pairs", "pointwise", "sft"):
        export_dataset(store, fmt, tmp_path / f"export-{fmt}", force=True)
    assert store_stats(store)["turns"] == turns.turns


# -- 1. one record poisons the store ------------------------------------------------------------

EXTREMES = [
    ("created_utc", -(2**63)), ("created_utc", 2**63 - 1), ("created_utc", -1), ("created_utc", 0),
    ("created_utc", FIRST_UTC - 1), ("created_utc", int(time.time()) + 10 * 86_400), ("created_utc", "-9e18"),
    ("score", -(2**63)), ("score", 2**63 - 1), ("score", SCORE_RANGE[1] + 1), ("score", "9223372036854775807"),
    ("retrieved_on", -(2**63)), ("retrieved_on", 0),
]


@pytest.mark.parametrize("field,value", EXTREMES)
def test_a_value_outside_its_range_is_a_counted_skip_and_every_stage_still_runs(tmp_path, field, value):
    records = _thread()
    records[3] = {**records[3], field: value}  # one reply of the thread
    path = _ndjson(tmp_path / "in.ndjson", [orjson.dumps(r) for r in records])
    report = ingest([path], tmp_path / "store")
    assert report.ok and report.records_read == 7 and report.ingested == 6
    assert report.skipped == {f"bad_value:{field}": 1}
    _every_stage_runs(tmp_path / "store", tmp_path)


def test_a_post_with_an_extreme_score_among_replies_labels(tmp_path):
    """The post's own fields feed the pair rules (min_post_score) and the delays: bounded there too."""
    records = _thread()
    records[0] = {**records[0], "score": 2**63 - 1, "num_comments": -1}
    path = _ndjson(tmp_path / "in.ndjson", [orjson.dumps(r) for r in records])
    report = ingest([path], tmp_path / "store")
    assert report.skipped == {"bad_value:score": 1} and report.ingested == 6
    _every_stage_runs(tmp_path / "store", tmp_path)


def test_a_store_written_before_the_bounds_still_builds_turns_and_labels(tmp_path, monkeypatch):
    """Values the old release accepted (any BIGINT) no longer overflow the delays and pair margins."""
    monkeypatch.setenv("AHF_STORE_FORMAT", "duckdb")  # the old release's format, edited in place below
    path = _ndjson(tmp_path / "in.ndjson", [orjson.dumps(r) for r in _thread()])
    ingest([path], tmp_path / "store")
    with Store(tmp_path / "store") as store:  # as a store from before: extremes written directly
        store.execute(f"UPDATE comments SET created_utc = {-(2**63)}, score = {2**63 - 1} WHERE id = 'p1c2'")
        store.execute(f"UPDATE comments SET score = {-(2**63)} WHERE id = 'p1c3'")
    _every_stage_runs(tmp_path / "store", tmp_path)


# -- 2. a bad first line loses the whole file ---------------------------------------------------

BAD_FIRST_LINES = {
    "invalid_utf8": b'{"id": "x", "body": "\xff\xfe"}',
    "raw_nul": b'{"id": "x", "body": "a\x00b"}',
    "lone_surrogate": b'{"id": "x", "body": "\\ud800"}',
    "cut_off": b'{"id": "x", "link_id": "t3_p1", "bo',
    "deep_array": b"[" * 100_000 + b"]" * 100_000,
    "deep_object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
}


@pytest.mark.parametrize("case", sorted(BAD_FIRST_LINES))
def test_a_bad_first_line_is_one_counted_skip(tmp_path, case):
    lines = [BAD_FIRST_LINES[case], *(orjson.dumps(r) for r in _thread())]
    report = ingest([_ndjson(tmp_path / "in.ndjson", lines)], tmp_path / "store")
    assert report.ok, report.errors
    assert report.records_read == 8 and report.ingested == 7
    assert sum(report.skipped.values()) == 1 and set(report.skipped) <= {"bad_json", "not_an_object"}
    assert report.files[0].skip_examples[next(iter(report.skipped))] == [f"{tmp_path / 'in.ndjson'}:1"]
    _every_stage_runs(tmp_path / "store", tmp_path)


def test_a_bad_line_first_or_later_gives_the_same_store(tmp_path):
    good = [orjson.dumps(r) for r in _thread()]
    bad = b'{"id": "cut'
    first = ingest([_ndjson(tmp_path / "a.ndjson", [bad, *good])], tmp_path / "a")
    later = ingest([_ndjson(tmp_path / "b.ndjson", [*good[:3], bad, *good[3:]])], tmp_path / "b")
    assert first.skipped == later.skipped == {"bad_json": 1}
    with Store(tmp_path / "a", read_only=True) as a, Store(tmp_path / "b", read_only=True) as b:
        assert a.rows("SELECT * FROM comments ORDER BY id") == b.rows("SELECT * FROM comments ORDER BY id")


def test_pretty_printed_and_one_line_documents_are_still_documents(tmp_path):
    listing = {"kind": "Listing", "data": {"children": [{"kind": "t1", "data": r} for r in _thread()[1:]]}}
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(listing, indent=2))
    compact = tmp_path / "compact.json"
    compact.write_bytes(orjson.dumps([listing]))
    for path in (pretty, compact):
        report = ingest([path], tmp_path / f"store-{path.stem}")
        assert report.ok and (report.records_read, report.ingested) == (6, 6)


# -- 5. a line that is a JSON string ------------------------------------------------------------

def test_values_that_are_not_objects_are_one_reason_whatever_they_say(tmp_path):
    lines = [b'"any text"', b'"bad_json"', b"42", b"null", b"true", b"[1, 2]", *(orjson.dumps(r) for r in _thread())]
    report = ingest([_ndjson(tmp_path / "in.ndjson", lines)], tmp_path / "store")
    assert report.skipped == {"not_an_object": 6} and report.ingested == 7


def test_a_document_cannot_name_its_own_skip_reasons(tmp_path):
    records = _thread()[1:3]
    document = [*records, "free text", 7, None, {"kind": "anything at all", "data": {}},
                {"kind": "Listing", "data": "not a listing"}, {"no": "record"}]
    path = tmp_path / "array.json"
    path.write_bytes(orjson.dumps(document))
    report = ingest([path], tmp_path / "store")
    assert report.records_read == report.ingested + sum(report.skipped.values()) == 8 and report.ingested == 2
    assert report.skipped == {"not_an_object": 3, "unsupported_kind:other": 1, "bad_listing": 1, "unknown_kind": 1}


# -- 8. smaller ones: damaged names, files left behind --------------------------------------------

@pytest.mark.parametrize("name", ["random.zst", "random.gz", "random.bz2", "random.xz"])
def test_bytes_named_as_compressed_without_its_magic_are_an_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 64)
    result = subprocess.run([sys.executable, "-m", "ahf.cli", "ingest", str(path), "--store", str(tmp_path / "s"),
                             "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["records_read"] == 0 and f"{path}: named as" in report["errors"][0]


def test_a_truncated_bz2_keeps_what_came_before(tmp_path):
    lines = [orjson.dumps(r) for i in range(400) for r in _thread(f"p{i}")]
    data = bz2.compress(b"".join(line + b"\n" for line in lines), 1)
    path = tmp_path / "cut.ndjson.bz2"
    path.write_bytes(data[: len(data) * 2 // 3])
    report = ingest([path], tmp_path / "store")
    assert report.errors and "truncated bz2 stream at byte" in report.errors[0]
    assert 0 < report.ingested < len(lines) and report.records_read == report.ingested


def test_the_parsers_scratch_lives_in_the_store_and_a_rerun_cleans_it(tmp_path):
    store = tmp_path / "store"
    path = _ndjson(tmp_path / "in.ndjson", [orjson.dumps(r) for r in _thread()])
    ingest([path], store)
    (store / ".tmp" / "ahf-blocks-left-by-kill-9").mkdir(parents=True)  # what a kill -9 leaves
    ingest([path], store)
    assert not (store / ".tmp").exists()


# -- 4. a reader at the wrong moment -----------------------------------------------------------

def test_stats_says_when_turns_are_older_than_the_comments(tmp_path):
    store = tmp_path / "store"
    ingest([_ndjson(tmp_path / "a.ndjson", [orjson.dumps(r) for r in _thread("p1")])], store)
    assert store_stats(store)["turns_stale"] is False
    # as a kill between the load and the turns rebuild leaves it
    ingest([_ndjson(tmp_path / "b.ndjson", [orjson.dumps(r) for r in _thread("p2")])], store, rebuild=False)
    assert store_stats(store)["turns_stale"] is True
    build_turns(store)
    assert store_stats(store)["turns_stale"] is False


def test_a_reader_during_an_ingest_neither_fails_it_nor_crashes(tmp_path):
    """The ingest holds the store from its first batch to its turns: a concurrent `ahf stats` either
    reads or is told the store is busy (exit 2, a message), and the ingest finishes whole."""
    lines = [orjson.dumps(r) for i in range(20_000) for r in _thread(f"p{i}", 5)]
    path = _ndjson(tmp_path / "big.ndjson", lines)
    store = tmp_path / "store"
    ingest_run = subprocess.Popen([sys.executable, "-m", "ahf.cli", "ingest", str(path), "--store", str(store),
                                   "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes = set()
    while ingest_run.poll() is None:
        stats = subprocess.run([sys.executable, "-m", "ahf.cli", "stats", "--store", str(store), "--json"],
                               capture_output=True, text=True, timeout=120)
        assert "Traceback" not in stats.stderr
        outcomes.add(stats.returncode)
        assert stats.returncode in (0, 2)
        if stats.returncode == 2:
            assert "store" in stats.stderr
    out, err = ingest_run.communicate()
    assert ingest_run.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert report["ingested"] == len(lines) and report["turns"]["turns"] == 20_000 * 5
    assert outcomes  # at least one reader came during the run
