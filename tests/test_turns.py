"""Threads and turns: the SQL tree walk against a plain-Python reference on real trees."""

from __future__ import annotations

from collections import defaultdict

import pytest

from mining.ingest import ingest
from mining.store import Store
from mining.schema import CONTEXT_SEPARATOR
from mining.turns import TurnConfig, build_turns

FUNNY = "reddit-api/TestCommentForest.test_replace__all.json"
RC_2005 = "pushshift/RC_2005-12.zst"


def reference_turns(comments: list[tuple], posts: dict, config: TurnConfig) -> tuple[dict, dict]:
    """Turns and filter counts computed the slow, obvious way, independently of the SQL."""
    by_id = {c[0]: c for c in comments}
    children = defaultdict(list)  # a thread's replies to one parent: (link_id, parent_id)
    for c in comments:
        children[c[1], c[2]].append(c)

    def ancestors(c):
        chain = []
        parent = c[2]
        while parent.startswith("t1_"):
            p = by_id.get(parent[3:])
            if p is None or p[1] != c[1]:
                return None  # an ancestor missing, or in another thread: orphan
            chain.append(p[0])
            parent = p[2]
        return chain[::-1] if parent == f"t3_{c[1][3:]}" else None  # the top reply answers its own thread's post

    turns, filtered = {}, defaultdict(int)
    for cid, link, parent, author, body, score, created in comments:
        post = posts.get(link[3:])
        chain = ancestors(by_id[cid])
        if body == "[deleted]":
            reason = "deleted_body"
        elif body == "[removed]":
            reason = "removed_body"
        elif not body or not body.strip():
            reason = "empty_body"
        elif author in config.bot_authors:
            reason = "bot_author"
        elif chain is None:
            reason = "orphan"
        elif post and post["over_18"]:
            reason = "nsfw"
        elif len(body.strip()) < config.min_chars:
            reason = "too_short"
        else:
            reason = None
        if reason:
            filtered[reason] += 1
            continue
        siblings = sorted(children[link, parent], key=lambda s: (-(s[5] if s[5] is not None else -10**18), s[6], s[0]))
        kids = sorted(children[link, f"t1_{cid}"], key=lambda k: (k[6], k[0]))
        parent_created = post["created_utc"] if parent.startswith("t3_") and post else (
            by_id[parent[3:]][6] if parent.startswith("t1_") else None)
        post_parts = [post["title"], "" if post["selftext"] in ("[deleted]", "[removed]") else post["selftext"]] \
            if post else []
        turns[cid] = {
            "context": CONTEXT_SEPARATOR.join(
                part for part in post_parts + [by_id[a][4] for a in chain] if part),
            "parent_text": by_id[parent[3:]][4] if parent.startswith("t1_") else CONTEXT_SEPARATOR.join(
                part for part in post_parts if part),
            "depth": len(chain) + 1,
            "ancestor_ids": chain,
            "sibling_rank": [s[0] for s in siblings].index(cid) + 1,
            "n_siblings": len(siblings),
            "n_children": len(kids),
            "child_ids": [k[0] for k in kids],
            "is_op": (author == post["author"] and author not in ("[deleted]", "[removed]")) if post else None,
            "delay_post_s": created - post["created_utc"] if post else None,
            "delay_parent_s": created - parent_created if parent_created is not None else None,
            "reply": body,
        }
    return turns, dict(filtered)


def _check_against_reference(store_dir, config=TurnConfig()):
    report = build_turns(store_dir, config)
    with Store(store_dir, read_only=True) as store:
        comments = store.con.execute(
            "SELECT id, link_id, parent_id, author, body, score, created_utc FROM comments").fetchall()
        posts = {r[0]: dict(zip(("author", "created_utc", "over_18", "title", "selftext"), r[1:])) for r in store.rows(
            "SELECT id, author, created_utc, over_18, title, selftext FROM posts")}
        keys = ["context", "parent_text", "depth", "ancestor_ids", "sibling_rank", "n_siblings", "n_children",
                "child_ids", "is_op", "delay_post_s", "delay_parent_s", "reply"]
        got = store.turn_rows().select(["comment_id", *keys]).to_pylist()
    expected, filtered = reference_turns(comments, posts, config)
    got_turns = {row.pop("comment_id"): row for row in got}
    assert got_turns == expected
    assert report.filtered == filtered
    assert report.comments == report.turns + sum(report.filtered.values())
    return report


@pytest.mark.parametrize("source", [FUNNY, RC_2005])
def test_turns_match_reference_on_real_trees(shared_data, tmp_path, source):
    ingest([shared_data / source], tmp_path)
    _check_against_reference(tmp_path)


def test_rc_2005_12_turn_accounting(shared_data, tmp_path):
    ingest([shared_data / RC_2005], tmp_path)
    report = build_turns(tmp_path)
    # deleted/removed bodies stay in the tree but never become reply texts; 15 orphan replies
    # plus the 7 replies hanging under them have no complete context
    assert report.filtered == {"deleted_body": 105, "removed_body": 15, "orphan": 22, "too_short": 3}
    assert report.turns == 930
    with Store(tmp_path, read_only=True) as store:
        assert store.con.execute(
            "SELECT count(*) FROM turns WHERE reply IN ('[deleted]', '[removed]')").fetchone()[0] == 0
        # no posts in a comment dump: post fields are NULL, not guessed
        assert store.con.execute(
            "SELECT count(*) FROM turns WHERE post_title IS NOT NULL OR is_op IS NOT NULL").fetchone()[0] == 0


def test_funny_thread_by_hand(shared_data, tmp_path):
    ingest([shared_data / FUNNY], tmp_path)
    report = build_turns(tmp_path)
    assert (report.comments, report.turns, report.max_depth) == (541, 528, 12)
    with Store(tmp_path, read_only=True) as store:
        row = store.con.execute(
            "SELECT post_title, depth, ancestor_ids, parent_body, delay_post_s, delay_parent_s "
            "FROM turns WHERE comment_id = 'cu5t6gf'").fetchone()
        assert row[0] == "Ba Dum Tsss"
        assert row[1:3] == (3, ["cu5p1hh", "cu5t0tk"])
        assert row[3].startswith("came here to say that")
        assert row[4:] == (18038, 425)
        context = store.turn_rows("WHERE comment_id = 'cu5t6gf'")["context"][0].as_py()
        assert context == CONTEXT_SEPARATOR.join(["Ba Dum Tsss", "That kid is going places. ", row[3]])


def test_filters_are_configurable_and_counted(shared_data, tmp_path):
    ingest([shared_data / FUNNY], tmp_path)
    strict = _check_against_reference(tmp_path, TurnConfig(min_chars=40, bot_authors=["AutoModerator", "Kynas"]))
    assert strict.filtered["too_short"] > 7
    loose = _check_against_reference(tmp_path, TurnConfig(min_chars=0))
    assert "too_short" not in loose.filtered


def test_failed_rebuild_keeps_previous_turns(shared_data, tmp_path, monkeypatch):
    import mining.turns as turns_module

    ingest([shared_data / FUNNY], tmp_path)
    build_turns(tmp_path)
    monkeypatch.setattr(turns_module, "_TURNS_SQL", turns_module._TURNS_SQL.replace("FROM classified", "FROM nope"))
    with pytest.raises(Exception):
        build_turns(tmp_path)
    with Store(tmp_path, read_only=True) as store:
        assert store.count("turns") == 528


def test_a_reply_in_another_thread_is_an_orphan_in_every_partitioning(tmp_path):
    """A comment whose parent sits in another thread (its link_id and its parent's disagree, as a hostile or
    damaged record may say) is an orphan, and no turn counts it as a child or a sibling: what a turn is then
    depends only on its own thread, so any partitioning of the threads (Ray's) gives the same turns."""
    import orjson

    from ahf.engine import LocalEngine

    def comment(cid, link, parent, created):
        return {"id": cid, "link_id": link, "parent_id": parent, "author": "u", "body": f"reply {cid} here",
                "score": 5, "created_utc": 1_500_000_000 + created, "subreddit": "s", "retrieved_on": 1_600_000_000}

    posts = [{"id": p, "title": f"post {p}", "selftext": "", "author": "op", "score": 10, "created_utc": 1_500_000_000,
              "subreddit": "s", "over_18": False, "num_comments": 3, "retrieved_on": 1_600_000_000} for p in "ab"]
    comments = [comment("c1", "t3_a", "t3_a", 1), comment("c2", "t3_a", "t1_c1", 2),
                comment("x1", "t3_b", "t1_c1", 3),  # replies to a's c1 but says it is in thread b
                comment("x2", "t3_b", "t3_a", 4),   # a top-level reply to post a, in thread b
                comment("x3", "t3_b", "t1_x1", 5),  # below x1
                comment("b1", "t3_b", "t3_b", 6)]
    source = tmp_path / "mixed.ndjson"
    source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in posts + comments))
    ingest([source], tmp_path / "store", rebuild=False)

    class Partitioned(LocalEngine):  # the local engine, with the threads cut into `n` partitions as Ray cuts them
        def __init__(self, n):
            super().__init__()
            self.n = n

        def partitions(self, items, per_partition):
            return self.n

    results = []
    for n in (1, 2, 3, 5):
        report = build_turns(tmp_path / "store", engine=Partitioned(n))
        with Store(tmp_path / "store", read_only=True) as store:
            results.append((report.filtered, store.rows(
                "SELECT comment_id, sibling_rank, n_siblings, n_children, child_ids, ancestor_ids "
                "FROM turns ORDER BY comment_id")))
    assert all(r == results[0] for r in results[1:])
    filtered, turns = results[0]
    assert filtered == {"orphan": 3}
    assert turns == [("b1", 1, 1, 0, [], []), ("c1", 1, 1, 1, ["c2"], []), ("c2", 1, 1, 0, [], ["c1"])]
    _check_against_reference(tmp_path / "store")
