"""Evidence on the real data: the complete r/funny tree (one post, 541 comments) and the December
2005 Pushshift dump (comments only). Every pair is checked against the rules from the raw
`comments` / `posts` rows, SHP's top-5 selection against a pure-Python recomputation, and tiers
and reply sentiment on threads checked by hand."""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import permutations

import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from feedback.export import export_dataset
from feedback.labels import LabelConfig
from mining.store import Store

FUNNY = "reddit-api/TestCommentForest.test_replace__all.json"
RC_2005 = "pushshift/RC_2005-12.zst"
DUMP_CONFIG = LabelConfig.model_validate({"shp": {"unknown_post": "allow", "top_level_only": False}})


@pytest.fixture(scope="module")
def funny(labelled_real):
    return labelled_real("funny", FUNNY)


@pytest.fixture(scope="module")
def dump(labelled_real):
    return labelled_real("dump", RC_2005, DUMP_CONFIG)


def _raw(store):
    """comment id -> raw row, post id -> score, and the set of turn ids, straight from the store."""
    with Store(store, read_only=True) as s:
        comments = {r[0]: {"parent_id": r[1], "link_id": r[2], "score": r[3], "created": r[4]}
                    for r in s.con.execute("SELECT id, parent_id, link_id, score, created_utc FROM comments").fetchall()}
        posts = dict(s.con.execute("SELECT id, score FROM posts").fetchall())
        turns = {r[0] for r in s.con.execute("SELECT comment_id FROM turns").fetchall()}
        pairs = s.con.execute("SELECT rule, post_id, chosen_id, rejected_id, margin FROM pairs").fetchall()
    return comments, posts, turns, pairs


def _shp_reference(comments, posts, turns, config):
    """Every pair the SHP rule allows, by post, computed in plain Python."""
    shp = config.shp
    by_parent = defaultdict(list)
    for cid in turns:
        c = comments[cid]
        post_score = posts.get(c["link_id"][3:])
        if post_score is None and shp.unknown_post == "skip":
            continue
        if post_score is not None and post_score < shp.min_post_score:
            continue
        if shp.top_level_only and not c["parent_id"].startswith("t3_"):
            continue
        if c["score"] >= shp.min_reply_score:
            by_parent[c["parent_id"]].append(cid)
    allowed = defaultdict(list)
    for siblings in by_parent.values():
        for a, b in permutations(siblings, 2):
            ca, cb = comments[a], comments[b]
            if ca["created"] >= cb["created"] and ca["score"] > cb["score"] and ca["score"] >= shp.min_ratio * cb["score"]:
                allowed[ca["link_id"][3:]].append((math.log(ca["score"] / cb["score"]), a, b))
    return allowed


def _check_pairs(store, config):
    comments, posts, turns, pairs = _raw(store)
    allowed = _shp_reference(comments, posts, turns, config)
    shp_by_post = defaultdict(list)
    for rule, post_id, chosen, rejected, margin in pairs:
        a, b = comments[chosen], comments[rejected]
        assert chosen in turns and rejected in turns and a["parent_id"] == b["parent_id"]
        assert a["link_id"] == b["link_id"] == f"t3_{post_id}"
        if rule == "shp":
            # the rule itself, from the raw rows
            assert a["created"] >= b["created"] and a["score"] > b["score"]
            assert a["score"] >= config.shp.min_ratio * b["score"] and b["score"] >= config.shp.min_reply_score
            post_score = posts.get(post_id)
            assert post_score is None and config.shp.unknown_post == "allow" or post_score >= config.shp.min_post_score
            assert margin == pytest.approx(math.log(a["score"] / b["score"]))
            shp_by_post[post_id].append((margin, chosen, rejected))
        else:
            assert rule == "time_adjacent"
            assert a["score"] - b["score"] >= config.time_adjacent.min_score_diff
            assert abs(a["created"] - b["created"]) <= config.time_adjacent.max_gap_s
            # adjacent: no sibling turn was posted strictly between them
            lo, hi = sorted((a["created"], b["created"]))
            between = [t for t in turns if comments[t]["parent_id"] == a["parent_id"]
                       and lo < comments[t]["created"] < hi]
            assert between == []
            assert margin == pytest.approx(math.log1p(a["score"] - b["score"]))
    # SHP keeps, per post, the largest margins among every allowed pair, at most 5
    assert set(shp_by_post) <= set(allowed)
    for post_id, candidates in allowed.items():
        expected = sorted(candidates, key=lambda m: (-m[0], m[1], m[2]))[:config.shp.max_pairs_per_post]
        got = sorted(shp_by_post[post_id], key=lambda m: (-m[0], m[1], m[2]))
        assert [(c, r) for _, c, r in got] == [(c, r) for _, c, r in expected], post_id
    return shp_by_post


def test_funny_pairs_follow_the_rules(funny, tmp_path):
    store, report = funny
    assert report.pairs == {"shp": 5, "time_adjacent": 208}
    shp = _check_pairs(store, LabelConfig())
    assert sum(map(len, shp.values())) == 5
    # and the exported SHP pairs are exactly those, with their texts
    export_dataset(store, "pairs", tmp_path / "pairs")
    import datasets

    rows = [r for r in datasets.load_from_disk(str(tmp_path / "pairs" / "dataset"))["train"] if r["rule"] == "shp"]
    assert sorted((r["chosen_id"], r["rejected_id"]) for r in rows) == sorted(
        (c, r) for pairs in shp.values() for _, c, r in pairs)
    assert all(r["chosen_score"] >= 2 * r["rejected_score"] >= 4 for r in rows)


def test_dump_pairs_follow_the_rules(dump):
    store, report = dump
    assert report.pairs == {"shp": 30, "time_adjacent": 76}
    shp = _check_pairs(store, DUMP_CONFIG)
    assert max(map(len, shp.values())) <= 5 and len(shp) > 5


def test_funny_tiers_and_hand_checked_sentiment(funny):
    store, report = funny
    # the whole tree is one post: 528 turns, all labelled, thirds by quantile
    assert report.turns == report.labelled == 528
    assert report.tiers == {"bad": 176, "good": 176, "ok": 176}
    with Store(store, read_only=True) as s:
        row = s.con.execute("SELECT reply_count, reply_sentiment_mean, reply_sentiment_weighted, "
                            "reply_positive_share FROM labels WHERE comment_id = 'cu5ujg2'").fetchone()
    # cu5ujg2 ("the kid falling has shopped onto the video...") has three replies: cu5w5hz is
    # '[deleted]' (left out); cu5x0hr "...definitely a reflection of him..." scores +0.3246 and
    # cu5xkfj "...doesn't really seem that is was edited" -0.2263; both have score 1.
    vader = SentimentIntensityAnalyzer()
    assert vader.polarity_scores("[deleted]")["compound"] == 0.0  # it would have diluted the mean
    assert row == (2, pytest.approx((0.3246 - 0.2263) / 2), pytest.approx((0.3246 - 0.2263) / 2), 0.5)


def test_dump_tiers_on_a_hand_checked_thread(dump):
    store, report = dump
    # 930 turns; 436 sit in threads with >= 5 turns; one subreddit (reddit.com): thirds by quantile
    assert report.turns == 930 and report.labelled == 436
    assert report.tiers == {"bad": 145, "good": 145, "ok": 146}
    with Store(store, read_only=True) as s:
        rows = s.con.execute("SELECT l.comment_id, l.z_rank, l.z_time, l.adjusted, l.tier, l.reply_count, "
                             "l.reply_sentiment_mean FROM labels l JOIN turns t USING (comment_id) "
                             "WHERE t.post_id = '21088' ORDER BY t.created_utc").fetchall()
        q_lo, q_hi = s.con.execute("SELECT quantile_cont(adjusted, 1/3), quantile_cont(adjusted, 2/3) "
                                   "FROM labels").fetchone()
    # Thread 21088 (the post is not in the dump): five top-level replies. By time: c1855 (score 6,
    # rank 1), c1864 (-4, rank 5), c1874 (-3, rank 4), c1886 (1, rank 2), c2018 (0, rank 3).
    # Delays count from the first reply (1135382042): 0, 11885, 25502, 40537, 152640 s.
    assert [r[0] for r in rows] == ["c1855", "c1864", "c1874", "c1886", "c2018"]
    ranks = np.array([1, 5, 4, 2, 3], float)
    delays = np.log1p(np.array([0, 11885, 25502, 40537, 152640], float))
    z_rank = (ranks - ranks.mean()) / ranks.std()
    z_time = (delays - delays.mean()) / delays.std()
    adjusted = -z_rank + 0.5 * z_time
    assert [r[1] for r in rows] == pytest.approx(z_rank)
    assert [r[2] for r in rows] == pytest.approx(z_time)
    assert [r[3] for r in rows] == pytest.approx(adjusted)
    # against the dump-wide thirds (q_lo -0.279, q_hi 0.770): c1886 (2nd best score, posted
    # 11 h late) is good; the two downvoted replies are bad; the early top reply is only ok.
    assert (round(q_lo, 3), round(q_hi, 3)) == (-0.279, 0.770)
    assert [r[4] for r in rows] == ["ok", "bad", "bad", "good", "ok"]
    # c1864 ("Industries should be allowed to do whatever they want...") has one reply, +0.4019
    assert [(r[5], r[6]) for r in rows] == [(0, None), (1, 0.4019), (0, None), (0, None), (0, None)]
