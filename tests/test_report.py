"""`ahf report`: one self-contained HTML page, opened in a real headless browser (Debian's chromium driven by
Playwright): every figure drawn, no request but the file itself, no console error; Reddit text escaped;
missing tables named with what to run; reward-model figures equal to `ahf eval rm` on the same pairs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from ahf.cli import main

REPO = Path(__file__).resolve().parents[1]
README_SCREENSHOT = REPO / "docs" / "img" / "report.png"  # shown in the README; AHF_UPDATE_SCREENSHOTS=1 rewrites it


def _run(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    """`ahf demo`'s working directory (store, three exports, a reward model) and its result."""
    out = tmp_path_factory.mktemp("work") / "runs" / "demo"
    return out, _run(["demo", "--out", str(out), "--posts", "40", "--train-steps", "2", "--json"])


@pytest.fixture(scope="module")
def report(demo) -> tuple[Path, dict]:
    """The report of everything the demo made, written from the directory above `runs/` as a user would."""
    out, _ = demo
    exports = [a for fmt in ("pairs", "pointwise", "sft") for a in ("--export", f"runs/demo/exports/{fmt}")]
    with contextlib.chdir(out.parents[1]):
        result = _run(["report", "--store", "runs/demo/store", "--model", "runs/demo/models/rm", *exports,
                       "--out", "runs/demo/report.html", "--json"])
    return out / "report.html", result


def _open(browser, path: Path):
    """The page at `path` (file://), with every request it makes and every console error or page error."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.route(re.compile(r"^(https?|wss?|ftp)://"), lambda route: route.abort())  # nothing leaves the machine
    page.goto(path.as_uri(), wait_until="load")
    return page, requests, errors


def _assert_figures_drawn(page, expected: int) -> None:
    """Every figure is an SVG data URI that decoded, has a size on the page, and is not blank."""
    assert page.locator("img").count() == page.locator("figure img").count() == expected
    assert page.locator("script, link, iframe, object, embed, svg").count() == 0  # images only
    figures = page.locator("figure img")
    for i in range(expected):
        img = figures.nth(i)
        state = img.evaluate("e => ({done: e.complete, w: e.naturalWidth, h: e.naturalHeight, "
                             "src: e.src.slice(0, 26)})")
        assert state["done"] and state["w"] > 0 and state["h"] > 0, (i, state)
        assert state["src"] == "data:image/svg+xml;base64,"
        box = img.bounding_box()
        assert box["width"] >= 300 and box["height"] >= 120, (i, box)
        pixels = Image.open(io.BytesIO(img.screenshot())).convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20, (i, "blank figure")  # more than a background and a frame


def test_report_of_the_demo_in_a_browser(report, browser, tmp_path):
    page_path, result = report
    sections = {s["id"]: s for s in result["sections"]}
    assert list(sections) == ["corpus", "acts", "votes", "sentiment", "pairs", "model-1", "export-1", "export-2",
                              "export-3"]
    assert all(s["missing"] is None for s in sections.values())
    assert all(s["figures"] >= 1 for s in sections.values())
    assert sections["acts"]["examples"] == 12 and sections["pairs"]["examples"] == 6  # 3 per act, 3 per rule
    page, requests, errors = _open(browser, page_path)
    try:
        _assert_figures_drawn(page, result["figures"])
        assert requests == [page_path.as_uri()]  # the file itself, nothing else
        assert errors == []
        for s in result["sections"]:  # every section is on the page, captioned
            assert page.locator(f"section#{s['id']} h2").inner_text() == s["title"]
        assert page.locator("figcaption").count() == result["figures"]
        page.evaluate("window.scrollTo(0, 0)")
        screenshot = README_SCREENSHOT if os.environ.get("AHF_UPDATE_SCREENSHOTS") else tmp_path / "report.png"
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot))
    finally:
        page.close()
    assert Image.open(screenshot).size == (1280, 1000)


def test_reward_model_figures_are_eval_rm_on_the_same_pairs(demo, tmp_path):
    """`--pairs` scores the model on that file: the same figures as `ahf eval rm`; length-controlled accuracy
    counts exactly the pairs whose replies differ by less than 20 % in words."""
    out, result = demo
    test_pairs = out / "exports" / "pairs" / "test.jsonl"
    summary = _run(["report", "--no-store", "--model", str(out / "models" / "rm"), "--pairs", str(test_pairs),
                    "--out", str(tmp_path / "r.html"), "--json"])
    (evaluation,) = summary["models"][0]["evaluations"]
    tested = result["steps"]["evaluate reward model"]
    assert evaluation["eval"] == {k: tested[k] for k in ("pairs", "accuracy", "length_baseline")}
    rows = [json.loads(line) for line in test_pairs.read_text().splitlines()]
    similar = [r for r in rows if abs(len(r["chosen"].split()) - len(r["rejected"].split()))
               < 0.2 * max(len(r["chosen"].split()), len(r["rejected"].split()))]
    controlled = evaluation["length_controlled"]
    assert (controlled["pairs"], controlled["of"]) == (len(similar), len(rows))
    # without --pairs: the held-out pairs of training, read again as the trainer read them (the validation split)
    own = _run(["report", "--no-store", "--model", str(out / "models" / "rm"), "--out", str(tmp_path / "o.html"),
                "--json"])["models"][0]["evaluations"][0]
    held = result["steps"]["train reward model"]["eval"]
    assert own["eval"] == {k: held[k] for k in ("pairs", "accuracy", "length_baseline")}
    assert own["length_controlled"]["of"] == held["pairs"]


def _small_store(root: Path) -> Path:
    """A store with posts, comments and turns only (no acts, labels or pairs), one reply carrying markup."""
    post = {"id": "p1", "title": "What is your favourite <b>bold</b> story?", "selftext": "", "author": "op",
            "score": 50, "created_utc": 1_600_000_000, "subreddit": "tests", "num_comments": 4,
            "retrieved_on": 1_600_100_000}
    bodies = ["<script>document.title = 'pwned'</script><img src=x onerror=\"document.title = 'pwned'\"> "
              "Once upon a time there was a reply full of markup.",
              "A plain reply that tells a short story about a lighthouse keeper.",
              "Another reply, about a dragon who collected spoons.",
              "A fourth reply, quite short but long enough."]
    comments = [{"id": f"c{i}", "link_id": "t3_p1", "parent_id": "t3_p1", "author": f"u{i}", "body": body,
                 "score": 10 - i, "created_utc": 1_600_000_100 + 60 * i, "subreddit": "tests",
                 "retrieved_on": 1_600_100_000} for i, body in enumerate(bodies)]
    data = root / "RC_small.ndjson"
    data.write_text("".join(json.dumps(r) + "\n" for r in [post, *comments]))
    store = root / "store"
    _run(["ingest", str(data), "--store", str(store), "--json"])
    return store


def test_missing_tables_say_what_to_run_and_reddit_text_is_escaped(tmp_path, browser):
    import pyarrow as pa

    from mining.schema import ACT_SCHEMA
    from mining.store import Store

    store = _small_store(tmp_path)
    page_path = tmp_path / "small.html"
    result = _run(["report", "--store", str(store), "--out", str(page_path), "--json"])
    missing = {s["id"]: s["missing"] for s in result["sections"]}
    assert missing["corpus"] is None
    assert "`ahf acts tag`" in missing["acts"]
    assert all("`ahf label`" in missing[s] for s in ("votes", "sentiment", "pairs"))
    html = page_path.read_text()
    assert "run <code>ahf label</code> to fill it" in html  # said on the page, too
    # the reply with markup as an act example: shown as text, never run
    with Store(store) as s:
        s.replace_tables({"acts": pa.table({"comment_id": ["c0"], "act": ["story"], "confidence": [0.9]},
                                           schema=ACT_SCHEMA)})
    result = _run(["report", "--store", str(store), "--out", str(page_path), "--json"])
    assert next(s for s in result["sections"] if s["id"] == "acts")["examples"] == 1
    assert "<script>document" not in page_path.read_text()
    page, requests, errors = _open(browser, page_path)
    try:
        assert page.title() == "ahf report"
        text = page.locator("section#acts .example").inner_text()
        assert "<script>document.title = 'pwned'</script><img src=x" in text and "<b>bold</b>" in text
        _assert_figures_drawn(page, result["figures"])
        assert requests == [page_path.as_uri()] and errors == []
    finally:
        page.close()


def test_length_controlled_keeps_replies_within_20_percent():
    from ahf.report.model_sections import length_controlled
    from training.data import Pair

    def words(n: int) -> str:
        return " ".join(["w"] * n)

    pairs = [Pair("p", words(10), words(12)), Pair("p", words(13), words(10)), Pair("p", words(5), words(5)),
             Pair("p", "", "")]
    assert length_controlled(pairs) == [pairs[0], pairs[2]]  # 2 < 2.4 kept; 3 < 2.6 not; 0 < 0 not


def test_usage_errors(tmp_path, capsys):
    assert main(["report", "--no-store", "--out", str(tmp_path / "r.html")]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert main(["report", "--no-store", "--export", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "not an ahf export" in capsys.readouterr().err
    assert main(["report", "--no-store", "--model", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "not an ahf model directory" in capsys.readouterr().err
    (tmp_path / "v.json").write_text("[1, 2]")
    assert main(["report", "--no-store", "--validation", str(tmp_path / "v.json"), "--out", str(tmp_path / "r.html")]) == 2
    assert "not a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    # a store that is not there is a section saying so, not a crash
    result = _run(["report", "--store", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.html"), "--json"])
    assert "no store at" in result["sections"][0]["missing"]


def test_report_of_a_real_dump_in_a_browser(shared_data, tmp_path, browser):
    """A comment-only dump (RC_2005-12: no posts, so no posting delays or post scores) labelled but not tagged:
    the report draws what there is, says what it cannot, and still opens clean."""
    store = tmp_path / "store"
    _run(["ingest", str(shared_data / "pushshift" / "RC_2005-12.zst"), "--store", str(store), "--json"])
    _run(["label", "--store", str(store), "--json"])
    page_path = tmp_path / "real.html"
    result = _run(["report", "--store", str(store), "--out", str(page_path), "--json"])
    sections = {s["id"]: s for s in result["sections"]}
    assert "`ahf acts tag`" in sections["acts"]["missing"]
    assert all(sections[s]["missing"] is None and sections[s]["figures"] >= 2
               for s in ("corpus", "votes", "sentiment", "pairs"))
    html = page_path.read_text()
    assert "No confound figure for the posting delay after the post and the post score" in html
    assert "(none: the post is not in the store)" in html  # example pairs without a prompt say why
    page, requests, errors = _open(browser, page_path)
    try:
        _assert_figures_drawn(page, result["figures"])
        assert requests == [page_path.as_uri()] and errors == []
    finally:
        page.close()
