"""The Delta Lake store (mining.delta_store): the same tables and promises as the DuckDB-file store, on
the real files; kill -9 of the driver and of a Ray worker; `ahf store migrate` of a store built by the
DuckDB format of this release."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from feedback.export import export_dataset
from feedback.labels import label_store
from mining.delta_store import DeltaStore, is_delta_store, write_table_file
from mining.ingest import ingest
from mining.schema import COMMENT_SCHEMA, POST_SCHEMA
from mining.store import Store

REAL = ["pushshift/RC_2005-12.zst", "pushshift/RS_2019-10_AskWomen.zst",
        "reddit-api/TestCommentForest.test_replace__all.json", "pushshift/schema-drift"]
TABLES = {"comments": "id", "posts": "id", "turns": "comment_id", "labels": "comment_id",
          "pairs": "post_id, rule, chosen_id, rejected_id"}
T = 1_500_000_000


def _rows(store_dir: Path, table: str) -> list:
    with Store(store_dir, read_only=True) as store:
        return store.rows(f"SELECT * FROM {table} ORDER BY {TABLES.get(table, 'ALL')}")


def _build(shared_data, store_dir: Path, fmt: str, monkeypatch) -> None:
    monkeypatch.setenv("AHF_STORE_FORMAT", fmt)
    assert ingest([shared_data / p for p in REAL], store_dir).ok
    label_store(store_dir)


@pytest.fixture(scope="module")
def both(shared_data, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    stores = {fmt: tmp_path_factory.mktemp(fmt) / "store" for fmt in ("duckdb", "delta")}
    try:
        for fmt, path in stores.items():
            _build(shared_data, path, fmt, mp)
    finally:
        mp.undo()
    return stores


@pytest.mark.parametrize("table", sorted(TABLES))
def test_both_formats_hold_the_same_rows(both, table):
    assert is_delta_store(both["delta"]) and not is_delta_store(both["duckdb"])
    duck, delta = _rows(both["duckdb"], table), _rows(both["delta"], table)
    assert duck and len(duck) == len(delta)
    assert all(a == b or all(x == y or abs(x - y) < 1e-9 for x, y in zip(a, b)) for a, b in zip(duck, delta))


def test_exports_are_the_same_on_both_formats(both, tmp_path):
    for fmt, store in both.items():
        export_dataset(store, "pairs", tmp_path / fmt)
    for split in ("train", "validation", "test"):
        assert (tmp_path / "duckdb" / f"{split}.jsonl").read_bytes() == (tmp_path / "delta" / f"{split}.jsonl").read_bytes()


def test_newest_retrieval_wins_and_reingest_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("AHF_STORE_FORMAT", "delta")
    base = {"id": "c1", "link_id": "t3_p1", "parent_id": "t3_p1", "author": "a", "created_utc": T + 100, "subreddit": "s"}
    old = tmp_path / "old.ndjson"
    old.write_bytes(orjson.dumps({**base, "body": "first", "score": 1, "retrieved_on": T + 200}) + b"\n")
    new = tmp_path / "new.ndjson"
    new.write_bytes(orjson.dumps({**base, "body": "edited", "score": 9, "retrieved_on": T + 900,
                                  "created_utc": T + 999}) + b"\n")
    for order, name in (([old, new], "s1"), ([new, old], "s2"), ([old, new, old, new], "s3")):
        ingest(order, tmp_path / name)
        with Store(tmp_path / name, read_only=True) as store:
            assert isinstance(store, DeltaStore)
            # the newest copy's mutable columns, the first stored copy's created_utc
            first_created = T + 100 if order[0] == old else T + 999
            assert store.rows("SELECT body, score, created_utc FROM comments") == [("edited", 9, first_created)]


def _comments(*rows: tuple[str, str, int]) -> pa.Table:
    """(id, body, retrieved_utc) rows of one thread, as an ingest batch holds them."""
    return pa.table({"id": [r[0] for r in rows], "link_id": ["t3_p"] * len(rows), "parent_id": ["t3_p"] * len(rows),
                     "author": ["u"] * len(rows), "body": [r[1] for r in rows], "score": [1] * len(rows),
                     "created_utc": [T] * len(rows), "subreddit": ["s"] * len(rows), "distinguished": [None] * len(rows),
                     "stickied": [False] * len(rows), "retrieved_utc": [r[2] for r in rows]}, schema=COMMENT_SCHEMA)


def _task_files(store: DeltaStore, *batches: pa.Table) -> list[tuple]:
    """What a Ray ingest task returns on a Delta store: each batch's files, written into the tables' folders."""
    dirs = store.task_table_dirs()
    return [(write_table_file(dirs["comments"], rows), write_table_file(dirs["posts"], POST_SCHEMA.empty_table()))
            for rows in batches]


def test_a_tasks_files_are_committed_as_written_when_every_id_is_new(tmp_path, monkeypatch):
    from deltalake import DeltaTable

    monkeypatch.setenv("AHF_STORE_FORMAT", "delta")
    with Store(tmp_path / "s") as store:
        files = _task_files(store, _comments(("a", "x", 1), ("b", "y", 1)), _comments(("c", "z", 1)))
        assert [f[1] for f in files] == [None, None]  # an empty batch writes no file
        assert store.rows("SELECT count(*) FROM comments") == [(0,)]  # written, not committed: nobody reads them
        assert store.commit_files(files) == {"comments": "committed"}
        assert store.rows("SELECT id, body FROM comments ORDER BY id") == [("a", "x"), ("b", "y"), ("c", "z")]
    table = DeltaTable(str(tmp_path / "s" / "delta" / "comments"))
    assert sorted(Path(u).name for u in table.file_uris()) == sorted(f[0]["path"] for f in files)  # no row rewritten
    assert table.history(1)[0]["operation"] == "WRITE" and table.count() == 3  # one commit, with the row counts


def test_a_tasks_files_whose_ids_repeat_are_upserted_in_order_and_never_committed(tmp_path, monkeypatch):
    """The same batches through commit_files and through upsert give the same rows: newest retrieval wins,
    ties to the later batch; the task's files are deleted."""
    monkeypatch.setenv("AHF_STORE_FORMAT", "delta")
    stored = _comments(("a", "old", 5))
    batches = [_comments(("a", "newer", 7), ("b", "first", 3)), _comments(("b", "tie, later", 3), ("c", "new", 1))]
    with Store(tmp_path / "upserted") as store:
        store.upsert(stored, POST_SCHEMA.empty_table())
        for rows in batches:
            store.upsert(rows, POST_SCHEMA.empty_table())
        expected = store.rows("SELECT * FROM comments ORDER BY id")
    with Store(tmp_path / "taken") as store:
        store.upsert(stored, POST_SCHEMA.empty_table())
        files = _task_files(store, *batches)
        assert store.commit_files(files) == {"comments": "merged"}
        assert store.rows("SELECT * FROM comments ORDER BY id") == expected
    assert [r[4] for r in expected] == ["newer", "tie, later", "new"]
    assert not any((tmp_path / "taken" / "delta" / "comments" / f[0]["path"]).exists() for f in files)


def test_a_failed_publish_keeps_the_previous_tables(both, tmp_path, monkeypatch):
    import shutil

    import mining.delta_store as delta_module

    store_dir = tmp_path / "store"
    shutil.copytree(both["delta"], store_dir)
    before = _rows(store_dir, "labels")
    real = delta_module.DeltaStore._write_meta_rows

    def fail(self, values):
        if "published_versions" in values:  # the new tables are written; their publication fails
            raise OSError("disk full")
        return real(self, values)

    monkeypatch.setattr(delta_module.DeltaStore, "_write_meta_rows", fail)
    with pytest.raises(OSError, match="disk full"):
        label_store(store_dir, None)
    assert _rows(store_dir, "labels") == before  # readers still see the published version
    monkeypatch.undo()
    label_store(store_dir)
    assert _rows(store_dir, "labels") == before  # the same config: the same labels, now published again


def _big_file(path: Path, n: int) -> Path:
    import zstandard

    lines = (orjson.dumps({"id": f"x{i}", "link_id": f"t3_p{i // 50}", "parent_id": f"t3_p{i // 50}", "author": "u",
                           "body": f"comment number {i}", "score": i % 13, "created_utc": T + i,
                           "subreddit": "big", "retrieved_on": T + 10**6}) for i in range(n))
    path.write_bytes(zstandard.ZstdCompressor(level=1).compress(b"\n".join(lines) + b"\n"))
    return path


def test_kill_minus_9_of_the_driver_then_rerun_equals_one_clean_run(tmp_path):
    source = _big_file(tmp_path / "big.zst", 300_000)
    env = {**os.environ, "AHF_STORE_FORMAT": "delta"}
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "ahf.cli", "ingest", str(source), "--store", str(clean), "--json"],
                   check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    run = subprocess.Popen([sys.executable, "-m", "ahf.cli", "ingest", str(source), "--store", str(killed),
                            "--batch-rows", "20000", "--json"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once some batches are committed, before the end
        if len(list((killed / "delta" / "comments" / "_delta_log").glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    with Store(killed, read_only=True) as store:  # the last committed version is readable
        committed = store.count("comments")
    assert 0 < committed < 300_000 and committed % 20_000 == 0
    subprocess.run([sys.executable, "-m", "ahf.cli", "ingest", str(source), "--store", str(killed), "--json"],
                   check=True, env=env, capture_output=True)
    assert _rows(killed, "comments") == _rows(clean, "comments")
    assert _rows(killed, "turns") == _rows(clean, "turns")


def test_kill_minus_9_of_a_ray_worker_then_the_run_finishes_the_same(shared_data, ray_cluster, tmp_path, monkeypatch):
    """Ray retries the task of a killed worker: the run completes and equals the local engine's."""
    from ahf.engine import make_engine

    monkeypatch.setenv("AHF_STORE_FORMAT", "delta")
    inputs = [_big_file(tmp_path / f"part{i}.zst", 60_000) for i in range(4)]
    local = tmp_path / "local"
    ingest(inputs, local)
    killed = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            out = subprocess.run(["pgrep", "-f", "ray::ingest_partition"], capture_output=True, text=True).stdout
            for pid in out.split():
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    with make_engine("ray") as engine:
        report = ingest(inputs, tmp_path / "ray", engine=engine)
    killer.join()
    assert killed, "no ingest task was seen running: nothing was killed"
    assert report.ok and report.records_read == report.ingested == 240_000
    assert _rows(tmp_path / "ray", "comments") == _rows(local, "comments")
    assert _rows(tmp_path / "ray", "turns") == _rows(local, "turns")
    # the first file's ids were all new: its task's own files were committed (no row went through the
    # driver); the other three files repeat its ids, so they were upserted ...
    from deltalake import DeltaTable

    first = [Path(u).name for u in DeltaTable(str(tmp_path / "ray" / "delta" / "comments"), version=1).file_uris()]
    assert first and all(name.startswith("part-ahf-") for name in first)
    # ... and a second run of the same files, whose ids are all stored, is upserted: still the same rows
    with make_engine("ray") as engine:
        assert ingest(inputs, tmp_path / "ray", engine=engine).ok
    assert _rows(tmp_path / "ray", "comments") == _rows(local, "comments")


def test_migrate_a_duckdb_store_of_this_release(both, tmp_path, capsys):
    import shutil

    from ahf.cli import main

    store_dir = tmp_path / "store"
    shutil.copytree(both["duckdb"], store_dir)
    expected = {t: _rows(store_dir, t) for t in TABLES}
    assert main(["store", "migrate", "--store", str(store_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "delta" and result["tables"]["comments"] == len(expected["comments"])
    assert is_delta_store(store_dir) and (store_dir / "ahf.duckdb.migrated").exists()
    assert {t: _rows(store_dir, t) for t in TABLES} == expected
    with Store(store_dir, read_only=True) as store:  # the metadata came along
        assert store.meta("labels_config") and store.meta("turns_config")
    label_store(store_dir)  # and every stage goes on from there
    assert _rows(store_dir, "labels") == expected["labels"]
    assert main(["store", "migrate", "--store", str(store_dir)]) == 2  # once
