"""How often the `sentiment` pair rule agrees with the vote rules on the same two siblings (issue 15).

Ingests the shared Reddit files that hold threads with replies (the r/funny tree and the other recorded
API responses, the r/MachineLearning BigQuery thread, the December 2005 Pushshift comment dump, and
the r/AskWomen October 2019 submissions, posts only: they give the API comments their posts) into one
temporary store, labels it with the sentiment rule on, and for each setting of the rule prints how many
sentiment pairs it made, how many sibling pairs it shares with `shp`, `time_adjacent` and either
(`votes`), how many of those choose the same reply, and the agreement rate with its 95 % Wilson
interval; and, over all its pairs, how often the chosen reply also has the higher score (`score_agreement`).
Comment-only dumps carry no post score, so SHP runs with `unknown_post: allow`.

    python bench/sentiment_pairs.py --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from feedback.labels import LabelConfig, label_store  # noqa: E402
from mining.ingest import ingest  # noqa: E402
from mining.store import Store  # noqa: E402

DATA = Path(os.environ.get("AHF_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCES = sorted((DATA / "reddit-api").glob("*.json")) + [
    DATA / "bigquery" / "r_MachineLearning_82ymmx.json",
    DATA / "pushshift" / "RC_2005-12.zst",
    DATA / "pushshift" / "RS_2019-10_AskWomen.zst",
]
BASE = {"shp": {"unknown_post": "allow"}, "sentiment_pairs": {"enabled": True}}


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of a binomial proportion (None for n = 0)."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def config_for(min_replies: int, min_difference: float, prior_replies: float) -> LabelConfig:
    return LabelConfig.model_validate(BASE | {
        "sentiment": {"prior_replies": prior_replies},
        "sentiment_pairs": {"enabled": True, "min_replies": min_replies, "min_difference": min_difference}})


def agreement_row(store: Path, config: LabelConfig) -> dict:
    report = label_store(store, config)
    row = {"min_replies": config.sentiment_pairs.min_replies,
           "min_difference": config.sentiment_pairs.min_difference,
           "prior_replies": config.sentiment.prior_replies,
           "pairs": report.pairs, "sentiment_tiers": report.sentiment_tiers,
           "sentiment_prior": round(report.sentiment_prior, 6)}
    row["score_agreement"] = _score_agreement(store)
    for rule, counts in report.sentiment_vote_agreement.items():
        interval = wilson(counts["agree"], counts["shared"])
        row[rule] = counts | {
            "rate": round(counts["agree"] / counts["shared"], 4) if counts["shared"] else None,
            "wilson95": [round(x, 4) for x in interval] if interval else None}
    return row


def _score_agreement(store: Path) -> dict:
    """Every sentiment pair, vote pair or not: how often its chosen reply also has the higher score
    (pairs with equal scores left out), with the Wilson interval."""
    with Store(store, read_only=True) as s:
        shared, agree = s.rows("SELECT count(*), count(*) FILTER (WHERE chosen_score > rejected_score) FROM pairs "
                               "WHERE rule = 'sentiment' AND chosen_score <> rejected_score")[0]
    interval = wilson(agree, shared)
    return {"shared": shared, "agree": agree, "rate": round(agree / shared, 4) if shared else None,
            "wilson95": [round(x, 4) for x in interval] if interval else None}


def run(min_replies: list[int], min_differences: list[float], prior_replies: list[float]) -> dict:
    with tempfile.TemporaryDirectory(prefix="ahf-sentiment-pairs-") as tmp:
        store = Path(tmp) / "store"
        ingested = ingest(SOURCES, store)
        if not ingested.ok:
            raise SystemExit(f"ingest failed: {ingested.errors}")
        rows = [agreement_row(store, config_for(m, d, k))
                for m, d, k in itertools.product(min_replies, min_differences, prior_replies)]
        return {"sources": [str(p.relative_to(DATA)) for p in SOURCES],
                "turns": ingested.to_dict()["turns"]["turns"], "rows": rows}


def _table(result: dict) -> str:
    lines = [f"{result['turns']:,} turns from {len(result['sources'])} files",
             "min_replies  min_diff  k  sentiment  shp shared/agree  time_adj shared/agree  votes shared/agree  "
             "rate [95% Wilson]  higher score"]
    for r in result["rows"]:
        v = r["votes"]
        interval = "n/a" if v["rate"] is None else f"{v['rate']:.3f} [{v['wilson95'][0]:.3f}, {v['wilson95'][1]:.3f}]"
        lines.append(f"{r['min_replies']:>11}  {r['min_difference']:>8}  {r['prior_replies']:g}  "
                     f"{r['pairs'].get('sentiment', 0):>9}  {r['shp']['shared']:>6}/{r['shp']['agree']:<6}  "
                     f"{r['time_adjacent']['shared']:>11}/{r['time_adjacent']['agree']:<9}  "
                     f"{v['shared']:>9}/{v['agree']:<8}  {interval}  "
                     f"{r['score_agreement']['agree']}/{r['score_agreement']['shared']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-replies", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--min-difference", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--prior-replies", type=float, nargs="+", default=[0.0, 2.0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    result = run(args.min_replies, args.min_difference, args.prior_replies)
    print(json.dumps(result, indent=1) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
