"""Benchmark `ahf serve`: latency of the search and thread pages over a store of about 1M turns.

    python bench/serve.py --data ../shared/data --turns 1000000 [--work DIR] [--out bench/out/serve.json]
    python bench/serve.py --data ../shared/data --store DIR     # only the measurements, on a store built before

The store is bench/index.py's (`make_base_store`: the real labelled check set, WritingPrompts
stories, ELI5 answers and the December 2005 dump; `scaled_store`: its turns repeated under fresh
comment ids up to `--turns`). Here each repeat also becomes a thread of its own (its post, comments,
parents and ancestors are repeated and renamed with it), written in the row order of a real store
(`rethread`). The store is then labelled, indexed (BM25 + dense; HNSW at this size) and tagged, as a user's
would be, and served by the app of `ahf serve` (uvicorn, one process) from a thread on a loopback
port. One client on a keep-alive connection sends the requests one after the other and times each
full response (request, page, transfer):

- `search_text`: /search?act=A&text=T&k=10: bench/index.py's act queries (real post titles asking
  for stories and explanations), after `--warmup` disjoint ones;
- `search_act_only`: /search?act=A&k=10 (the act's turns by confidence, no text);
- `thread`: /thread/ID of `--threads` threads drawn with a fixed seed among those with turns;
  `thread_largest`: the largest thread, `--repeat` times;
- `pairs`: /pairs?rule=R&page=P (R the rule with the most pairs) on pages drawn with a fixed seed;
- anchors in the same run: `ActSearcher.query(act, text, k=10)` alone (what `ahf query` runs, the
  ranking the search page calls) on the same queries, and the thread page's one comments lookup
  (`SELECT ... FROM comments WHERE link_id = ?`) alone on the same threads.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode, urlparse

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bench_index():
    """bench/index.py as a module (its store builders and query set)."""
    spec = importlib.util.spec_from_file_location("bench_index", REPO / "bench" / "index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _renamed(column: str, prefix_len: int = 0) -> str:
    """The repeat's id of an id column: its copy number (4 digits) before the base id, after the
    first `prefix_len` characters ('t1_', 't3_'), so that ids grow with the repeats as Reddit's grow
    with time. The base id is scaled_store's id without its 'x<r>' suffix (copy 0 has none)."""
    keep = f"left({column}, {prefix_len}) || " if prefix_len else ""
    rest = f"substr({column}, {prefix_len + 1})" if prefix_len else column
    return f"{keep}lpad(r::VARCHAR, 4, '0') || {rest}"


def rethread(store: Path, copies: int) -> dict:
    """Make each repeat of scaled_store a thread of its own, in the physical order of a real store.

    scaled_store repeats the turns (copy r > 0 gets the comment id `<id>x<r>`) and keeps the base
    posts and comments. Here the posts and comments are repeated `copies` times too, and every id of
    copy r (comment, post, parent, link, ancestors, children) becomes `<rrrr><base id>`: a thread page
    shows one thread, not every copy of it, and ids grow with the copies as Reddit's grow with time.
    Rows are written in the order the stages write them: turns by post, depth, sibling rank and id
    (`ahf turns`), posts and comments copy after copy in time order (dumps ingested one after the
    other), so DuckDB's zone maps serve lookups as they do on a real store."""
    from mining.store import Store

    with Store(store, read_only=True) as s:
        has_r = s.value("SELECT count(*) FROM information_schema.columns WHERE table_name = 'turns' "
                        "AND column_name = 'r'")
    copy_of = ("r" if has_r else "CASE WHEN t.comment_id IN (SELECT id FROM comments) THEN 0 "
                                 "ELSE CAST(regexp_extract(t.comment_id, 'x(\\d+)$', 1) AS INTEGER) END")
    turns = f"""
        WITH copies AS (SELECT t.* {'EXCLUDE (r)' if has_r else ''}, {copy_of} AS r FROM turns t),
        base AS (SELECT * REPLACE (CASE WHEN r = 0 THEN comment_id
                                        ELSE left(comment_id, length(comment_id) - length('x' || r)) END AS comment_id)
                 FROM copies)
        SELECT * EXCLUDE (r) REPLACE ({_renamed('comment_id')} AS comment_id, {_renamed('post_id')} AS post_id,
            {_renamed('parent_id', 3)} AS parent_id,
            list_transform(ancestor_ids, lambda a: {_renamed('a')}) AS ancestor_ids,
            list_transform(child_ids, lambda a: {_renamed('a')}) AS child_ids)
        FROM base ORDER BY post_id, depth, sibling_rank, comment_id"""
    comments = f"""SELECT * EXCLUDE (r) REPLACE ({_renamed('id')} AS id, {_renamed('link_id', 3)} AS link_id,
                   {_renamed('parent_id', 3)} AS parent_id)
                   FROM comments, range({copies}) AS c(r) ORDER BY r, created_utc, id"""
    posts = (f"SELECT * EXCLUDE (r) REPLACE ({_renamed('id')} AS id) FROM posts, range({copies}) AS c(r) "
             "ORDER BY r, created_utc, id")
    with Store(store) as s:
        s.replace_tables({"turns": turns, "comments": comments, "posts": posts})
        return {t: s.count(t) for t in ("posts", "comments", "turns")} | {
            "threads": s.value("SELECT count(DISTINCT post_id) FROM turns"),
            "turns_without_post": s.value("SELECT count(*) FROM turns WHERE post_id NOT IN (SELECT id FROM posts)"),
            "ancestors_missing": s.value("SELECT count(*) FROM (SELECT unnest(ancestor_ids) AS a FROM turns) "
                                         "WHERE a NOT IN (SELECT id FROM comments)")}


def build(data: Path, work: Path, turns: int, warm_cache: str | None) -> tuple[Path, dict]:
    from feedback.labels import label_store
    from index.acts import tag_acts
    from index.build import build_index
    from index.dense import DenseConfig, cache_dir
    from mining.store import Store

    bench_index = _bench_index()
    seconds: dict = {}
    started = time.perf_counter()
    base = bench_index.make_base_store(data, work)
    with Store(base, read_only=True) as s:
        base_turns = s.count("turns")
    store = bench_index.scaled_store(base, turns, work)
    sizes = rethread(store, -(-turns // base_turns))
    seconds["store"] = time.perf_counter() - started
    for name, step in (("label", lambda: label_store(store)),
                       ("index", lambda: build_index(store, threads=2)),
                       ("acts", lambda: tag_acts(store))):
        if name == "index" and warm_cache:
            shutil.copytree(warm_cache, cache_dir(store / "index", DenseConfig().encoder), dirs_exist_ok=True)
        started = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - started
        print(json.dumps({"built": name, "seconds": round(seconds[name], 1)}), flush=True)
    return store, {**sizes, "build_seconds": {k: round(v, 1) for k, v in seconds.items()}}


def percentiles(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2), "n": len(samples)}


class Client:
    """One keep-alive HTTP connection; `get` times a whole response."""

    def __init__(self, base: str):
        url = urlparse(base)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        self.bytes: list[int] = []

    def get(self, path: str) -> float:
        started = time.perf_counter()
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {body[:300]!r}")
        self.bytes.append(len(body))
        return elapsed

    def timed(self, paths: list[str]) -> dict:
        self.bytes = []
        out = percentiles([self.get(p) for p in paths])
        out["page_kb_median"] = round(float(np.median(self.bytes)) / 1024, 1)
        return out


def measure(store: Path, data: Path, queries: int, warmup: int, threads: int, repeat: int) -> dict:
    from ahf.serve import create_app, running
    from index.checkset import build_checkset
    from mining.store import Store

    checkset = build_checkset(data, max_distractors=0)
    prompts = [p["title"] for p in checkset.posts if p["id"].startswith("wp")]
    questions = [p["title"] for p in checkset.posts if not p["id"].startswith("wp")]
    half, warm = queries // 2, warmup // 2
    measured = [("story", t) for t in prompts[:half]] + [("explanation", t) for t in questions[:queries - half]]
    warming = [("story", t) for t in prompts[half:half + warm]] + [
        ("explanation", t) for t in questions[queries - half:queries - half + warmup - warm]]
    rng = random.Random(0)
    with Store(store, read_only=True) as s:
        posts = [r[0] for r in s.rows("SELECT DISTINCT post_id FROM turns ORDER BY post_id")]
        largest, largest_turns = s.rows("SELECT post_id, count(*) FROM turns GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1")[0]
        rule, rule_pairs = (s.rows("SELECT rule, count(*) FROM pairs GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1")
                            or [(None, 0)])[0]
    sample = rng.sample(posts, min(threads, len(posts)))

    def search(act, text=None):
        return "/search?" + urlencode({"act": act, "k": 10} | ({"text": text} if text else {}))

    result: dict = {"turns_per_largest_thread": largest_turns, "pairs_rule": rule, "pairs_of_rule": rule_pairs}
    started = time.perf_counter()
    app = create_app(store)
    app.state.explorer.warm()
    result["app_load_s"] = round(time.perf_counter() - started, 2)
    load_before = os.getloadavg()
    with running(app) as base:
        client = Client(base)
        client.timed([search(a, t) for a, t in warming])
        pages = {
            "search_text": client.timed([search(a, t) for a, t in measured]),
            "search_act_only": client.timed([search(a) for a, _ in measured]),
            "thread": client.timed([f"/thread/{p}" for p in sample]),
            "thread_largest": client.timed([f"/thread/{largest}"] * repeat),
        }
        if rule:  # the rule with the most pairs
            pages["pairs"] = client.timed([f"/pairs?rule={rule}&page={rng.randint(1, -(-rule_pairs // 20))}"
                                           for _ in range(repeat)])
        client.conn.close()
    explorer = app.state.explorer
    searcher = explorer.searcher
    anchors = {"act_searcher_query": percentiles([_timed(searcher.query, a, t, 10) for a, t in measured])}
    with explorer.reading() as s:
        anchors["comments_lookup_sql"] = percentiles([_timed(
            s.rows, "SELECT id, parent_id, author, body, score, created_utc FROM comments WHERE link_id = $l",
            {"l": f"t3_{p}"}) for p in sample])
    app.close()
    result.update(pages=pages, anchors=anchors, queries=len(measured), warmup_queries=len(warming),
                  threads_sampled=len(sample), load_average_before=[round(x, 2) for x in load_before],
                  load_average_after=[round(x, 2) for x in os.getloadavg()])
    return result


def _timed(call, *args) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--turns", type=int, default=1_000_000)
    parser.add_argument("--store", help="measure an existing store (built by an earlier run with --work)")
    parser.add_argument("--work", help="scratch directory, kept (default: a temporary one, removed)")
    parser.add_argument("--warm-cache", help="an embedding cache (STORE/index/embeddings/<encoder>) to start from")
    parser.add_argument("--queries", type=int, default=200, help="measured search queries (half story, half explanation)")
    parser.add_argument("--warmup", type=int, default=100, help="disjoint search queries answered before measuring")
    parser.add_argument("--threads", type=int, default=200, help="thread pages measured (random threads)")
    parser.add_argument("--repeat", type=int, default=50, help="requests of the largest thread and of pairs pages")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "serve.json"))
    args = parser.parse_args()

    from index.jvm import ensure_jvm

    ensure_jvm()
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}}
    work = None
    if args.store:
        store = Path(args.store)
    else:
        work = Path(args.work or tempfile.mkdtemp(prefix="ahf-bench-serve-"))
        work.mkdir(parents=True, exist_ok=True)
        store, result["store"] = build(Path(args.data), work, args.turns, args.warm_cache)
        print(json.dumps({"store": result["store"]}), flush=True)
    result["store_dir"] = str(store)
    result.update(measure(store, Path(args.data), args.queries, args.warmup, args.threads, args.repeat))
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if work is not None and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
