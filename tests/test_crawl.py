"""`ahf crawl` through real PRAW over HTTP to a loopback stand-in for reddit.com (tests/reddit_replay.py)
that replays the recorded r/funny thread 3hahrw: 541 comments, 12 `more` stubs
answered by /api/morechildren and 6 "continue this thread" links answered by /comments/<id>/_/<comment>.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from ahf.cli import main
from ahf.console import UserError
from mining.crawl import CrawlConfig, _is_loopback, crawl, parse_since
from mining.ingest import ingest
from mining.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reddit_replay import RedditReplay  # noqa: E402

CASSETTE = "reddit-api/TestCommentForest.test_replace__all.json"
CLIENT_ID = "ahf-test-client-id-7Qx2"
CLIENT_SECRET = "ahf-test-secret-Zk81vPq0Lw"
USER_AGENT = "python:ahf.tests:v0.1 (by u/ahf-tests)"
POST_CREATED = 1439797480  # 2015-08-17T07:44:40Z
COMMENT_COLUMNS = "id, link_id, parent_id, author, body, score, created_utc, subreddit, distinguished, stickied"


@pytest.fixture
def praw_env(tmp_path, monkeypatch):
    """Credentials in PRAW's environment variables, and no praw.ini from this machine's user or cwd."""
    import praw.config

    for name in ("praw_client_id", "praw_client_secret", "praw_user_agent", "praw_site"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(praw.config.Config, "CONFIG", None)  # PRAW reads praw.ini once per process
    monkeypatch.setenv("praw_client_id", CLIENT_ID)
    monkeypatch.setenv("praw_client_secret", CLIENT_SECRET)
    monkeypatch.setenv("praw_user_agent", USER_AGENT)
    return monkeypatch


@pytest.fixture
def reddit(shared_data):
    with RedditReplay([shared_data / CASSETTE], CLIENT_ID, CLIENT_SECRET) as server:
        yield server


def _config(server: RedditReplay, **fields) -> CrawlConfig:
    return CrawlConfig(oauth_url=server.url, reddit_url=server.url, **fields)


def _cli(server: RedditReplay, store: Path, *args: str) -> list[str]:
    return ["crawl", *args, "--store", str(store), "--oauth-url", server.url, "--reddit-url", server.url]


def _assert_no_secret(*texts: str | bytes) -> None:
    for text in texts:
        data = text if isinstance(text, bytes) else text.encode()
        assert CLIENT_SECRET.encode() not in data
        assert CLIENT_ID.encode() not in data


def test_crawl_subreddit_stores_the_whole_tree_and_resumes(praw_env, reddit, shared_data, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # praw, prawcore, urllib3 and ours, all of it
    store_dir = tmp_path / "store"
    report = crawl(store_dir, _config(reddit, subreddit="funny"))

    assert reddit.unmatched == []
    assert report.ok and report.errors == []
    assert (report.listed, report.crawled, report.skipped_done) == (1, 1, 0)
    assert report.comments_crawled == 541
    assert report.records_read == report.ingested == 542 and not report.skipped  # post + 541 comments
    # token, /r/funny/new, /comments/3hahrw, 12 x morechildren, 6 x "continue this thread"
    assert report.requests == 21 == len(reddit.exchanges)
    assert sum(e.path.startswith("/api/morechildren") for e in reddit.exchanges) == 12
    assert sum("/_/" in e.path for e in reddit.exchanges) == 6
    assert report.stopped == "listing_end" and report.newest_created_utc == POST_CREATED
    assert report.store["orphans"] == 0 and report.store["threads_without_post"] == 0

    with Store(store_dir, read_only=True) as store:
        assert store.con.execute("SELECT count(*), count(DISTINCT id) FROM comments WHERE link_id = 't3_3hahrw'"
                                 ).fetchone() == (541, 541)
        assert store.count("comments") == 541
        post = store.con.execute("SELECT id, title, author, score, created_utc, subreddit, over_18, num_comments, "
                                 "url FROM posts").fetchall()
        assert post == [("3hahrw", "Ba Dum Tsss", "your_local_librarian", 11702, POST_CREATED, "funny", False,
                         543, "http://i.imgur.com/eoF76hj.gifv")]
        crawled = set(store.con.execute(f"SELECT {COMMENT_COLUMNS} FROM comments").fetchall())
        state = store.con.execute("SELECT submission_id, subreddit, created_utc, comments FROM crawl_state"
                                  ).fetchall()
        assert state == [("3hahrw", "funny", POST_CREATED, 541)]
        retrieved = store.con.execute("SELECT sum(retrieved_utc) FROM comments").fetchone()[0]

    # parity: the same responses ingested as a file give exactly the same rows
    file_store = tmp_path / "from_file"
    ingest([shared_data / CASSETTE], file_store)
    with Store(file_store, read_only=True) as store:
        assert set(store.con.execute(f"SELECT {COMMENT_COLUMNS} FROM comments").fetchall()) == crawled
    assert sum(1 for row in crawled if row[3] == "[deleted]") == 16

    # re-run: the finished thread costs no request and changes nothing
    before = len(reddit.exchanges)
    again = crawl(store_dir, _config(reddit, subreddit="funny"))
    assert (again.listed, again.crawled, again.skipped_done, again.records_read) == (1, 0, 1, 0)
    assert [e.path for e in reddit.exchanges[before:]] == ["/api/v1/access_token", "/r/funny/new"]
    assert again.requests == 2
    with Store(store_dir, read_only=True) as store:
        assert store.count("comments") == 541
        assert store.con.execute("SELECT sum(retrieved_utc) FROM comments").fetchone()[0] == retrieved

    _assert_no_secret(caplog.text, json.dumps(report.to_dict()), json.dumps(again.to_dict()),
                      *(p.read_bytes() for p in store_dir.rglob('*') if p.is_file()))


def test_cli_json_submission_and_missing_thread(praw_env, reddit, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    store_dir = tmp_path / "store"
    code = main(_cli(reddit, store_dir, "--submission", "3hahrw", "--submission", "zzzzzz", "--json"))
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert code == 1  # one of the two threads does not exist
    assert result["submissions"] == {"listed": 0, "crawled": 1, "skipped_done": 0, "too_young": 0}
    assert result["comments"] == 541 and result["posts"] == 1 and result["comments_crawled"] == 541
    assert result["records_read"] == result["ingested"] + sum(result["skipped"].values()) == 542
    assert result["errors"] == ["zzzzzz: NotFound: received 404 HTTP response"]
    assert [(e.method, e.path, e.status) for e in reddit.unmatched] == [("GET", "/comments/zzzzzz/", 404)]
    _assert_no_secret(captured.out, captured.err, caplog.text, *(p.read_bytes() for p in store_dir.rglob('*') if p.is_file()))

    # the finished thread is skipped; the missing one is tried again (it was never marked done)
    code = main(_cli(reddit, store_dir, "--submission", "3hahrw", "--submission", "zzzzzz", "--json"))
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and result["submissions"]["skipped_done"] == 1 and result["submissions"]["crawled"] == 0
    assert result["requests"] == 2  # token + the missing thread

    # --refresh crawls a finished thread again, converging to the same rows
    code = main(_cli(reddit, store_dir, "--submission", "https://www.reddit.com/r/funny/comments/3hahrw/ba_dum_tsss/",
                     "--refresh", "--json"))
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["submissions"]["crawled"] == 1 and result["comments"] == 541
    assert result["stopped"] == "done"


def test_missing_and_wrong_credentials(praw_env, reddit, tmp_path, capsys):
    store_dir = tmp_path / "store"
    assert main(_cli(reddit, store_dir)) == 2
    assert "nothing to crawl" in capsys.readouterr().err
    praw_env.delenv("praw_client_secret")
    with pytest.raises(UserError, match="credentials missing: client_secret"):
        crawl(store_dir, _config(reddit, subreddit="funny"))
    praw_env.setenv("praw_client_secret", CLIENT_SECRET)
    praw_env.delenv("praw_client_id")
    assert main(_cli(reddit, store_dir, "--subreddit", "funny", "--json")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "client_id is not set" in " ".join(captured.err.split())
    assert reddit.exchanges == []  # nothing was sent without credentials

    praw_env.setenv("praw_client_id", "not-the-registered-app")
    assert main(_cli(reddit, store_dir, "--subreddit", "funny")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "refused the credentials (HTTP 401" in err
    _assert_no_secret(err)
    assert [e.path for e in reddit.exchanges] == ["/api/v1/access_token"]


def test_credentials_from_praw_ini_site(praw_env, reddit, tmp_path, capsys):
    for name in ("praw_client_id", "praw_client_secret", "praw_user_agent"):
        praw_env.delenv(name)
    (tmp_path / "praw.ini").write_text(
        f"[ahf_replay]\nclient_id={CLIENT_ID}\nclient_secret={CLIENT_SECRET}\nuser_agent={USER_AGENT}\n")
    store_dir = tmp_path / "store"
    assert main(_cli(reddit, store_dir, "--subreddit", "funny", "--site", "ahf_replay", "--json")) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["comments"] == 541
    _assert_no_secret(out, *(p.read_bytes() for p in store_dir.rglob('*') if p.is_file()))

    assert main(_cli(reddit, store_dir, "--subreddit", "funny", "--site", "nope")) == 2
    assert "no praw.ini section named 'nope'" in " ".join(capsys.readouterr().err.split())


def test_max_requests_stops_between_threads_and_resumes(praw_env, reddit, tmp_path):
    store_dir = tmp_path / "store"
    first = crawl(store_dir, _config(reddit, subreddit="funny", max_requests=2))  # token + listing
    assert (first.stopped, first.listed, first.crawled, first.requests) == ("max_requests", 1, 0, 2)
    with Store(store_dir, read_only=True) as store:
        assert store.count("comments") == 0 and store.count("crawl_state") == 0
    second = crawl(store_dir, _config(reddit, subreddit="funny"))
    assert (second.crawled, second.comments_crawled, second.store["comments"]) == (1, 541, 541)
    assert reddit.unmatched == []


def test_since_min_age_and_listing_cap(praw_env, reddit, tmp_path):
    store_dir = tmp_path / "store"
    assert parse_since("2015-08-17") == 1439769600 and parse_since("1439797480") == POST_CREATED
    with pytest.raises(UserError, match="--since"):
        parse_since("last tuesday")
    later = crawl(store_dir, _config(reddit, subreddit="funny", since=parse_since("2015-08-18")))
    assert (later.stopped, later.listed, later.crawled, later.requests) == ("since", 1, 0, 2)
    young = crawl(store_dir, _config(reddit, subreddit="funny", min_age_hours=24 * 365 * 200))
    assert (young.too_young, young.crawled) == (1, 0)

    # a listing that ends at the cap may hide older posts: reported, not silently dropped
    capped = crawl(store_dir, _config(reddit, subreddit="funny", since=parse_since("2015-08-17"), listing_cap=1))
    assert capped.crawled == 1 and capped.possible_gap == [1439769600, POST_CREATED]
    # next time the walk reaches the newest post already seen: continuous, no gap
    again = crawl(store_dir, _config(reddit, subreddit="funny", listing_cap=1))
    assert again.skipped_done == 1 and again.possible_gap is None


def test_prawcore_waits_on_ratelimit_headers(praw_env, shared_data, tmp_path):
    def headers(method: str, path: str) -> dict[str, str]:
        if path.startswith("/r/"):  # the listing says: window used up, resets in 1 s
            return {"x-ratelimit-remaining": "0", "x-ratelimit-used": "600", "x-ratelimit-reset": "1"}
        return {"x-ratelimit-remaining": "590.0", "x-ratelimit-used": "10", "x-ratelimit-reset": "300"}

    with RedditReplay([shared_data / CASSETTE], CLIENT_ID, CLIENT_SECRET, extra_headers=headers) as server:
        report = crawl(tmp_path / "store", _config(server, subreddit="funny"))
        listing, thread = server.exchanges[1], server.exchanges[2]
    assert (listing.path, thread.path) == ("/r/funny/new", "/comments/3hahrw/")
    assert thread.at - listing.at >= 0.95
    assert report.crawled == 1 and report.ratelimit == {"remaining": 590, "used": 10}


def test_too_many_requests_stops_the_crawl_resumably(praw_env, shared_data, tmp_path, capsys):
    throttled = {"on": True}

    def fail_with(method: str, path: str) -> int | None:
        return 429 if throttled["on"] and path.startswith("/comments/") else None

    store_dir = tmp_path / "store"
    with RedditReplay([shared_data / CASSETTE], CLIENT_ID, CLIENT_SECRET, fail_with=fail_with) as server:
        # `--set` reaches the same config model as the flags; YAML-style dates are accepted
        code = main(_cli(server, store_dir, "--subreddit", "funny", "--set", "since=2015-08-17", "--json"))
        result = json.loads(capsys.readouterr().out)
        assert code == 1 and result["stopped"] == "rate_limited" and result["submissions"]["crawled"] == 0
        assert result["errors"] == ["3hahrw: TooManyRequests: received 429 HTTP response"]
        assert result["newest_created_utc"] is None  # a cut walk does not move the mark
        throttled["on"] = False
        code = main(_cli(server, store_dir, "--subreddit", "funny", "--json"))
        result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["submissions"]["crawled"] == 1 and result["comments"] == 541
    assert result["newest_created_utc"] == POST_CREATED


@pytest.mark.parametrize("content_type, body, says", [
    ("text/html; charset=utf-8", b"<!DOCTYPE html>\n<html><head><title>Hotel Wi-Fi: sign in</title></head></html>",
     "Hotel Wi-Fi: sign in"),
    ("application/json", b'{"kind": "not a token"}', "not a token"),
])
def test_token_endpoint_answering_something_else_is_named(content_type, body, says, praw_env, shared_data, tmp_path,
                                                          capsys):
    """A proxy's login page (or any 200 that is no token) on the token endpoint: a message naming the
    endpoint and what came back, not prawcore's JSONDecodeError / KeyError traceback."""
    store_dir = tmp_path / "store"
    with RedditReplay([shared_data / CASSETTE], CLIENT_ID, CLIENT_SECRET,
                      token_answer=(200, content_type, body)) as server:
        code = main(_cli(server, store_dir, "--subreddit", "funny", "--json"))
        token_url = server.url + "/api/v1/access_token"
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert code == 2 and captured.out == ""
    assert token_url in err and content_type.split(";")[0] in err and says in err and "--reddit-url" in err
    assert [e.path for e in server.exchanges] == ["/api/v1/access_token"]
    _assert_no_secret(err)


def test_credentials_go_over_https_or_stay_on_this_machine(praw_env, shared_data, tmp_path, capsys):
    """Plain http is refused unless the host is loopback (the replay server's 127.0.0.1 passes above),
    whether the URL comes from a flag or from praw.ini."""
    store_dir = tmp_path / "store"
    (tmp_path / "praw.ini").write_text("[plain]\noauth_url=http://oauth.reddit.test\n")  # read once per process
    praw_env.setenv("PRAW_ALLOW_ENDPOINT_OVERRIDE", "1")  # PRAW's own warning about that praw.ini
    code = main(["crawl", "--subreddit", "funny", "--store", str(store_dir),
                 "--oauth-url", "https://oauth.reddit.test", "--reddit-url", "http://www.reddit.test:8080"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "http://www.reddit.test:8080 is not https" in err and "loopback" in err
    code = main(["crawl", "--subreddit", "funny", "--store", str(store_dir), "--site", "plain"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "http://oauth.reddit.test is not https" in err
    # a loopback host passes: the replay server by the name localhost
    with RedditReplay([shared_data / CASSETTE], CLIENT_ID, CLIENT_SECRET) as server:
        local = server.url.replace("127.0.0.1", "localhost")
        code = main(["crawl", "--subreddit", "funny", "--store", str(store_dir), "--max-requests", "2",
                     "--oauth-url", local, "--reddit-url", local])
        assert code == 0 and [e.path for e in server.exchanges] == ["/api/v1/access_token", "/r/funny/new"]
    assert [_is_loopback(h) for h in ("localhost", "127.0.0.2", "::1", "10.0.0.1", "reddit.com", None)] == \
        [True, True, True, False, False, False]
