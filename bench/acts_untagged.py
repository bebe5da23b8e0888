#!/usr/bin/env python
"""Act recall when prompts lose their tags: the check set with `[WP]`-style tags and `ELI5` removed
from the titles of a fraction of the posts, tagged with the weak-label classifier off and on.

    python bench/acts_untagged.py --fraction 0.5 --weights 0 0.3 0.6 [--work DIR] [--warm-cache CACHE]

The posts to untag are chosen by a hash of the post id (the same ones on every run). The store
and indexes are built once; each weight re-tags it. Prints one JSON object per weight: act
counts, the classifier's report, recall of story / explanation on untagged and tagged prompts,
precision@50, and how many unlabelled 2005 comments were tagged story / explanation.
`--warm-cache` copies an embedding cache (STORE/index/embeddings) in, so nothing is re-encoded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TAG = re.compile(r"^\s*[\[(]\s*\w\w\s*[\])]\s*")
ELI5 = re.compile(r"(?i)\beli5\b[:\s-]*")


def build(data: Path, work: Path, fraction: float, warm_cache: str | None) -> tuple[Path, set[str]]:
    from index.build import build_index
    from index.checkset import build_checkset, write_checkset
    from mining.ingest import ingest

    checkset = build_checkset(data)
    untagged = set()
    for post in checkset.posts:
        if zlib.crc32(post["id"].encode()) % 1000 < fraction * 1000:
            post["title"] = ELI5.sub("", TAG.sub("", post["title"]))
            untagged.add(post["id"])
    write_checkset(checkset, work / "checkset")
    store = work / "store"
    ingest([work / "checkset" / "RS_checkset.ndjson", work / "checkset" / "RC_checkset.ndjson"], store)
    if warm_cache:
        shutil.copytree(warm_cache, store / "index" / "embeddings")
    build_index(store, threads=2)
    return store, untagged


def measure(store: Path, labels: dict[str, str], untagged: set[str], weight: float, labels_path: Path) -> dict:
    from index.acts import load_acts_config, tag_acts
    from index.evaluate import eval_acts
    from mining.store import Store

    report = tag_acts(store, load_acts_config(None, [f"weights.classifier={weight}"]))
    with Store(store, read_only=True) as s:
        rows = s.con.sql("SELECT a.comment_id, a.act, t.post_id FROM acts a JOIN turns t USING (comment_id)").fetchall()
    out = {"weight": weight, "acts": report.counts, "classifier": report.classifier}
    for act in ("story", "explanation"):
        for part, wanted in (("untagged", True), ("tagged", False)):
            got = [tag for cid, tag, post in rows if labels.get(cid) == act and (post in untagged) == wanted]
            out[f"{act}_recall_{part}"] = {"recall": round(sum(t == act for t in got) / max(len(got), 1), 3),
                                           "of": len(got)}
        out[f"other_tagged_{act}"] = sum(1 for cid, tag, _ in rows if tag == act and labels.get(cid) == "other")
    evaluated = eval_acts(store, labels_path, k=50)["acts"]
    out["precision_at_50"] = {a: evaluated[a]["precision_at_50"] for a in ("story", "explanation")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--fraction", type=float, default=0.5, help="share of posts whose title loses its tag")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--work", help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--warm-cache", help="an embedding cache dir to start from")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ahf-acts-untagged-"))
    work.mkdir(parents=True, exist_ok=True)
    store, untagged = build(Path(args.data), work, args.fraction, args.warm_cache)
    labels_path = work / "checkset" / "labels.json"
    labels = json.loads(labels_path.read_text())
    for weight in args.weights:
        print(json.dumps(measure(store, labels, untagged, weight, labels_path)), flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
