"""`SyntheticSpec.reaction_scale`: more reactions under each comment, the default corpus unchanged."""

import collections
import hashlib
from pathlib import Path

import orjson
import pytest
import zstandard

from mining.synthetic import SyntheticSpec, generate

# sha256 of posts + comments + truth, computed before reaction_scale existed (the demo's corpus, and a small one)
DEFAULT_DIGEST = "ca0f7b28a086120411ff5477ca4ed180b4eb23a62a04fdef80788ca01599be79"
SMALL_DIGEST = "2ca39732a515d5240dcaaee6dfcaee032746da0fdeb100f57c2087d4fc27fbcd"


def _digest(paths: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for key in ("posts", "comments", "truth"):
        h.update(Path(paths[key]).read_bytes())
    return h.hexdigest()


def _turns_with_replies(paths: dict[str, Path], at_least: int) -> int:
    data = zstandard.ZstdDecompressor().decompress(Path(paths["comments"]).read_bytes(), max_output_size=1 << 30)
    replies = collections.Counter(orjson.loads(line)["parent_id"] for line in data.splitlines())
    return sum(1 for parent, n in replies.items() if parent.startswith("t1_") and n >= at_least)


@pytest.mark.parametrize("spec, digest", [(SyntheticSpec(), DEFAULT_DIGEST),
                                          (SyntheticSpec(posts=40, seed=3, reaction_scale=1.0), SMALL_DIGEST)])
def test_default_scale_writes_the_same_bytes(tmp_path, spec, digest):
    assert _digest(generate(tmp_path, spec)) == digest


def test_scale_raises_turns_with_two_replies(tmp_path):
    base = _turns_with_replies(generate(tmp_path / "base", SyntheticSpec(posts=100)), 2)
    more = _turns_with_replies(generate(tmp_path / "more", SyntheticSpec(posts=100, reaction_scale=5)), 2)
    fractional = _turns_with_replies(generate(tmp_path / "frac", SyntheticSpec(posts=100, reaction_scale=2.5)), 2)
    assert base < 10 and more > 5 * max(base, 10)
    assert base < fractional < more


def test_scale_keeps_sentiment_following_the_parent(tmp_path):
    """The planted rule still holds with more reactions: positive replies mostly under good parents."""
    paths = generate(tmp_path, SyntheticSpec(posts=60, reaction_scale=5))
    truth = [orjson.loads(line) for line in Path(paths["truth"]).read_bytes().splitlines()]
    data = zstandard.ZstdDecompressor().decompress(Path(paths["comments"]).read_bytes(), max_output_size=1 << 30)
    parent_of = {c["id"]: c["parent_id"] for c in map(orjson.loads, data.splitlines())}
    quality = {t["comment_id"]: t["quality"] for t in truth}
    under_good = [t["sentiment"] == "positive" for t in truth if t["sentiment"] and
                  quality.get(parent_of[t["comment_id"]][3:], 0) >= 0.5]
    under_bad = [t["sentiment"] == "positive" for t in truth if t["sentiment"] and
                 parent_of[t["comment_id"]][3:] in quality and quality[parent_of[t["comment_id"]][3:]] < 0.5]
    assert len(under_good) > 100 and len(under_bad) > 20
    assert sum(under_good) / len(under_good) > 0.75 > 0.25 > sum(under_bad) / len(under_bad)


def test_scale_must_be_positive():
    with pytest.raises(ValueError, match="reaction_scale"):
        SyntheticSpec(reaction_scale=0)
