"""A labelled check set for act tagging, built from the real data in `../shared/data`.

Writes Pushshift-style NDJSON (`RS_checkset.ndjson` posts, `RC_checkset.ndjson` comments) and
`labels.json` ({comment_id: act}) into an output directory, with every subreddit set to one neutral
name so that nothing but the text and the thread structure can give an act away:

- story: `writingprompts/fan2018_500.csv`, each prompt a post (title, e.g. "[WP] ...") and its
  story a top-level reply. The Fan et al. text is tokenised ("[ WP ]", "do n't"); it is joined
  back the way Reddit shows it. The machine-written `completion` column is never used.
- explanation: `explanations/validity_annotation.jsonl`, rows from ELI5 judged valid answers:
  the question a post (its real `q_id`), each answer a top-level reply (its real `a_id`).
- other: every comment of `pushshift/RC_2005-12.zst` (real 2005 reply pairs; their posts are not
  in the dump, as in the real thing), labelled `other`.

Then: `ahf ingest OUT/*.ndjson --store S && ahf index --store S && ahf acts tag --store S &&
ahf eval acts --store S --labels OUT/labels.json`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from ahf.console import UserError
from ahf.text import detokenize
from mining.schema import base36

NEUTRAL_SUBREDDIT = "threads"
EPOCH = 1_400_000_000

STORIES = Path("writingprompts/fan2018_500.csv")
EXPLANATIONS = Path("explanations/validity_annotation.jsonl")
DISTRACTORS = Path("pushshift/RC_2005-12.zst")


@dataclass
class CheckSet:
    posts: list[dict]
    comments: list[dict]
    labels: dict[str, str]
    skipped: dict[str, int]

    def counts(self) -> dict:
        out: dict[str, int] = {}
        for act in self.labels.values():
            out[act] = out.get(act, 0) + 1
        return {"posts": len(self.posts), "comments": len(self.comments), "labels": dict(sorted(out.items())),
                "skipped": self.skipped}


def _post(pid: str, title: str, t: int, subreddit: str) -> dict:
    return {"id": pid, "title": title, "selftext": "", "author": f"op_{pid}", "score": 1,
            "created_utc": t, "subreddit": subreddit, "over_18": False, "num_comments": 1,
            "retrieved_on": t + 86_400}


def _comment(cid: str, pid: str, body: str, t: int, subreddit: str) -> dict:
    return {"id": cid, "link_id": f"t3_{pid}", "parent_id": f"t3_{pid}", "author": f"u_{cid}",
            "body": body, "score": 1, "created_utc": t + 600, "subreddit": subreddit,
            "retrieved_on": t + 86_400}


def _read(data_dir: Path, rel: Path) -> Path:
    path = data_dir / rel
    if not path.exists():
        raise UserError(f"check-set source missing: {path}")
    return path


def build_checkset(data_dir: str | Path, subreddit: str = NEUTRAL_SUBREDDIT, max_stories: int | None = None,
                   max_explanations: int | None = None, max_distractors: int | None = None) -> CheckSet:
    """The check set in memory; `max_*` take the first N of each source (whole threads for distractors)."""
    data_dir = Path(data_dir)
    posts, comments, labels = [], [], {}
    skipped: dict[str, int] = {}

    with open(_read(data_dir, STORIES), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # The file ends with aggregate rows ("average", "std") of its metric columns: not stories.
    stories = [row for row in rows if row["row_id"].strip().isdigit()]
    if len(stories) < len(rows):
        skipped["fan2018_aggregate_rows"] = len(rows) - len(stories)
    for i, row in enumerate(stories[:max_stories]):
        story = detokenize(row["story"])
        if not story:
            raise UserError(f"{STORIES}: row {i + 2} (row_id {row['row_id']}) has an empty story")
        pid = "wp" + base36(int(row["row_id"]))
        t = EPOCH + 3_600 * i
        posts.append(_post(pid, detokenize(row["prompt"]), t, subreddit))
        comments.append(_comment("ws" + base36(int(row["row_id"])), pid, story, t, subreddit))
        labels[comments[-1]["id"]] = "story"

    questions: dict[str, dict] = {}
    taken = 0
    with open(_read(data_dir, EXPLANATIONS), encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            row = json.loads(line)
            if row.get("dataset") != "ELI5" or not row.get("is_valid"):
                continue
            if max_explanations is not None and taken >= max_explanations:
                break
            answer = (row.get("answer_paragraph") or "").strip()
            if not answer or not row.get("q_id") or not row.get("a_id"):
                raise UserError(f"{EXPLANATIONS}: line {line_no}: missing answer_paragraph, q_id or a_id")
            pid, cid = row["q_id"], row["a_id"]
            t = EPOCH + 7_200 * line_no
            if pid not in questions:
                questions[pid] = _post(pid, row["question"].strip(), t, subreddit)
            comments.append(_comment(cid, pid, answer, t, subreddit))
            labels[cid] = "explanation"
            taken += 1
    posts.extend(questions.values())

    links: set[str] = set()
    n_other = 0
    reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(
        open(_read(data_dir, DISTRACTORS), "rb"))
    buffer = b""
    with reader:
        while chunk := reader.read(1 << 20):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                record = orjson.loads(line)
                link = record["link_id"]
                # Whole threads only: once enough distractors are in, no new thread is opened.
                if max_distractors is not None and link not in links and n_other >= max_distractors:
                    continue
                links.add(link)
                record["subreddit"] = subreddit
                comments.append(record)
                labels[record["id"]] = "other"
                n_other += 1
    if len(labels) != len(comments):
        raise UserError("check set: comment ids collide between sources")
    return CheckSet(posts=posts, comments=comments, labels=labels, skipped=skipped)


def write_checkset(checkset: CheckSet, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RS_checkset.ndjson").write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in checkset.posts))
    (out / "RC_checkset.ndjson").write_bytes(b"".join(orjson.dumps(c) + b"\n" for c in checkset.comments))
    (out / "labels.json").write_text(json.dumps(checkset.labels, indent=1, sort_keys=True))
    return {"dir": str(out), **checkset.counts()}
