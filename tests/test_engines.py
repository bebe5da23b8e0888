"""The same pipeline on both engines (issue 13): a real local Ray cluster (2 CPUs on loopback, one per
test session: the `ray_cluster` fixture) against the local engine, on the real files, row for row.

Partitions are made small so that every stage really splits its work: several files for the ingest,
several partitions of threads for turns, text cues, labels and exports.
"""

from __future__ import annotations

import json
import math

import orjson
import pytest

from ahf.engine import make_engine
from feedback.export import export_dataset
from feedback.labels import LabelConfig, label_store
from index.acts import load_acts_config, tag_acts
from index.build import build_index
from index.dense import DenseConfig
from mining.ingest import ingest
from mining.store import Store
from mining.turns import TurnConfig, build_turns

INPUTS = ["pushshift/RC_2005-12.zst", "pushshift/RS_2019-10_AskWomen.zst",
          "reddit-api/TestCommentForest.test_replace__all.json", "pushshift/schema-drift"]
TABLES = {"comments": "id", "posts": "id", "turns": "comment_id", "acts": "comment_id",
          "labels": "comment_id", "pairs": "post_id, rule, chosen_id, rejected_id"}
SMALL = {"turns": TurnConfig(partition_comments=400),
         "labels": LabelConfig.model_validate({"partition_turns": 300, "export": {"partition_turns": 300}}),
         "acts": load_acts_config(overrides=["partition_turns=300"])}


def _run(engine_name: str, shared_data, out):
    store = out / "store"
    with make_engine(engine_name) as engine:
        report = ingest([shared_data / p for p in INPUTS], store, turn_config=SMALL["turns"], engine=engine)
        if engine_name == "ray":  # BM25 as Lucene shards, one Ray task each: the act tags must not change
            assert build_index(store, DenseConfig(bm25_shards=3), engine=engine, dense=False)["bm25"]["shards"] == 3
        # the dense side is the index stage's (tests/test_dense_scale.py): one local build each
        build_index(store, bm25=engine_name == "local")
        tags = tag_acts(store, SMALL["acts"], engine=engine)
        labels = label_store(store, SMALL["labels"], engine=engine)
        exports = {fmt: export_dataset(store, fmt, out / fmt, config=SMALL["labels"].export, engine=engine)
                   for fmt in ("pairs", "pointwise", "sft")}
        workers = engine.workers
    return {"store": store, "out": out, "ingest": report, "tags": tags, "labels": labels, "exports": exports,
            "workers": workers}


@pytest.fixture(scope="module", params=["delta", "duckdb"])
def runs(request, shared_data, ray_cluster, tmp_path_factory):
    """Both engines on each store format: Delta (the default; a Ray ingest commits its tasks' own files) and
    the DuckDB file (the driver writes every row)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AHF_STORE_FORMAT", request.param)
        return {name: _run(name, shared_data, tmp_path_factory.mktemp(f"{name}-{request.param}"))
                for name in ("local", "ray")}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=0, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_is_the_same_row_for_row(runs, table):
    rows = {}
    for name, run in runs.items():
        with Store(run["store"], read_only=True) as store:
            rows[name] = store.rows(f"SELECT * FROM {table} ORDER BY {TABLES[table]}")
    assert rows["local"], f"{table} is empty: the comparison would prove nothing"
    assert len(rows["local"]) == len(rows["ray"])
    different = [(a, b) for a, b in zip(rows["local"], rows["ray"]) if not _same(a, b)]
    assert different == []


def test_the_accounting_is_the_same(runs):
    local, ray = runs["local"], runs["ray"]
    assert ray["workers"] == 2  # the Ray engine really ran on the session's 2-CPU cluster
    for report in (local["ingest"], ray["ingest"]):
        assert report.records_read == report.ingested + sum(report.skipped.values())
    assert [f.path for f in local["ingest"].files] == [f.path for f in ray["ingest"].files]
    for a, b in zip(local["ingest"].files, ray["ingest"].files):
        assert (a.records_read, a.ingested, dict(a.skipped), a.skip_examples, a.error) == \
               (b.records_read, b.ingested, dict(b.skipped), b.skip_examples, b.error)
    assert local["ingest"].turns.to_dict() | {"seconds": 0} == ray["ingest"].turns.to_dict() | {"seconds": 0}
    assert local["tags"].counts == ray["tags"].counts
    for key in ("turns", "labelled", "tiers", "pairs", "replies_scored", "distinct_texts", "turns_with_replies"):
        assert getattr(local["labels"], key) == getattr(ray["labels"], key), key
    assert local["labels"].partitions == ray["labels"].partitions > 1


@pytest.mark.parametrize("fmt", ["pairs", "pointwise", "sft"])
def test_exports_have_the_same_rows_and_splits(runs, fmt):
    local, ray = runs["local"]["exports"][fmt], runs["ray"]["exports"][fmt]
    assert (local.rows, local.dropped, local.posts) == (ray.rows, ray.dropped, ray.posts)
    assert sum(local.rows.values()) > 0
    for split in local.rows:
        rows = [[orjson.loads(line) for line in (run["out"] / fmt / f"{split}.jsonl").read_bytes().splitlines()]
                for run in (runs["local"], runs["ray"])]
        assert _same(rows[0], rows[1]), split


def test_a_thread_split_over_two_files_is_rebuilt_whole(shared_data, ray_cluster, tmp_path):
    """Monthly dumps split threads: the comments of each thread spread over two files, ingested in one
    run or in two, give the turns of a single-file ingest, on both engines."""
    lines = [line for line in (shared_data / "reddit-api" / "TestCommentForest.test_replace__all.json").read_bytes()
             .splitlines()]
    assert lines  # the r/funny tree, as an API cassette (one document)
    whole = tmp_path / "whole"
    ingest([shared_data / "pushshift" / "RC_2005-12.zst"], whole)
    with Store(whole, read_only=True) as store:
        comments = store.arrow("SELECT * FROM comments ORDER BY id").to_pylist()
    halves = [tmp_path / "odd.ndjson", tmp_path / "even.ndjson"]  # every thread has comments in both
    for i, path in enumerate(halves):
        path.write_bytes(b"".join(orjson.dumps({**c, "retrieved_on": c.pop("retrieved_utc")}) + b"\n"
                                  for c in comments[i::2]))
    expected = _turns(whole)
    for engine_name in ("local", "ray"):
        with make_engine(engine_name) as engine:
            one_run = tmp_path / f"one-run-{engine_name}"
            ingest(halves, one_run, turn_config=SMALL["turns"], engine=engine)
            two_runs = tmp_path / f"two-runs-{engine_name}"
            ingest(halves[:1], two_runs, engine=engine)
            ingest(halves[1:], two_runs, rebuild=False, engine=engine)
            build_turns(two_runs, SMALL["turns"], engine=engine)
        assert _turns(one_run) == expected and _turns(two_runs) == expected, engine_name


def _turns(store_dir) -> list:
    with Store(store_dir, read_only=True) as store:
        return store.rows("SELECT * EXCLUDE (subreddit) FROM turns ORDER BY comment_id")


def test_cli_json_stays_clean_with_the_ray_engine(runs, capsys):
    from ahf.cli import main

    assert main(["label", "--store", str(runs["ray"]["store"]), "--engine", "ray", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # one JSON object: Ray's logs went elsewhere
    assert result["turns"] == runs["ray"]["labels"].turns


def test_a_ray_engine_leaves_the_jvms_signal_handlers_first():
    """`ray.init` enables Python's faulthandler; started after the JVM (a Lucene index in the same process)
    it would catch the JVM's own SIGSEGVs (implicit null checks) and abort the process. The engine puts the
    handlers back; a process of its own, since this session's Ray is already up."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import faulthandler; from ahf.engine import RayEngine; "
            "assert not faulthandler.is_enabled(); engine = RayEngine(num_cpus=1); "
            "print('enabled' if faulthandler.is_enabled() else 'kept'); engine.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1], env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "kept"
