"""A synthetic Reddit corpus in Pushshift format, for `ahf demo` (real Reddit text cannot ship).

Everything it writes is labelled synthetic: subreddits are named `synthetic_*`, authors `synth_*`,
and every record carries `"_synthetic": true`. The shapes follow real threads: heavy-tailed
replies per post, reply depth from a decaying branching process, log-normal scores that favour
early replies (the confound the feedback stage corrects), and replies of the four dialog acts the
index stage looks for (story, explanation, qa answer, TL;DR summary) plus chit-chat and reactions
whose sentiment the feedback stage reads.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from mining.schema import base36

EPOCH = 1_600_000_000  # 2020-09-13, a fixed start so the corpus is the same on every machine

_SUBJECTS = ["a lighthouse keeper", "the last librarian", "a retired astronaut", "two rival chefs",
             "a dragon who hates gold", "a time traveller", "the town's only dentist", "a talking cat"]
_EVENTS = ["finds a door that was not there yesterday", "receives a letter from the future",
           "wakes up with everyone's memories", "is offered a deal by the moon",
           "discovers the museum is about them", "must guard a secret for one more night"]
_TOPICS = ["the sky looks blue", "bread rises", "planes stay in the air", "ice floats on water",
           "we get goosebumps", "magnets stick to the fridge", "the moon changes shape", "cats purr"]
_MECHANISMS = ["light scatters off small molecules", "yeast releases gas while it eats sugar",
               "air moves faster over the curved wing", "water expands as it freezes",
               "tiny muscles pull each hair upright", "spinning electrons line up in the metal",
               "we see different parts of its lit half", "their voice box twitches as they breathe"]
_QUESTIONS = ["What is a good first programming language?", "How long should I boil an egg?",
              "Which is the capital of Australia?", "Is it safe to run every day?",
              "Where can I learn to draw for free?", "How do I keep basil alive?"]
_ANSWERS = ["Python, because its syntax stays out of your way.", "About nine minutes for a firm yolk.",
            "Canberra, not Sydney as many people think.", "Yes, if you build up slowly and rest when sore.",
            "Try the free courses at your local library site.", "Water it often and give it a sunny window."]
_POSITIVE = ["This is wonderful, thank you!", "Great story, I loved the ending.", "Best explanation I've read.",
             "Amazing, this made my day.", "Perfect answer, really helpful."]
_NEGATIVE = ["This is wrong and confusing.", "Terrible, I hated this.", "Boring and way too long.",
             "Awful advice, please don't do this.", "That makes no sense at all."]
_CHATTER = ["I was thinking the same thing.", "Does anyone know where this was taken?", "Saving this for later.",
            "My grandmother used to say that.", "Same thing happened to me last week."]
_WORDS = ("the night was quiet and the wind kept its secrets while the old house waited for someone "
          "to remember its name so the story went on through rain and morning light").split()


@dataclass(frozen=True)
class SyntheticSpec:
    posts: int = 120
    mean_top_level: float = 6.0
    seed: int = 7


def _prose(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 16))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def _post(rng: random.Random, kind: str) -> tuple[str, str, str]:
    """(subreddit, title, selftext) of one post of the given act family."""
    if kind == "story":
        return "synthetic_stories", f"[WP] {rng.choice(_SUBJECTS).capitalize()} {rng.choice(_EVENTS)}.", ""
    if kind == "explanation":
        return "synthetic_explain", f"ELI5: Why {rng.choice(_TOPICS)}?", ""
    if kind == "qa":
        return "synthetic_questions", rng.choice(_QUESTIONS), ""
    return "synthetic_life", "Long day at work, need to vent", _prose(rng, rng.randint(12, 20))


def _reply(rng: random.Random, kind: str, depth: int, parent_text: str) -> str:
    if depth > 1:
        if parent_text.endswith("?") or rng.random() < 0.25:
            return rng.choice(_ANSWERS)
        return rng.choice(_POSITIVE if rng.random() < 0.6 else _NEGATIVE + _CHATTER)
    if kind == "story":
        return _prose(rng, rng.randint(6, 14))
    if kind == "explanation":
        i = rng.randrange(len(_MECHANISMS))
        return (f"Basically, it happens because {_MECHANISMS[i]}. Think of it like this: "
                f"{_prose(rng, 2)} That is why {_TOPICS[i]}.")
    if kind == "qa":
        return rng.choice(_ANSWERS)
    return f"{_prose(rng, 2)}\n\nTL;DR: {_prose(rng, 1)}" if rng.random() < 0.5 else rng.choice(_CHATTER)


def generate(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> dict[str, Path]:
    """Write `RS_synthetic.zst` (posts) and `RC_synthetic.zst` (comments) in Pushshift NDJSON."""
    rng = random.Random(spec.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    posts, comments = [], []
    next_comment = 36**4
    kinds = ["story", "explanation", "qa", "life"]
    for p in range(spec.posts):
        kind = kinds[p % len(kinds)]
        subreddit, title, selftext = _post(rng, kind)
        post_id = base36(36**5 + p)
        created = EPOCH + p * 3_600 + rng.randint(0, 1_800)
        n_top = min(60, int(rng.lognormvariate(math.log(spec.mean_top_level), 0.8)))
        thread = []
        frontier = [(f"t3_{post_id}", title, created, 1, 1.0)]
        while frontier:
            parent, parent_text, parent_time, depth, appeal = frontier.pop()
            n_children = n_top if depth == 1 else int(rng.random() < 0.55 / depth) + int(rng.random() < 0.2 / depth)
            for _ in range(n_children):
                cid = base36(next_comment)
                next_comment += 1
                delay = int(rng.expovariate(1 / (2_400 * depth)))
                when = parent_time + 30 + delay
                text = _reply(rng, kind, depth, parent_text)
                author = f"synth_{rng.randrange(400)}"
                roll = rng.random()
                if roll < 0.05:  # deleted and removed comments stay in the tree, as on Reddit
                    text, author = ("[deleted]", "[deleted]") if roll < 0.04 else ("[removed]", "[deleted]")
                quality = rng.lognormvariate(0, 1.0)
                # early replies collect more votes whatever their quality: the timing confound
                score = int(appeal * quality * 40 * math.exp(-delay / 7_200)) + rng.randint(-2, 3)
                thread.append({"id": cid, "link_id": f"t3_{post_id}", "parent_id": parent,
                               "author": author, "body": text, "score": score,
                               "created_utc": when, "subreddit": subreddit, "retrieved_on": when + 86_400 * 30,
                               "_synthetic": True})
                if depth < 8:
                    frontier.append((f"t1_{cid}", text, when, depth + 1, appeal * 0.5))
        if kind == "explanation":  # a moderator bot's sticky, which the turn filter drops
            thread.append({"id": base36(next_comment), "link_id": f"t3_{post_id}", "parent_id": f"t3_{post_id}",
                           "author": "AutoModerator", "body": "Please read the rules before replying.",
                           "score": 1, "created_utc": created + 5, "subreddit": subreddit, "stickied": True,
                           "distinguished": "moderator", "retrieved_on": created + 86_400 * 30, "_synthetic": True})
            next_comment += 1
        post_score = sum(max(c["score"], 0) for c in thread) // 3 + rng.randint(0, 20)
        posts.append({"id": post_id, "title": title, "selftext": selftext, "author": f"synth_op_{p % 50}",
                      "score": post_score, "created_utc": created, "subreddit": subreddit, "over_18": False,
                      "num_comments": len(thread), "retrieved_on": created + 86_400 * 30, "_synthetic": True})
        comments.extend(thread)
    paths = {"posts": out / "RS_synthetic.zst", "comments": out / "RC_synthetic.zst"}
    for key, records in (("posts", posts), ("comments", comments)):
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        paths[key].write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return paths
