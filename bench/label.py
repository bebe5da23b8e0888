"""Benchmark `ahf label` at about 1M turns, next to the bare vaderSentiment rate on the same comments.

The large store repeats the real data (the r/funny tree with its post, and the December 2005 dump)
under fresh ids. Two variants of the reply texts:

- `repeated`: the copies keep their texts, as reposts and "this" / "lol" replies do; the labeller
  scores each distinct text once, so sentiment costs almost nothing.
- `unique`: every copy's bodies get a distinct, sentiment-free suffix (" ~<copy>"), so every reply
  text is new and goes through VADER: the worst case for the cache.

In the same run it times `vaderSentiment.SentimentIntensityAnalyzer.polarity_scores` (one core)
and `feedback.sentiment.Vader.score` (one core, no cache) on a sample of those reply texts, and
checks that both give identical compound scores on the sample.

    python bench/label.py --turns 1000000 --workers 2 --doc docs/bench/label.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The DuckDB-file store: this benchmark grows its store by ATTACHing a seed's ahf.duckdb, and its anchors
# in docs/bench were measured on that format (bench/scale.py compares it with Delta, the default).
os.environ.setdefault("AHF_STORE_FORMAT", "duckdb")
sys.path.insert(0, str(REPO))

from feedback.labels import LabelConfig, label_store  # noqa: E402
from feedback.sentiment import Vader  # noqa: E402
from mining.ingest import ingest  # noqa: E402
from mining.store import Store  # noqa: E402
from mining.turns import build_turns  # noqa: E402

DATA = Path(os.environ.get("AHF_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCES = [DATA / "reddit-api" / "TestCommentForest.test_replace__all.json", DATA / "pushshift" / "RC_2005-12.zst"]


def build_large_store(seed_dir: Path, big_dir: Path, copies: int, unique: bool) -> dict:
    """Copy the seed store `copies` times under fresh ids (`<id>x<k>`)."""
    started = time.perf_counter()
    suffix_body = "CASE WHEN body IN ('[deleted]', '[removed]') THEN body ELSE body || ' ~' || k END" \
        if unique else "body"
    with Store(big_dir) as big:
        big.con.execute(f"ATTACH '{seed_dir / 'ahf.duckdb'}' AS seed (READ_ONLY)")
        big.con.execute(f"""
            INSERT INTO comments
            SELECT id || 'x' || k, link_id || 'x' || k, parent_id || 'x' || k, author, {suffix_body},
                   score, created_utc, subreddit, distinguished, stickied, retrieved_utc
            FROM seed.comments, range({copies}) r(k)""")
        big.con.execute(f"""
            INSERT INTO posts
            SELECT id || 'x' || k, title, selftext, author, score, created_utc, subreddit, over_18,
                   num_comments, link_flair_text, url, retrieved_utc
            FROM seed.posts, range({copies}) r(k)""")
        big.con.execute("DETACH seed")
    built = time.perf_counter() - started
    turns = build_turns(big_dir)
    return {"copies": copies, "comments": turns.comments, "turns": turns.turns,
            "store_s": round(built, 1), "turns_s": round(turns.seconds, 1)}


def vader_rates(big_dir: Path, sample: int) -> dict:
    """Bare vaderSentiment vs feedback.sentiment (one core each, no cache) on sampled reply texts."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    with Store(big_dir, read_only=True) as s:
        texts = [r[0] for r in s.con.execute(
            "SELECT body FROM comments WHERE body NOT IN ('[deleted]', '[removed]') "
            f"USING SAMPLE reservoir({sample} ROWS) REPEATABLE (1)").fetchall()]
    words = sum(len(t.split()) for t in texts) / len(texts)
    reference = SentimentIntensityAnalyzer()
    # CPU time of this (single-threaded) loop: unlike wall time it hardly depends on other jobs.
    t0 = time.process_time()
    ref = [reference.polarity_scores(t)["compound"] for t in texts]
    t_ref = time.process_time() - t0
    fast = Vader(cache_size=0)
    t0 = time.process_time()
    ours = [fast.score(t) for t in texts]
    t_fast = time.process_time() - t0
    return {"sample": len(texts), "mean_words": round(words, 1),
            "vaderSentiment_per_cpu_s": round(len(texts) / t_ref),
            "fast_uncached_per_cpu_s": round(len(texts) / t_fast),
            "speedup": round(t_ref / t_fast, 1), "identical": ref == ours}


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_descendants(kid)]
    return out


class TreeMemory:
    """Peak resident memory of this process plus its worker processes, sampled every 50 ms."""

    def __init__(self):
        self.peak_total_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.wait(0.05):
            total = _rss_kb(me) + sum(_rss_kb(p) for p in _descendants(me))
            self.peak_total_kb = max(self.peak_total_kb, total)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def peak_rss_mb(tree: TreeMemory) -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"main_peak_rss_mb": round(own), "peak_total_rss_mb": round(tree.peak_total_kb / 1024)}


def label_once(big: Path, workers: int, sample: int) -> dict:
    config = LabelConfig.model_validate({"sentiment": {"workers": workers}})
    cpu_before = _cpu_seconds()
    with TreeMemory() as tree:
        report = label_store(big, config)
    cpu = _cpu_seconds() - cpu_before
    # CPU time of this process and its (finished) workers: on a shared machine the wall-clock rate
    # depends on the other jobs, turns per CPU-second does much less.
    return {"label": report.to_dict(), **peak_rss_mb(tree), "cpu_s": round(cpu, 1),
            "turns_per_cpu_s": round(report.turns / cpu), "vader": vader_rates(big, sample)}


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(turns_goal: int, workers: int, modes: list[str], sample: int, workdir: Path,
        existing: Path | None = None) -> dict:
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "processor": platform.processor() or platform.machine(),
                           "load_avg_before": [round(x, 1) for x in os.getloadavg()]},
               "runs": {}}
    if existing is not None:  # label a store built earlier (e.g. kept with --workdir)
        results["runs"][existing.name] = {"store": {"path": str(existing)}, **label_once(existing, workers, sample)}
        modes = []
    else:
        seed = workdir / "seed"
        loaded = ingest(SOURCES, seed)
        assert loaded.ok
        results["turns_per_copy"] = per_copy = loaded.turns.turns
        copies = max(1, round(turns_goal / per_copy))
    for mode in modes:
        big = workdir / f"big_{mode}"
        store = build_large_store(seed, big, copies, unique=(mode == "unique"))
        results["runs"][mode] = {"store": store, **label_once(big, workers, sample)}
    results["machine"]["load_avg_after"] = [round(x, 1) for x in os.getloadavg()]
    return results


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["| variant | turns | distinct reply texts | label s (wall) | turns/s (wall) | CPU s | turns per CPU-s "
             "| peak RSS while labelling (all processes) | bench process peak RSS (incl. store build) "
             "| vaderSentiment texts per CPU-s | ours, uncached | speedup | identical |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for mode, r in results["runs"].items():
        lab, v = r["label"], r["vader"]
        lines.append(f"| {mode} | {lab['turns']:,} | {lab['distinct_texts']:,} | {lab['seconds']:.1f} | "
                     f"{lab['turns_per_s']:,.0f} | {r['cpu_s']:.1f} | {r['turns_per_cpu_s']:,} | "
                     f"{r['peak_total_rss_mb']:,} MB | {r['main_peak_rss_mb']:,} MB | "
                     f"{v['vaderSentiment_per_cpu_s']:,} | {v['fast_uncached_per_cpu_s']:,} | {v['speedup']}x | "
                     f"{v['identical']} |")
    lines += ["", f"Machine: {m['cpus']} CPUs ({m['processor']}), Python {m['python']}; "
              f"load average before {m['load_avg_before']}, after {m['load_avg_after']} "
              "(other jobs shared the machine)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="repeated,unique")
    parser.add_argument("--sample", type=int, default=20_000, help="texts for the one-core VADER comparison")
    parser.add_argument("--workdir", help="where the large stores go and stay (default: a temp dir, removed)")
    parser.add_argument("--store", help="label this existing store instead of building one")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ahf-bench-label-"))
    try:
        results = run(args.turns, args.workers, args.modes.split(","), args.sample, workdir,
                      Path(args.store) if args.store else None)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=1))
    print(to_markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
