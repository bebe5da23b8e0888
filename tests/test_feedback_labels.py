"""feedback.labels on small hand-made threads: the adjusted-ranking math, the pair rules, reply
sentiment, and the table replacement (partitions, worker processes, atomicity)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

import feedback.labels as labels_mod
from ahf.config import load_config
from feedback.labels import LabelConfig, label_store
from mining.ingest import ingest
from mining.store import Store
from mining.turns import build_turns

T0 = 1_500_000_000  # 2017: the store refuses stamps from before Reddit opened


def _post(pid, score, sub, author="op"):
    return {"id": pid, "title": f"Title {pid}", "selftext": "", "author": author, "score": score,
            "created_utc": T0, "subreddit": sub, "over_18": False, "num_comments": 0}


def _comment(cid, post, parent, author, body, score, delay, sub):
    return {"id": cid, "link_id": f"t3_{post}", "parent_id": parent, "author": author, "body": body,
            "score": score, "created_utc": T0 + delay, "subreddit": sub}


# p1: six top-level replies, (id, score, delay in s). Ranks by score: a1 b2 c3 d4 e5 f6.
P1_REPLIES = [("a", 50, 600), ("b", 20, 60), ("c", 10, 3000), ("d", 5, 120), ("e", 3, 7200), ("f", 1, 30)]

# p2 (score 5: no SHP pairs): x by alice, with replies that do and do not count for x's sentiment.
P2 = [
    ("x", "t3_p2", "alice", "Here is my story about a dog named Rex.", 10, 100),
    ("x1", "t1_x", "alice", "Thanks, great to hear!", 8, 200),          # the author's own: excluded
    ("x2", "t1_x", "AutoModerator", "Great post, wonderful!", 1, 210),  # bot: excluded
    ("x3", "t1_x", "zed", "[deleted]", 2, 220),                         # deleted body: excluded
    ("x4", "t1_x", "bob", "I love this, wonderful.", 4, 230),
    ("x5", "t1_x", "carol", "This is terrible.", -3, 240),
    ("x6", "t1_x", "dave", "ok", 1, 250),                               # too short for a turn, still a reply
    ("x7", "t1_x", "erin", "  \n ", 5, 260),                            # no visible text: excluded
    ("y", "t3_p2", "[deleted]", "An anonymous story, a long one.", 2, 300),
    ("y1", "t1_y", "[deleted]", "Nice work on this!", 3, 400),          # '[deleted]' is nobody's own reply
]


def write_fixture(path):
    records = [_post("p1", 100, "s1"), _post("p2", 5, "s2"), _post("p3", 50, "s2")]
    records += [_comment(c, "p1", "t3_p1", f"user_{c}", f"Reply {c} to the prompt.", s, d, "s1")
                for c, s, d in P1_REPLIES]
    records += [_comment(c, "p2", parent, a, body, s, d, "s2") for c, parent, a, body, s, d in P2]
    # p3: only two replies, below min_replies
    records += [_comment("q1", "p3", "t3_p3", "u9", "First of two replies.", 9, 10, "s2"),
                _comment("q2", "p3", "t3_p3", "u8", "Second of two replies.", 3, 20, "s2")]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture()
def store(tmp_path):
    src = write_fixture(tmp_path / "fixture.ndjson")
    report = ingest([src], tmp_path / "store")
    assert report.ok and report.ingested == 21
    turns = build_turns(tmp_path / "store")
    # x2 (bot), x3 (deleted), x6 (too short) and x7 (empty) are not turns
    assert turns.turns == 14
    return tmp_path / "store"


def _rows(store_dir, sql):
    with Store(store_dir, read_only=True) as s:
        cursor = s.con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def _tables(store_dir):
    with Store(store_dir, read_only=True) as s:
        return {r[0] for r in s.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def test_adjusted_ranking_math_and_signs(store):
    report = label_store(store)
    got = {r["comment_id"]: r for r in _rows(store, "SELECT * FROM labels WHERE post_id = 'p1'")}
    ranks = np.array([1, 2, 3, 4, 5, 6], float)
    delays = np.log1p(np.array([d for _, _, d in P1_REPLIES], float))
    z_rank = (ranks - ranks.mean()) / ranks.std()
    z_time = (delays - delays.mean()) / delays.std()
    adjusted = -1.0 * z_rank + 0.5 * z_time
    for (cid, _, _), zr, zt, adj in zip(P1_REPLIES, z_rank, z_time, adjusted):
        assert got[cid]["group_size"] == 6
        assert got[cid]["z_rank"] == pytest.approx(zr, abs=1e-12)
        assert got[cid]["z_time"] == pytest.approx(zt, abs=1e-12)
        assert got[cid]["adjusted"] == pytest.approx(adj, abs=1e-12)
    # Signs: c ranks below b (3 vs 2) but was posted 50x later, so it scores above b; a (rank 1,
    # 10 minutes late) is best; f (last, first posted) is worst.
    order = sorted(got, key=lambda c: -got[c]["adjusted"])
    assert order == ["a", "c", "b", "e", "d", "f"]
    # s1 holds these six only: thirds by quantile -> 2 good, 2 ok, 2 bad
    assert {c: got[c]["tier"] for c in got} == {"a": "good", "c": "good", "b": "ok", "e": "ok",
                                                  "d": "bad", "f": "bad"}
    # p3 has two turns (< min_replies = 5): no adjusted score, tier or reward
    p3 = _rows(store, "SELECT * FROM labels WHERE post_id = 'p3'")
    assert len(p3) == 2 and all(r["adjusted"] is None and r["tier"] is None and r["reward"] is None for r in p3)
    assert report.turns == 14 and report.labelled == 12
    assert report.tiers == {"bad": 4, "good": 4, "ok": 4}


def test_shp_pairs_follow_the_rule(store):
    label_store(store)
    shp = _rows(store, "SELECT chosen_id, rejected_id, margin FROM pairs WHERE rule = 'shp' ORDER BY margin DESC")
    # a(50, t+600) > d(5, t+120): ratio 10; a > b(20, t+60): 2.5; c(10, t+3000) > d(5): exactly 2.
    # Not: b over anything (only f is earlier, and f scores 1 < min_reply_score); c over b (ratio 0.5);
    # e(3) over d(5); p2 (post score 5 < 10); p3 (ratio 3 but q1 was written first).
    assert [(r["chosen_id"], r["rejected_id"]) for r in shp] == [("a", "d"), ("a", "b"), ("c", "d")]
    assert [r["margin"] for r in shp] == pytest.approx([math.log(10), math.log(2.5), math.log(2)])
    capped = LabelConfig.model_validate({"shp": {"max_pairs_per_post": 2, "min_ratio": 2.01}})
    label_store(store, capped)
    shp = _rows(store, "SELECT chosen_id, rejected_id FROM pairs WHERE rule = 'shp' ORDER BY margin DESC")
    assert [(r["chosen_id"], r["rejected_id"]) for r in shp] == [("a", "d"), ("a", "b")]


def test_time_adjacent_pairs(store):
    label_store(store)
    rows = _rows(store, "SELECT chosen_id, rejected_id, margin FROM pairs "
                        "WHERE rule = 'time_adjacent' AND post_id = 'p1' ORDER BY chosen_id, rejected_id")
    # p1 by time: f(1) b(20) d(5) a(50) c(10) e(3); the c -> e gap is 4200 s > 3600 s.
    assert [(r["chosen_id"], r["rejected_id"], r["margin"]) for r in rows] == [
        ("a", "c", pytest.approx(math.log(41))), ("a", "d", pytest.approx(math.log(46))),
        ("b", "d", pytest.approx(math.log(16))), ("b", "f", pytest.approx(math.log(20)))]


def test_reply_sentiment_excludes_own_bots_and_deleted(store):
    label_store(store)
    got = {r["comment_id"]: r for r in _rows(store, "SELECT * FROM labels WHERE post_id = 'p2'")}
    vader = SentimentIntensityAnalyzer()
    c = {cid: vader.polarity_scores(body)["compound"] for cid, _, _, body, _, _ in P2}
    # x: bob (score 4), carol (-3 -> weight 1), dave (1)
    x = got["x"]
    assert x["reply_count"] == 3
    assert x["reply_sentiment_mean"] == pytest.approx((c["x4"] + c["x5"] + c["x6"]) / 3)
    assert x["reply_sentiment_weighted"] == pytest.approx((4 * c["x4"] + c["x5"] + c["x6"]) / 6)
    assert x["reply_positive_share"] == pytest.approx(sum(c[k] >= 0.05 for k in ("x4", "x5", "x6")) / 3)
    assert c["x4"] > 0.05 and c["x5"] < -0.05  # the fixture means what it says
    # y's author is '[deleted]': another '[deleted]' reply is not "their own"
    assert got["y"]["reply_count"] == 1 and got["y"]["reply_sentiment_mean"] == c["y1"]
    # turns without replies
    assert got["x4"]["reply_count"] == 0 and got["x4"]["reply_sentiment_mean"] is None
    # reward = adjusted + 0.5 * weighted sentiment (0 when there is none)
    assert x["reward"] == pytest.approx(x["adjusted"] + 0.5 * x["reply_sentiment_weighted"])
    assert got["x4"]["reward"] == pytest.approx(got["x4"]["adjusted"])


def test_partitions_and_worker_processes_give_the_same_tables(store):
    def snapshot():
        return (_rows(store, "SELECT * FROM labels ORDER BY comment_id"),
                _rows(store, "SELECT * FROM pairs ORDER BY rule, chosen_id, rejected_id"))

    label_store(store)
    base = snapshot()
    split = LabelConfig.model_validate({"partition_turns": 3,
                                        "sentiment": {"workers": 2, "pool_min_texts": 0}})
    report = label_store(store, split)
    assert report.partitions == 5 and report.workers == 2
    again = snapshot()
    for a, b in zip(base[0], again[0]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (pytest.approx(b[k]) if isinstance(b[k], float) else b[k]), (a["comment_id"], k)
    assert base[1] == again[1]


def test_a_failed_run_leaves_the_previous_labels(store, monkeypatch):
    label_store(store)
    before = _rows(store, "SELECT * FROM labels ORDER BY comment_id")
    pairs_before = _rows(store, "SELECT * FROM pairs ORDER BY rule, chosen_id, rejected_id")

    calls = {"n": 0}
    real = labels_mod.label_partition

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(labels_mod, "label_partition", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        label_store(store, LabelConfig.model_validate({"partition_turns": 5, "votes": {"w_time": 0}}))
    assert _rows(store, "SELECT * FROM labels ORDER BY comment_id") == before
    assert _rows(store, "SELECT * FROM pairs ORDER BY rule, chosen_id, rejected_id") == pairs_before
    assert not {"labels_new", "pairs_new", "sentiment_new"} & _tables(store)  # work tables dropped
    monkeypatch.setattr(labels_mod, "label_partition", real)
    # the next run cleans up and replaces
    label_store(store, LabelConfig.model_validate({"votes": {"w_time": 0}}))
    after = {r["comment_id"]: r for r in _rows(store, "SELECT * FROM labels")}
    assert after["c"]["adjusted"] == pytest.approx(-after["c"]["z_rank"])
    assert not {"labels_new", "pairs_new", "sentiment_new", "labels_final"} & _tables(store)
    with Store(store, read_only=True) as s:
        assert s.meta("labels_config")["votes"]["w_time"] == 0


def test_store_without_turns_is_a_clear_error(tmp_path):
    from ahf.console import UserError

    Store(tmp_path / "empty").close()
    with pytest.raises(UserError, match="has no `turns` table"):
        label_store(tmp_path / "empty")


def test_config_file_mirrors_the_defaults_and_rejects_bad_values(tmp_path):
    from ahf.console import UserError

    assert load_config(LabelConfig, "labels") == LabelConfig()
    with pytest.raises(UserError, match="tier_quantiles"):
        load_config(LabelConfig, "labels", overrides=["votes.tier_quantiles=[0.8, 0.2]"])
    with pytest.raises(UserError, match="splits"):
        load_config(LabelConfig, "labels", overrides=["export.splits={train: 0.5}"])


def test_grouping_by_depth_or_parent(store):
    def sizes(group_by):
        label_store(store, LabelConfig.model_validate({"votes": {"group_by": group_by, "min_replies": 2}}))
        return {r["comment_id"]: (r["group_size"], r["adjusted"] is not None)
                for r in _rows(store, "SELECT * FROM labels WHERE post_id = 'p2'")}

    # p2: x and y at depth 1; x1, x4, x5 under x and y1 under y at depth 2
    assert sizes("post") == {c: (6, True) for c in ("x", "y", "x1", "x4", "x5", "y1")}
    assert sizes("post_depth") == {"x": (2, True), "y": (2, True), "x1": (4, True), "x4": (4, True),
                                   "x5": (4, True), "y1": (4, True)}
    assert sizes("parent") == {"x": (2, True), "y": (2, True), "x1": (3, True), "x4": (3, True),
                               "x5": (3, True), "y1": (1, False)}
