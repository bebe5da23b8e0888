"""The `sentiment` pair rule and sentiment tiers (feedback.labels, issue 15): exact pairs, margins, tiers
and agreement with the vote rules on a hand-made thread, checked against a plain-Python reference built on
vaderSentiment; the threshold boundary; the reply-count control; export and `ahf label --json`; and
the counts on the shared Reddit data."""

from __future__ import annotations

import json
from itertools import permutations

import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from ahf.cli import main
from ahf.console import UserError
from feedback.export import export_dataset
from feedback.labels import LabelConfig, label_store
from mining.ingest import ingest
from mining.store import Store

T0 = 1_500_000_000

# Top-level turns of p1 (subreddit s1, post score 100): id -> (score, delay s, [(reply body, reply score)]).
# By time A B C E F G; time-adjacent pairs A>B, B>C, F>E, F>G; SHP (written no earlier, 2x score) F>B.
P1 = {
    "A": (10, 100, [("I love this, wonderful.", 5), ("Great answer, thanks!", 1), ("Okay I see.", 1)]),
    "B": (2, 200, [("This is terrible.", 1), ("Awful advice, really bad.", 1), ("Interesting, not sure.", 1)]),
    "C": (1, 300, [("Good point.", 1), ("Okay I see.", 1)]),
    "E": (5, 400, [("Wonderful! I love it, best answer ever!", 1)]),  # one very warm reply
    "F": (6, 500, [("Good point.", 1)] * 4 + [("Thanks.", 1)] * 4),  # eight mildly warm ones
    "G": (4, 600, []),
}
# p2 (subreddit s2, post score 50): a second tier group.
P2 = {
    "H": (3, 100, [("Nice, thanks.", 1), ("Great answer, thanks!", 1)]),
    "I": (2, 200, [("Fine.", 1), ("Okay I see.", 1)]),
}
THREADS = {"p1": ("s1", 100, P1), "p2": ("s2", 50, P2)}
ON = {"sentiment_pairs": {"enabled": True}}


def write_fixture(path):
    records = []
    for post, (sub, score, turns) in THREADS.items():
        records.append({"id": post, "title": f"Question {post}?", "selftext": "", "author": "op", "score": score,
                        "created_utc": T0, "subreddit": sub, "over_18": False, "num_comments": 0})
        for tid, (tscore, delay, replies) in turns.items():
            records.append({"id": tid, "link_id": f"t3_{post}", "parent_id": f"t3_{post}", "author": f"u_{tid}",
                            "body": f"Answer {tid}: here is what I think about it.", "score": tscore,
                            "created_utc": T0 + delay, "subreddit": sub})
            for k, (body, rscore) in enumerate(replies):
                records.append({"id": f"{tid}r{k}", "link_id": f"t3_{post}", "parent_id": f"t1_{tid}",
                                "author": f"u_{tid}r{k}", "body": body, "score": rscore,
                                "created_utc": T0 + delay + 10 + k, "subreddit": sub})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture()
def store(tmp_path):
    report = ingest([write_fixture(tmp_path / "fixture.ndjson")], tmp_path / "store")
    assert report.ok
    return tmp_path / "store"


def reference(config: LabelConfig) -> tuple[dict, dict, float]:
    """Plain Python from the fixture and vaderSentiment: {(chosen, rejected): margin}, {turn: sentiment tier}
    and the prior."""
    vader = SentimentIntensityAnalyzer()
    floor = config.sentiment.weight_floor
    turns = {tid: (post, sub, replies) for post, (sub, _, ts) in THREADS.items() for tid, (_, _, replies) in ts.items()}
    weighted, n = {}, {}
    for tid, (_, _, replies) in turns.items():
        if replies:
            weights = [max(score, floor) for _, score in replies]
            compounds = [vader.polarity_scores(body)["compound"] for body, _ in replies]
            weighted[tid] = sum(w * c for w, c in zip(weights, compounds)) / sum(weights)
            n[tid] = len(replies)
    prior = sum(weighted.values()) / len(weighted)
    k = config.sentiment.prior_replies
    shrunk = {t: (n[t] * weighted[t] + k * prior) / (n[t] + k) for t in weighted}
    rule = config.sentiment_pairs
    pairs = {(a, b): shrunk[a] - shrunk[b] for a, b in permutations(shrunk, 2)
             if turns[a][0] == turns[b][0] and min(n[a], n[b]) >= rule.min_replies
             and shrunk[a] - shrunk[b] >= rule.min_difference}
    tiers = {}
    lo, hi = config.sentiment_tiers.tier_quantiles
    for sub in ("s1", "s2"):
        group = {t: s for t, s in shrunk.items() if turns[t][1] == sub and n[t] >= config.sentiment_tiers.min_replies}
        q_lo, q_hi = np.quantile(list(group.values()), [lo, hi])
        tiers |= {t: "bad" if s < q_lo else "good" if s > q_hi else "ok" for t, s in group.items()}
    return pairs, tiers, prior


def _sentiment_pairs(store) -> dict:
    with Store(store, read_only=True) as s:
        rows = s.rows("SELECT chosen_id, rejected_id, margin FROM pairs WHERE rule = 'sentiment'")
    return {(c, r): m for c, r, m in rows}


def _vote_pairs(store) -> list:
    with Store(store, read_only=True) as s:
        return s.rows("SELECT * FROM pairs WHERE rule <> 'sentiment' ORDER BY post_id, rule, chosen_id, rejected_id")


def test_pairs_tiers_and_prior_match_the_reference(store):
    config = LabelConfig.model_validate(ON)
    report = label_store(store, config)
    pairs, tiers, prior = reference(config)
    # A (warm), B (cold), C and F (mild) have >= 2 replies; E has one (too few), G none.
    assert sorted(pairs) == [("A", "B"), ("C", "B"), ("F", "B"), ("H", "I")]
    got = _sentiment_pairs(store)
    assert sorted(got) == sorted(pairs)  # a swap of chosen and rejected fails here
    for key, margin in pairs.items():
        assert got[key] == pytest.approx(margin, abs=1e-12) and margin > 0
    assert report.sentiment_prior == pytest.approx(prior, abs=1e-12)
    with Store(store, read_only=True) as s:
        stored = dict(s.rows("SELECT comment_id, sentiment_tier FROM labels WHERE sentiment_tier IS NOT NULL"))
        post_of = dict(s.rows("SELECT chosen_id, post_id FROM pairs WHERE rule = 'sentiment'"))
    assert stored == tiers == {"A": "good", "B": "bad", "C": "ok", "F": "ok", "H": "good", "I": "bad"}
    assert report.sentiment_tiers == {"bad": 2, "good": 2, "ok": 2}
    assert post_of == {"A": "p1", "C": "p1", "F": "p1", "H": "p2"}
    assert report.pairs["sentiment"] == 4


def test_margin_boundary(store):
    """Just under the sentiment difference of C over B gives no pair; just over gives it."""
    difference = reference(LabelConfig.model_validate(ON))[0][("C", "B")]
    for step, expected in ((1e-9, False), (-1e-9, True)):
        config = LabelConfig.model_validate({"sentiment_pairs": {"enabled": True, "min_difference": difference + step}})
        label_store(store, config)
        assert (("C", "B") in _sentiment_pairs(store)) is expected
        assert _sentiment_pairs(store).keys() == reference(config)[0].keys()


def test_reply_count_control(store):
    """E's one reply (0.93) is warmer than F's eight (0.44 each). Without shrinkage and with one reply
    allowed, E beats F by 0.49; shrunk toward the store's mean, one reply is not enough evidence."""
    raw = LabelConfig.model_validate({"sentiment_pairs": {"enabled": True, "min_replies": 1},
                                      "sentiment": {"prior_replies": 0}})
    label_store(store, raw)
    assert _sentiment_pairs(store)[("E", "F")] == pytest.approx(0.9285 - 0.4404, abs=1e-12)
    shrunk = LabelConfig.model_validate({"sentiment_pairs": {"enabled": True, "min_replies": 1}})
    label_store(store, shrunk)
    got = _sentiment_pairs(store)
    assert ("E", "F") not in got and got.keys() == reference(shrunk)[0].keys()
    label_store(store, LabelConfig.model_validate(ON))  # the default min_replies (2) leaves E out entirely
    assert not any("E" in key for key in _sentiment_pairs(store))


def test_vote_pairs_unchanged_and_agreement(store):
    label_store(store, LabelConfig())
    votes_only = _vote_pairs(store)
    assert not _sentiment_pairs(store)
    report = label_store(store, LabelConfig.model_validate(ON))
    assert _vote_pairs(store) == votes_only  # the vote rules' rows are the same, row for row
    vote = {(r[2], r[3]): r[4] for r in votes_only if r[1] == "t3_p1"}
    adjacent = {k for k, rule in vote.items() if rule == "time_adjacent"}
    assert adjacent >= {("A", "B"), ("B", "C"), ("F", "E"), ("F", "G")}
    assert ("F", "B") in vote and vote[("F", "B")] == "shp"
    # A>B: both say so (time-adjacent); B>C by votes, C>B by sentiment; F>B: both (SHP); H>I: both (time-adjacent)
    expected = {"shp": {"shared": 1, "agree": 1}, "time_adjacent": {"shared": 3, "agree": 2},
                "votes": {"shared": 4, "agree": 3}}
    assert report.sentiment_vote_agreement == expected
    sentiment = _sentiment_pairs(store)  # and the same from the stored rows, in Python
    for rule in expected:
        made = {(r[2], r[3]) for r in votes_only if rule in (r[4], "votes")}
        assert {"shared": sum((c, r) in sentiment or (r, c) in sentiment for c, r in made),
                "agree": sum((c, r) in sentiment for c, r in made)} == expected[rule]


def test_export_sentiment_pairs_and_tiers(store, tmp_path):
    label_store(store, LabelConfig.model_validate(ON))
    config = LabelConfig.model_validate({"export": {"rules": ["sentiment"], "tier_source": "sentiment"}}).export
    export_dataset(store, "pairs", tmp_path / "pairs", config=config)
    rows = [json.loads(line) for split in config.splits for line in (tmp_path / "pairs" / f"{split}.jsonl").open()]
    assert {(r["chosen_id"], r["rejected_id"]): r["margin"] for r in rows} == _sentiment_pairs(store)
    assert {r["rule"] for r in rows} == {"sentiment"} and rows[0]["prompt"].startswith("Question p")
    export_dataset(store, "pointwise", tmp_path / "pointwise", config=config)
    rows = [json.loads(line) for split in config.splits for line in (tmp_path / "pointwise" / f"{split}.jsonl").open()]
    assert {r["comment_id"]: r["tier"] for r in rows} == reference(LabelConfig())[1]
    assert all(r["label"] == (r["tier"] == "good") for r in rows)
    votes = LabelConfig().export
    exported = export_dataset(store, "pointwise", tmp_path / "votes", config=votes)  # the default: vote tiers
    rows = [json.loads(line) for split in votes.splits for line in (tmp_path / "votes" / f"{split}.jsonl").open()]
    with Store(store, read_only=True) as s:
        tiers = dict(s.rows("SELECT comment_id, tier FROM labels WHERE tier IS NOT NULL"))
    assert all(tiers[r["comment_id"]] == r["tier"] for r in rows)
    assert len(rows) == len(tiers) - exported.dropped["duplicate"] and exported.dropped["duplicate"] == 6  # F's copies


def test_label_json_carries_the_agreement(store, capsys):
    assert main(["label", "--store", str(store), "--set", "sentiment_pairs.enabled=true", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pairs"]["sentiment"] == 4 and out["sentiment_vote_agreement"]["votes"] == {"shared": 4, "agree": 3}
    assert main(["label", "--store", str(store), "--json"]) == 0  # off by default
    out = json.loads(capsys.readouterr().out)
    assert "sentiment" not in out["pairs"] and out["sentiment_vote_agreement"]["votes"] == {"shared": 0, "agree": 0}


def test_shared_data_counts(shared_data, tmp_path):
    """The figures of docs/feedback.md ("Sentiment pairs"): every shared file with threads, one store,
    the default rule switched on (as bench/sentiment_pairs.py runs it)."""
    sources = sorted((shared_data / "reddit-api").glob("*.json")) + [
        shared_data / "bigquery" / "r_MachineLearning_82ymmx.json", shared_data / "pushshift" / "RC_2005-12.zst",
        shared_data / "pushshift" / "RS_2019-10_AskWomen.zst"]
    assert ingest(sources, tmp_path / "store").ok
    config = LabelConfig.model_validate(ON | {"shp": {"unknown_post": "allow"}})
    report = label_store(tmp_path / "store", config)
    assert report.turns == 1806 and report.turns_with_replies == 461
    assert report.pairs == {"sentiment": 41, "shp": 38, "time_adjacent": 322}
    assert report.sentiment_tiers == {"bad": 36, "good": 36, "ok": 38}
    assert report.sentiment_vote_agreement == {"shp": {"shared": 4, "agree": 4},
                                               "time_adjacent": {"shared": 7, "agree": 5},
                                               "votes": {"shared": 11, "agree": 9}}
    # every sentiment pair re-checked from the stored labels: siblings, enough replies, the shrunk difference
    k, prior = config.sentiment.prior_replies, report.sentiment_prior
    with Store(tmp_path / "store", read_only=True) as s:
        rows = s.rows("""SELECT p.margin, c.parent_id = r.parent_id, lc.reply_count, lc.reply_sentiment_weighted,
                                lr.reply_count, lr.reply_sentiment_weighted
                         FROM pairs p JOIN turns c ON c.comment_id = p.chosen_id
                         JOIN turns r ON r.comment_id = p.rejected_id
                         JOIN labels lc ON lc.comment_id = p.chosen_id JOIN labels lr ON lr.comment_id = p.rejected_id
                         WHERE p.rule = 'sentiment'""")
    assert len(rows) == 41
    for margin, siblings, nc, sc, nr, sr in rows:
        assert siblings and min(nc, nr) >= 2
        assert margin == pytest.approx((nc * sc + k * prior) / (nc + k) - (nr * sr + k * prior) / (nr + k), abs=1e-12)
        assert margin >= 0.25


def test_serve_lists_and_downloads_sentiment_pairs(store, tmp_path):
    """`ahf serve`'s pairs page reads the rules from the store; its download is `ahf export`'s rows. Exported
    beside the vote rules, a pair a vote rule also made keeps its larger margin (the export's duplicate rule):
    here the vote pair's, so only C>B (the votes say B>C) stays a sentiment row."""
    from ahf.serve.explore import Explorer

    label_store(store, LabelConfig.model_validate(ON))
    for rules, expected in ((["sentiment"], set(_sentiment_pairs(store))),
                            (["shp", "time_adjacent", "sentiment"], {("C", "B")})):
        export = LabelConfig.model_validate({"export": {"rules": rules}}).export
        explorer = Explorer(store, export_config=export)
        assert explorer.summary.pairs["sentiment"] == 4
        page = explorer.pairs_page("sentiment", None, 1)
        assert {(r["chosen_id"], r["rejected_id"]) for r in page["rows"]} == set(_sentiment_pairs(store))
        body, count = explorer.export_rows("pairs", explorer.pair_ids("sentiment", None), ["sentiment"])
        served = {(r["chosen_id"], r["rejected_id"]) for r in map(json.loads, body.read().splitlines())}
        out = tmp_path / "-".join(rules)
        export_dataset(store, "pairs", out, config=export)
        exported = {(r["chosen_id"], r["rejected_id"]) for split in export.splits
                    for r in map(json.loads, (out / f"{split}.jsonl").open()) if r["rule"] == "sentiment"}
        assert served == exported == expected and count == len(expected)


def test_sentiment_tiers_from_an_older_store_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AHF_STORE_FORMAT", "duckdb")  # an older release's store: a DuckDB file, edited in place below
    store = tmp_path / "store"
    assert ingest([write_fixture(tmp_path / "fixture.ndjson")], store).ok
    label_store(store, LabelConfig())
    with Store(store) as s:  # labels written before the column existed
        s.con.execute("ALTER TABLE labels DROP COLUMN sentiment_tier")
    config = LabelConfig.model_validate({"export": {"tier_source": "sentiment"}}).export
    with pytest.raises(UserError, match=r"tier_source: sentiment: .* no sentiment_tier column .*`ahf label --store"):
        export_dataset(store, "pointwise", tmp_path / "out", config=config)
    assert export_dataset(store, "pointwise", tmp_path / "votes").rows  # the vote tiers still export
