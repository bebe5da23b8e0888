"""`ahf serve` end to end: a real uvicorn server on a free loopback port over a real store (the
generated corpus plus a thread of hostile HTML, ingested, indexed, tagged and labelled), driven by
Debian's Chromium through Playwright, and by plain HTTP for the error cases.

The browser searches for an act with text, opens a hit's thread, follows a pair, browses pairs by
rule and downloads selections; every download must equal, row for row, what `ahf export` writes for
those turns, and the page must log no console error and ask nothing of any other origin.
"""

from __future__ import annotations

import json
import os
import subprocess
import signal
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[1]
EPOCH = 1_600_000_000
SEARCH_TEXT = "why does ice float on water"

# A thread whose title and bodies are HTML and script: they must be shown as text, never run. Six
# turns (enough for vote tiers); zh5 repeats zh4 word for word, a duplicate the export drops.
HOSTILE_POST = {"id": "zzhost", "title": "<script>alert('title')</script> ELI5: why is HTML hard?",
                "selftext": "<b>bold</b> & <i>italic</i>", "author": "synth_x", "score": 50, "created_utc": EPOCH,
                "subreddit": "synthetic_explain", "num_comments": 6, "retrieved_on": EPOCH + 86_400 * 30}
HOSTILE_COMMENTS = [
    {"id": f"zh{i}", "link_id": "t3_zzhost", "parent_id": "t1_zh0" if i == 2 else "t3_zzhost", "author": f"synth_h{i}",
     "body": f"<script>document.title='pwned{min(i, 4)}'</script> Basically it happens because "
             f"<img src=x onerror=alert({min(i, 4)})> browsers parse tags, think of it like this.",
     "score": 10 - i, "created_utc": EPOCH + 100 * (i + 1), "subreddit": "synthetic_explain",
     "retrieved_on": EPOCH + 86_400 * 30}
    for i in range(6)]


def _write_hostile(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    posts, comments = folder / "RS_hostile.ndjson", folder / "RC_hostile.ndjson"
    posts.write_bytes(orjson.dumps(HOSTILE_POST) + b"\n")
    comments.write_bytes(b"".join(orjson.dumps(c) + b"\n" for c in HOSTILE_COMMENTS))
    return [posts, comments]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The generated corpus (40 posts) and the hostile thread, through every stage the explorer reads, in a
    DuckDB-file store (test_a_delta_store_serves_the_same_pages migrates a copy: both formats are served)."""
    from feedback.labels import label_store
    from index.acts import tag_acts
    from index.build import build_index
    from mining.ingest import ingest
    from mining.synthetic import SyntheticSpec, generate

    work = tmp_path_factory.mktemp("serve")
    corpus = generate(work / "corpus", SyntheticSpec(posts=40))
    store = work / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AHF_STORE_FORMAT", "duckdb")
        ingest([corpus["posts"], corpus["comments"], *_write_hostile(work / "corpus")], store)
    build_index(store, threads=2)
    tag_acts(store)
    label_store(store)
    return store


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory) -> dict[str, list[dict]]:
    """Every row `ahf export` writes, per format (all splits)."""
    from feedback.export import export_dataset

    out = tmp_path_factory.mktemp("exports")
    rows = {}
    for fmt in ("pairs", "pointwise", "sft"):
        report = export_dataset(store, fmt, out / fmt)
        rows[fmt] = [json.loads(line) for split in report.rows
                     for line in (out / fmt / f"{split}.jsonl").read_text().splitlines()]
    return rows


@pytest.fixture(scope="module")
def server(store):
    from ahf.serve import create_app, running

    app = create_app(store)
    app.state.explorer.warm()
    with running(app) as url:
        yield url, app
    app.close()


class Watched:
    """A fresh browser page that records console errors, page errors, dialogs and every request."""

    def __init__(self, browser, base: str):
        self.base = base
        self.context = browser.new_context(accept_downloads=True)
        self.page = self.context.new_page()
        self.errors, self.requests, self.dialogs = [], [], []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def goto(self, path: str):
        response = self.page.goto(self.base + path)
        assert response.status == 200, (path, response.status)
        return self.page

    def download(self, selector: str) -> list[dict]:
        with self.page.expect_download() as info:
            self.page.click(selector)
        return [json.loads(line) for line in Path(info.value.path()).read_text().splitlines()]

    def check_clean(self) -> None:
        assert not self.errors, self.errors
        assert not self.dialogs, self.dialogs
        outside = [u for u in self.requests if not u.startswith(self.base + "/")]
        assert not outside, outside
        self.context.close()


def _turn_rows(rows: list[dict], ids) -> list[dict]:
    ids = set(ids)
    return sorted((r for r in rows if r["comment_id"] in ids), key=lambda r: (r["post_id"], r["comment_id"]))


def _pair_rows(rows: list[dict], keep) -> list[dict]:
    return sorted((r for r in rows if keep(r)), key=lambda r: (r["post_id"], r["chosen_id"], r["rejected_id"], r["rule"]))


def _get(url: str, headers: dict | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


# ------------------------------------------------------------------------------------ the browser

def test_browser_searches_an_act_opens_its_thread_follows_a_pair_and_downloads(store, server, browser, exported,
                                                                                  tmp_path):
    from index.query import query
    from mining.store import Store

    base, _ = server
    w = Watched(browser, base)
    page = w.goto("/")
    assert "turns" in page.inner_text("p.counts")
    # search: an act and a text, from the home page's form
    page.select_option("select[name=act]", "explanation")
    page.fill("input[name=text]", SEARCH_TEXT)
    page.click("form.search button")
    page.wait_for_url("**/search?**")
    hits = [loc.get_attribute("id").removeprefix("hit-") for loc in page.locator("li.hit").all()]
    # the ranking of `ahf query` (index.query.query, the library function behind it), hit for hit
    assert hits == [h["comment_id"] for h in query(store, "explanation", SEARCH_TEXT, k=10)]
    assert len(hits) == 10 and page.locator("li.hit .act", has_text="explanation").count() == 10
    page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

    # the selection as TRL rows: what `ahf export` writes for these turns, in each format
    assert w.download("#download-pointwise") == _turn_rows(exported["pointwise"], hits)
    assert w.download("#download-sft") == _turn_rows(exported["sft"], hits)
    assert w.download("#download-pairs") == _pair_rows(
        exported["pairs"], lambda r: r["chosen_id"] in hits or r["rejected_id"] in hits)

    # open the thread of the first hit with a tier that is in a pair: the reply is the anchor, with its labels
    paired = next(cid for cid in hits if page.locator(f"#hit-{cid} .metric", has_text=" pair").count()
                  and not page.locator(f"#hit-{cid} .tier-none").count())
    page.click(f"#hit-{paired} a.thread-link")
    page.wait_for_url(f"**/thread/*#c-{paired}")
    node = page.locator(f"#c-{paired}")
    with Store(store, read_only=True) as s:
        tier, adjusted, sentiment = s.rows("SELECT tier, adjusted, reply_sentiment_weighted FROM labels "
                                           "WHERE comment_id = $c", {"c": paired})[0]
    meta = node.locator(".meta").first.inner_text()
    assert "explanation" in meta and f"adjusted {adjusted:.2f}" in meta and (tier or "no tier") in meta
    assert (f"reply sentiment {sentiment:.2f}" if sentiment is not None else "reply sentiment –") in meta
    assert page.locator(".node").count() > 1 and page.locator(".node.d1").count() >= 1  # an indented tree
    page.screenshot(path=str(tmp_path / "thread.png"), full_page=True)

    # follow one of its pairs, then back to the thread
    pair_link = node.locator("a.pair-link").first
    role = "chosen" if "chosen over" in pair_link.inner_text() else "rejected"
    other = pair_link.inner_text().split()[-1]
    pair_link.click()
    page.wait_for_url("**/pair?**")
    assert paired in page.inner_text(f"#side-{role} h2")
    assert other in page.inner_text(f"#side-{'rejected' if role == 'chosen' else 'chosen'} h2")
    assert page.inner_text(".prompt").strip()
    page.screenshot(path=str(tmp_path / "pair.png"), full_page=True)
    page.click("#pair-thread")
    page.wait_for_url("**/thread/*#c-*")

    # the thread's own selection
    thread_id = page.url.split("/thread/")[1].split("#")[0]
    with Store(store, read_only=True) as s:
        thread_turns = [r[0] for r in s.rows("SELECT comment_id FROM turns WHERE post_id = $p", {"p": thread_id})]
    assert w.download("#download-pointwise") == _turn_rows(exported["pointwise"], thread_turns)

    # pairs by rule: the shp tab, its second page, one pair, and the rule's download
    page = w.goto("/pairs")
    page.click("nav.tabs a:has-text('shp')")
    page.wait_for_url("**/pairs?rule=shp")
    page.click("a[rel=next]")
    page.wait_for_url("**page=2")
    assert page.locator("li.pair").count() > 0
    page.locator("a.open-pair").first.click()
    page.wait_for_url("**/pair?**")
    page.go_back()
    assert w.download("#download-pairs") == _pair_rows(exported["pairs"], lambda r: r["rule"] == "shp")
    page.screenshot(path=str(tmp_path / "pairs.png"), full_page=True)
    w.check_clean()


def test_reddit_text_is_shown_never_run(server, browser):
    base, _ = server
    w = Watched(browser, base)
    page = w.goto("/thread/zzhost")
    assert page.title().startswith("<script>alert('title')</script>")  # the title, as text
    assert page.locator("script").count() == 0 and page.locator("main img").count() == 0
    body = page.inner_text("main")
    for comment in HOSTILE_COMMENTS:
        assert comment["body"] in body
    assert "<b>bold</b> & <i>italic</i>" in body
    # the same text in search hits and on a pair page
    page = w.goto("/search?act=explanation&text=browsers+parse+tags&k=3")
    assert "<script>document.title=" in page.inner_text("ol.hits")
    page = w.goto("/pair?chosen=zh0&rejected=zh1")
    assert HOSTILE_COMMENTS[1]["body"] in page.inner_text("#side-rejected")
    assert page.locator("script").count() == 0
    w.check_clean()  # no dialog opened, no request elsewhere (the <img src=x> never loaded)


# ------------------------------------------------------------------------------------ HTTP

@pytest.mark.parametrize("path, status, message", [
    ("/search?act=poem", 400, "unknown act 'poem'; the acts of this store: explanation, other, qa, story, summary"),
    ("/search?act=story&k=0", 400, "k must be a whole number from 1 to 100"),
    ("/search?act=story&k=1000000000000000", 400, "k must be a whole number from 1 to 100"),
    ("/search?act=story&k=ten", 400, "k must be a whole number"),
    ("/search?act=story&text=" + "a" * 501, 400, "text is 501 characters long; at most 500"),
    ("/search?act=story&subreddit=nowhere", 400, "no turn of this store is in the subreddit 'nowhere'"),
    ("/thread/abc123", 404, "no thread 'abc123' in this store"),
    ("/thread/a%3Cb", 400, "the thread id must be a Reddit id"),
    ("/pairs?rule=best", 400, "unknown pair rule 'best'"),
    ("/pairs?rule=shp&page=0", 400, "page must be a whole number from 1"),
    ("/pairs?rule=shp&page=99999", 404, "past the last page"),
    ("/pair?chosen=zh0", 400, "rejected must be a Reddit id"),
    ("/pair?chosen=zh1&rejected=zh0", 404, "no pair with chosen 'zh1' and rejected 'zh0'"),
    ("/download/search?act=story&format=csv", 400, "format must be one of pairs, pointwise, sft"),
    ("/download/search?text=dragons", 400, "an act is required; the acts of this store: explanation"),
    ("/download/thread/nothread?format=sft", 404, "no thread 'nothread'"),
    ("/download/pairs?rule=shp&format=sft", 400, "the pairs page downloads its pairs"),
    ("/no/such/page", 404, "no page at /no/such/page"),
])
def test_a_bad_parameter_gets_a_message_never_a_traceback(server, path, status, message):
    import html

    base, _ = server
    code, body, headers = _get(base + path)
    assert code == status, body
    assert message in html.unescape(body)
    assert "Traceback" not in body
    assert headers["content-security-policy"].startswith("default-src 'none'")


def test_only_loopback_host_names_are_answered(server):
    base, _ = server
    port = base.rsplit(":", 1)[1]
    assert _get(base + "/", {"Host": f"localhost:{port}"})[0] == 200
    code, body, _ = _get(base + "/", {"Host": f"attacker.example:{port}"})  # a DNS name rebound to 127.0.0.1
    assert code == 400 and "loopback requests only" in body


def test_kept_alive_responses_do_not_wait_for_a_delayed_ack(server):
    """A response's headers and body leave together (TCP_NODELAY on the accepted sockets): without
    it each response on a kept-alive connection waited for the client's delayed ACK, >= 40 ms."""
    import http.client

    base, _ = server
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    seconds = []
    for _ in range(21):
        started = time.perf_counter()
        conn.request("GET", "/static/favicon.svg")
        conn.getresponse().read()
        seconds.append(time.perf_counter() - started)
    conn.close()
    assert sorted(seconds)[10] < 0.035, seconds


def test_downloads_equal_the_export_for_every_thread_and_format(server, exported):
    """Over plain HTTP, every thread of the store: the rows of each format equal `ahf export`'s."""
    from mining.store import Store

    base, app = server
    with Store(app.state.explorer.store_dir, read_only=True) as s:
        threads = s.rows("SELECT post_id, list(comment_id) FROM turns GROUP BY post_id ORDER BY post_id")
    assert len(threads) > 30
    # the export dropped the hostile thread's repeated reply, and so does the download
    assert {"zh4", "zh5"} & {r["comment_id"] for r in exported["pointwise"]} == {"zh4"}
    for post_id, ids in threads:
        for fmt in ("pointwise", "sft", "pairs"):
            code, body, headers = _get(f"{base}/download/thread/{post_id}?format={fmt}")
            assert code == 200 and headers["content-disposition"].endswith(f'-{fmt}.jsonl"')
            rows = [json.loads(line) for line in body.splitlines()]
            assert int(headers["x-ahf-rows"]) == len(rows)
            want = (_pair_rows(exported[fmt], lambda r: r["post_id"] == post_id) if fmt == "pairs"
                    else _turn_rows(exported[fmt], ids))
            assert rows == want, (post_id, fmt)


def test_a_delta_store_serves_the_same_pages(store, server, tmp_path):
    """The same store as Delta Lake tables (`ahf store migrate`): every page and download is the same."""
    import shutil

    from ahf.serve import create_app, running
    from mining.delta_store import migrate_to_delta

    base, _ = server
    delta = tmp_path / "store"
    shutil.copytree(store, delta)
    migrate_to_delta(delta)
    paths = ["/", f"/search?act=explanation&text={SEARCH_TEXT.replace(' ', '+')}", "/search?act=story&k=20",
             "/thread/zzhost", "/pairs?rule=time_adjacent&page=2", "/pair?chosen=zh0&rejected=zh1",
             "/download/thread/zzhost?format=pointwise", "/download/search?act=explanation&format=pairs",
             "/download/pairs?rule=shp", "/search?act=poem"]
    app = create_app(delta)
    with running(app) as delta_base:
        for path in paths:
            want, got = _get(base + path), _get(delta_base + path)
            assert got[0] == want[0], path
            assert got[1].replace(str(delta), "STORE") == want[1].replace(str(store), "STORE"), path
    app.close()


def test_serve_refuses_a_public_host_without_public(capsys):
    from ahf.cli import main
    from ahf.serve import is_loopback

    assert main(["serve", "--host", "0.0.0.0", "--store", "nowhere"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "0.0.0.0", "::",
                                     "192.168.1.5", "example.com")] == [True] * 5 + [False] * 4


# ------------------------------------------------------------------------------------ a bare store

@pytest.fixture(scope="module")
def bare_store(tmp_path_factory) -> Path:
    """Turns only (no acts, labels or index): the hostile thread alone, in a DuckDB file (the busy-writer
    test holds its lock; a Delta store has none to hold)."""
    from mining.ingest import ingest

    work = tmp_path_factory.mktemp("bare")
    store = work / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AHF_STORE_FORMAT", "duckdb")
        ingest(_write_hostile(work / "corpus"), store)
    return store


def test_a_busy_store_says_so_and_opens_when_the_writer_is_done(bare_store):
    from ahf.serve import create_app, running

    writer = subprocess.Popen([sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
                               "print('writing', flush=True); sys.stdin.read()", str(bare_store / "ahf.duckdb")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        app = create_app(bare_store)
        with running(app) as base:
            code, body, _ = _get(base + "/thread/zzhost")
            assert code == 503 and "is busy: another process" in body
            writer.stdin.close()
            writer.wait(timeout=30)
            assert _get(base + "/thread/zzhost")[0] == 200
            # the stages not run yet are named, not failed on
            code, body, _ = _get(base + "/search?act=story")
            assert code == 503 and "no dialog acts yet: run `ahf index` and `ahf acts tag`" in body
            assert _get(base + "/search")[0] == 200
            assert "has no preference pairs: run `ahf label`" in _get(base + "/pairs")[1]
            assert "has no labels: run `ahf label`" in _get(base + "/download/thread/zzhost?format=sft")[1]
        app.close()
    finally:
        writer.kill()
        writer.wait()


def test_the_serve_verb_serves_until_stopped(bare_store):
    ahf = Path(sys.executable).with_name("ahf")
    proc = subprocess.Popen([str(ahf), "serve", "--store", str(bare_store), "--port", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        started = json.loads(proc.stdout.readline())
        assert started["url"].startswith("http://127.0.0.1:") and started["public"] is False
        code, body, _ = _get(started["url"] + "/")
        assert code == 200 and "6 turns" in body
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 130


def test_the_templates_and_assets_are_package_data():
    """Every file the app serves or renders is matched by pyproject's package data (a wheel has them)."""
    from fnmatch import fnmatch

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ahf.serve"]
    folder = REPO / "ahf" / "serve"
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    assert {"templates/base.html", "static/style.css"} <= set(files)
    assert all(any(fnmatch(f, g) for g in globs) for f in files), files
    assert "ahf.serve" in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
