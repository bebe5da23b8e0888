"""Vote-based labels for dialog turns: adjusted ranking -> tiers, preference pairs, reply sentiment.

Input: the `turns` and `comments` tables of a store (docs/turns.md). Output: two tables in the same
DuckDB file, replaced atomically by `label_store` (docs/feedback.md describes every column):

- `labels`: one row per turn. `z_rank`, `z_time`, `adjusted`, `tier` (the seed's confound-adjusted
  ranking), the sentiment of the turn's direct replies, and the combined `reward`.
- `pairs`: preference pairs between sibling turns (same parent, so the same prompt): the SHP rule
  and DialogRPT's time-adjacent rule, each with a `margin` and the `rule` that made it, and (when
  `sentiment_pairs.enabled`) the `sentiment` rule: the sibling whose replies were warmer.

Sentiment pairs and the `sentiment_tier` column use the weighted reply sentiment shrunk toward the
store's mean with a pseudo-count (`sentiment.prior_replies`), so a turn with one reply counts for less
than a turn with ten; both are made after the partitions, since the mean is the whole store's.

Adjusted ranking (signs): within a group (a post, by default), `z_rank` is the z-score of
`sibling_rank` (1 = the highest score among siblings, so a *negative* z_rank means ranked high) and
`z_time` the z-score of the posting delay after the post (log seconds by default; positive means
posted late). `adjusted = w_rank * z_rank + w_time * z_time` with the defaults w_rank = -1 and
w_time = +0.5: ranked high scores up, posted late scores up, so "ranked high although posted late"
scores best, and an early reply that ranks high only because it was early is discounted.

Scale: the vote and pair math is SQL that DuckDB runs out of core; the sentiment is scored in
worker processes on the distinct reply texts of one partition of posts at a time, so memory is
bounded by the partition size (`partition_turns`), not by the store.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from ahf.config import StageConfig, load_config
from feedback.sentiment import POSITIVE_THRESHOLD, Vader
from mining.schema import PAIR_SCHEMA, empty_table
from mining.store import Store
from mining.turns import MiningConfig


def _ordered_quantiles(config):
    lo, hi = config.tier_quantiles
    if not 0 < lo <= hi < 1:
        raise ValueError("tier_quantiles must satisfy 0 < lo <= hi < 1")
    return config


class VoteConfig(StageConfig):
    """The seed's adjusted ranking and its good / ok / bad tiers."""

    group_by: Literal["post", "post_depth", "parent"] = Field(
        "post", description="z-scores within a post, within a post's replies at one depth, or among siblings")
    min_replies: int = Field(5, ge=2, description="groups with fewer turns get no adjusted score and no tier")
    w_rank: float = Field(-1.0, description="weight of z(sibling_rank); negative: a top rank scores up")
    w_time: float = Field(0.5, description="weight of z(delay); positive: a late reply scores up")
    time_transform: Literal["log", "linear"] = Field(
        "log", description="delay in seconds as log1p(delay) (heavy-tailed delays) or as is")
    tier_by: Literal["subreddit", "global"] = Field(
        "subreddit", description="tier quantiles per subreddit, or over the whole store")
    tier_quantiles: tuple[float, float] = Field(
        (1 / 3, 2 / 3), description="adjusted < q_lo -> bad, > q_hi -> good, else ok")

    @model_validator(mode="after")
    def _ordered(self):
        return _ordered_quantiles(self)


class SHPConfig(StageConfig):
    """Stanford Human Preferences rule (Ethayarajh et al. 2022): B was written no later than A and
    still scored lower, so A's higher score is not an effect of having had more time."""

    enabled: bool = Field(True, description="make SHP pairs")
    min_ratio: float = Field(2.0, ge=1.0, description="score(A) >= min_ratio * score(B)")
    max_pairs_per_post: int = Field(5, ge=1, description="largest margins first")
    min_post_score: int = Field(10, description="posts below it give no pairs (too few voters)")
    min_reply_score: int = Field(2, ge=1, description="both replies; >= 1 keeps the score ratio defined")
    top_level_only: bool = Field(True, description="SHP pairs direct replies to the post")
    unknown_post: Literal["skip", "allow"] = Field(
        "skip", description="posts missing from the store (comment-only dumps) have no score to check")
    max_candidates_per_parent: int = Field(
        500, ge=2, description="highest-scored replies considered per parent (bounds the pairwise join)")


class TimeAdjacentConfig(StageConfig):
    """DialogRPT's rule (Gao et al. 2020): siblings posted close together in time had the same
    exposure, so the one with more votes is preferred."""

    enabled: bool = Field(True, description="make time-adjacent pairs")
    max_gap_s: int = Field(3600, ge=0, description="consecutive siblings at most this far apart")
    min_score_diff: int = Field(1, ge=1, description="the winner's score lead, at least")


class SentimentConfig(StageConfig):
    """VADER compound of a turn's direct replies (not the author's own, no deleted bodies, and none by
    the bots the turns were built without: `turns.bot_authors` of the mining config)."""

    positive_threshold: float = Field(POSITIVE_THRESHOLD, description="a reply counts as positive at compound >= this")
    weight_floor: int = Field(1, ge=1, description="a reply weighs max(score, weight_floor)")
    prior_replies: float = Field(
        2.0, ge=0, description="pseudo-count of the shrunk reply sentiment that sentiment pairs and tiers use: "
                               "(n * weighted + prior_replies * store mean) / (n + prior_replies), n scored replies")
    workers: int = Field(0, ge=0, description="scoring processes; 0 = one per CPU")
    pool_min_texts: int = Field(20_000, ge=0, description="fewer distinct texts are scored in-process")


class SentimentPairsConfig(StageConfig):
    """The seed's "reward model from child comment sentiment": sibling turns whose direct replies differ in
    shrunk weighted VADER sentiment (`sentiment.prior_replies`), so that a turn with one warm reply is less
    sure than one with ten; the warmer-received turn is chosen, margin = the sentiment difference."""

    enabled: bool = Field(
        False, description="make `sentiment` pairs (off by default: the vote pairs stay the default data)")
    min_replies: int = Field(2, ge=1, description="scored direct replies each turn of a pair needs, at least")
    min_difference: float = Field(
        0.25, gt=0, description="shrunk sentiment(chosen) - shrunk sentiment(rejected), at least")
    max_candidates_per_parent: int = Field(
        100, ge=2, description="turns with the most scored replies considered per parent (bounds the pairwise join)")


class SentimentTierConfig(StageConfig):
    """The seed's good / ok / bad tiers, on the shrunk reply sentiment instead of the adjusted votes."""

    min_replies: int = Field(2, ge=1, description="turns with fewer scored direct replies get no sentiment tier")
    tier_by: Literal["subreddit", "global"] = Field(
        "subreddit", description="sentiment tier quantiles per subreddit, or over the whole store")
    tier_quantiles: tuple[float, float] = Field(
        (1 / 3, 2 / 3), description="shrunk sentiment < q_lo -> bad, > q_hi -> good, else ok")

    @model_validator(mode="after")
    def _ordered(self):
        return _ordered_quantiles(self)


class RewardConfig(StageConfig):
    """reward = w_vote * adjusted + w_sentiment * (reply sentiment, or `missing_sentiment`)."""

    w_vote: float = Field(1.0, description="weight of the adjusted vote score")
    w_sentiment: float = Field(0.5, description="weight of the reply sentiment")
    sentiment: Literal["weighted_mean", "mean"] = Field(
        "weighted_mean", description="replies' compounds weighted by their score, or plain")
    missing_sentiment: float = Field(0.0, description="used for turns without scored replies")


class ExportConfig(StageConfig):
    """`ahf export`: which labelled rows become datasets, and how they are split."""

    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.9, "validation": 0.05, "test": 0.05},
                                     description="split name -> fraction of posts (no post in two splits)")
    seed: int = Field(0, description="the post -> split assignment is a hash of (seed, post_id)")
    rules: list[Literal["shp", "time_adjacent", "sentiment"]] = Field(
        default_factory=lambda: ["shp", "time_adjacent"], description="pair rules exported by --format pairs")
    tier_source: Literal["votes", "sentiment"] = Field(
        "votes", description="the `tier` of --format pointwise and sft: the vote tier or the sentiment tier")
    tiers: list[Literal["good", "ok", "bad"]] = Field(default_factory=lambda: ["good", "ok", "bad"],
                                                      description="tiers exported by --format pointwise")
    sft_tiers: list[Literal["good", "ok", "bad"]] = Field(default_factory=lambda: ["good"],
                                                          description="tiers exported by --format sft")
    act_min_confidence: float = Field(0.0, description="with --act: minimum confidence in the acts table")
    partition_turns: int = Field(1_000_000, ge=1, description="turns per partition of posts on a parallel engine "
                                                             "(--engine ray); the local engine makes one")

    @model_validator(mode="after")
    def _fractions(self):
        if not self.splits or any(v < 0 for v in self.splits.values()) or abs(sum(self.splits.values()) - 1) > 1e-9:
            raise ValueError(f"splits must be non-negative fractions summing to 1, got {self.splits}")
        return self


class LabelConfig(StageConfig):
    """The feedback stage's config (configs/labels.yaml)."""

    votes: VoteConfig = Field(default_factory=VoteConfig, description="adjusted ranking and tiers")
    shp: SHPConfig = Field(default_factory=SHPConfig, description="the SHP pair rule")
    time_adjacent: TimeAdjacentConfig = Field(default_factory=TimeAdjacentConfig,
                                              description="DialogRPT's time-adjacent pair rule")
    sentiment: SentimentConfig = Field(default_factory=SentimentConfig, description="reply sentiment (VADER)")
    sentiment_pairs: SentimentPairsConfig = Field(default_factory=SentimentPairsConfig,
                                                  description="the `sentiment` pair rule")
    sentiment_tiers: SentimentTierConfig = Field(default_factory=SentimentTierConfig,
                                                 description="good / ok / bad tiers on reply sentiment")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="the combined reward")
    partition_turns: int = Field(500_000, ge=1, description="turns per partition of posts (memory bound)")
    export: ExportConfig = Field(default_factory=ExportConfig, description="`ahf export`")


@dataclass
class LabelReport:
    turns: int = 0
    labelled: int = 0  # turns with an adjusted score (their group had enough replies)
    tiers: dict[str, int] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)
    replies_scored: int = 0  # reply comments whose sentiment counts
    distinct_texts: int = 0  # texts actually run through VADER
    turns_with_replies: int = 0
    rank_time_correlation: float | None = None  # within-group corr(z_rank, z_time): the confound
    sentiment_tiers: dict[str, int] = field(default_factory=dict)
    sentiment_prior: float | None = None  # mean weighted reply sentiment of turns with replies (the shrinkage target)
    # per vote rule ("votes": either), sibling pairs that rule and the sentiment rule both made
    # (`shared`) and how many of them choose the same reply (`agree`)
    sentiment_vote_agreement: dict[str, dict[str, int]] = field(default_factory=dict)
    partitions: int = 0
    workers: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # where the time went

    def timed(self, phase: str, started: float) -> float:
        now = time.perf_counter()
        self.phase_seconds[phase] = round(self.phase_seconds.get(phase, 0.0) + now - started, 3)
        return now

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        out["turns_per_s"] = round(self.turns_per_s, 1)
        return out


# -- SQL, one partition of posts at a time (Store.partitioned shows it as `turns`) -------------

# Group statistics by GROUP BY + join rather than window functions: hash aggregation is several
# times faster than the sorts that windows need on large partitions.
_VOTES_SQL = """
WITH base AS (
  SELECT comment_id, post_id, subreddit, sibling_rank, {group} AS grp, delay_post_s, created_utc
  FROM turns
), firsts AS (
  SELECT post_id, min(created_utc) AS first_created FROM base GROUP BY post_id
), feats AS (
  SELECT b.*, {time_feature} AS t
  FROM (SELECT b.*, greatest(coalesce(b.delay_post_s, b.created_utc::DOUBLE - f.first_created), 0) AS delay
        FROM base b JOIN firsts f USING (post_id)) b
), stats AS (
  SELECT grp, count(*) AS group_size, avg(sibling_rank) AS mean_rank, stddev_pop(sibling_rank) AS sd_rank,
         avg(t) AS mean_t, stddev_pop(t) AS sd_t
  FROM feats GROUP BY grp
), z AS (
  SELECT f.comment_id, f.post_id, f.subreddit, s.group_size,
         coalesce((f.sibling_rank - s.mean_rank) / nullif(s.sd_rank, 0), 0) AS z_rank,
         coalesce((f.t - s.mean_t) / nullif(s.sd_t, 0), 0) AS z_time
  FROM feats f JOIN stats s USING (grp)
)
SELECT comment_id, post_id, subreddit, group_size::INTEGER AS group_size,
       CASE WHEN group_size >= $min_replies THEN z_rank END AS z_rank,
       CASE WHEN group_size >= $min_replies THEN z_time END AS z_time,
       CASE WHEN group_size >= $min_replies THEN $w_rank * z_rank + $w_time * z_time END AS adjusted
FROM z
"""

_SHP_SQL = """
WITH cand AS (
  SELECT comment_id, post_id, parent_id, score, created_utc
  FROM turns
  WHERE score >= $min_reply_score
    AND ($top_level_only = false OR starts_with(parent_id, 't3_'))
    AND (post_score >= $min_post_score OR (post_score IS NULL AND $allow_unknown_post))
  QUALIFY row_number() OVER (PARTITION BY parent_id ORDER BY score DESC, created_utc, comment_id)
          <= $max_candidates
), paired AS (
  SELECT a.post_id, a.parent_id, a.comment_id AS chosen_id, b.comment_id AS rejected_id,
         'shp' AS rule, ln(a.score / b.score) AS margin,
         a.score AS chosen_score, b.score AS rejected_score,
         a.created_utc AS chosen_created_utc, b.created_utc AS rejected_created_utc
  FROM cand a JOIN cand b ON a.parent_id = b.parent_id AND a.comment_id <> b.comment_id
  WHERE a.created_utc >= b.created_utc AND a.score > b.score AND a.score >= $min_ratio * b.score
)
SELECT * FROM paired
QUALIFY row_number() OVER (PARTITION BY post_id ORDER BY margin DESC, chosen_id, rejected_id)
        <= $max_pairs_per_post
"""

_TIME_ADJACENT_SQL = """
WITH ordered AS (
  SELECT comment_id, post_id, parent_id, score, created_utc,
         lead(comment_id) OVER w AS next_id, lead(score) OVER w AS next_score,
         lead(created_utc) OVER w AS next_created
  FROM turns
  WINDOW w AS (PARTITION BY parent_id ORDER BY created_utc, comment_id)
)
SELECT post_id, parent_id,
       CASE WHEN score > next_score THEN comment_id ELSE next_id END AS chosen_id,
       CASE WHEN score > next_score THEN next_id ELSE comment_id END AS rejected_id,
       'time_adjacent' AS rule, ln(1 + abs(score::DOUBLE - next_score)) AS margin,
       greatest(score, next_score) AS chosen_score, least(score, next_score) AS rejected_score,
       CASE WHEN score > next_score THEN created_utc ELSE next_created END AS chosen_created_utc,
       CASE WHEN score > next_score THEN next_created ELSE created_utc END AS rejected_created_utc
FROM ordered
WHERE next_id IS NOT NULL AND next_created::HUGEINT - created_utc <= $max_gap_s
  AND abs(score::HUGEINT - next_score) >= $min_score_diff
"""

# Direct replies of the partition's turns whose sentiment counts. (regexp '\S' rather than
# trim(body) <> '': the same test for "has visible text", ten times faster in DuckDB 2.0.)
_REPLIES_SQL = """
CREATE OR REPLACE TEMP TABLE replies AS
SELECT t.comment_id AS turn_id, c.body, c.score
FROM (SELECT comment_id, author, unnest(child_ids) AS child_id FROM turns) t
JOIN comments c ON c.id = t.child_id
WHERE c.body NOT IN ('[deleted]', '[removed]') AND regexp_matches(c.body, '\\S')
  AND NOT list_contains($bots, coalesce(c.author, ''))
  AND NOT (c.author = t.author AND t.author NOT IN ('[deleted]', '[removed]'))
"""

_SENTIMENT_SQL = """
SELECT r.turn_id, count(*) AS n, avg(s.compound) AS mean,
       sum(s.compound * greatest(r.score, $floor)) / sum(greatest(r.score, $floor)) AS weighted_mean,
       avg(CASE WHEN s.compound >= $pos THEN 1.0 ELSE 0.0 END) AS positive_share
FROM replies r JOIN scored s USING (body)
GROUP BY r.turn_id
"""

# A turn's reply sentiment shrunk toward the store's mean: with n scored replies,
# (n * weighted + k * prior) / (n + k), so one warm reply moves a turn less than ten do.
_SHRUNK_SENTIMENT = "(s.n * s.weighted_mean + $prior_replies * $prior) / (s.n + $prior_replies)"

# The labels (LABEL_SCHEMA): tiers from quantiles of `adjusted` per subreddit (or overall), reply
# sentiment and the combined reward; sentiment tiers from quantiles of the shrunk reply sentiment.
_FINAL_SQL = """
WITH q AS (
  SELECT {tier_key} AS tier_key,
         quantile_cont(adjusted, $q_lo) AS q_lo, quantile_cont(adjusted, $q_hi) AS q_hi
  FROM labels_new WHERE adjusted IS NOT NULL GROUP BY ALL
), shrunk AS (
  SELECT l.comment_id, {sentiment_tier_key_l} AS tier_key, {shrunk} AS sentiment
  FROM labels_new l JOIN sentiment_new s ON s.turn_id = l.comment_id
  WHERE s.n >= $tier_min_replies
), sq AS (
  SELECT tier_key, quantile_cont(sentiment, $sq_lo) AS q_lo, quantile_cont(sentiment, $sq_hi) AS q_hi
  FROM shrunk GROUP BY ALL
)
SELECT l.comment_id, l.post_id, l.subreddit, l.group_size, l.z_rank, l.z_time, l.adjusted,
       CASE WHEN l.adjusted IS NULL THEN NULL
            WHEN l.adjusted < q.q_lo THEN 'bad'
            WHEN l.adjusted > q.q_hi THEN 'good'
            ELSE 'ok' END AS tier,
       coalesce(s.n, 0) AS reply_count,
       s.mean AS reply_sentiment_mean,
       s.weighted_mean AS reply_sentiment_weighted,
       s.positive_share AS reply_positive_share,
       CASE WHEN l.adjusted IS NULL THEN NULL
            ELSE $w_vote * l.adjusted + $w_sentiment * coalesce({sentiment_col}, $missing) END AS reward,
       CASE WHEN sh.sentiment IS NULL THEN NULL
            WHEN sh.sentiment < sq.q_lo THEN 'bad'
            WHEN sh.sentiment > sq.q_hi THEN 'good'
            ELSE 'ok' END AS sentiment_tier
FROM labels_new l
LEFT JOIN q ON q.tier_key = {tier_key_l}
LEFT JOIN sentiment_new s ON s.turn_id = l.comment_id
LEFT JOIN shrunk sh ON sh.comment_id = l.comment_id
LEFT JOIN sq ON sq.tier_key = sh.tier_key
ORDER BY l.post_id, l.comment_id
"""

# Sentiment pairs: siblings (same parent) with enough scored replies each, the one whose replies were
# warmer (shrunk sentiment) chosen when the difference reaches the margin. Runs once over the store
# (the per-turn sentiment is small; the prior is the whole store's), not per partition.
_SENTIMENT_PAIRS_SQL = f"""
WITH cand AS (
  SELECT t.comment_id, t.post_id, t.parent_id, t.score, t.created_utc, {_SHRUNK_SENTIMENT} AS sentiment
  FROM sentiment_new s JOIN turns t ON t.comment_id = s.turn_id
  WHERE s.n >= $min_replies
  QUALIFY row_number() OVER (PARTITION BY t.parent_id ORDER BY s.n DESC, t.comment_id) <= $max_candidates
)
SELECT a.post_id, a.parent_id, a.comment_id AS chosen_id, b.comment_id AS rejected_id,
       'sentiment' AS rule, a.sentiment - b.sentiment AS margin,
       a.score AS chosen_score, b.score AS rejected_score,
       a.created_utc AS chosen_created_utc, b.created_utc AS rejected_created_utc
FROM cand a JOIN cand b ON a.parent_id = b.parent_id AND a.comment_id <> b.comment_id
WHERE a.sentiment - b.sentiment >= $min_difference
"""

# Sibling pairs that a vote rule and the sentiment rule both made, whatever their direction, and how
# many of those choose the same reply. "votes": made by either vote rule (both choose the higher score).
_AGREEMENT_SQL = """
WITH s AS (SELECT chosen_id, rejected_id FROM pairs WHERE rule = 'sentiment'),
v AS (SELECT rule, chosen_id, rejected_id FROM pairs WHERE rule IN ('shp', 'time_adjacent')
      UNION ALL
      SELECT DISTINCT 'votes', chosen_id, rejected_id FROM pairs WHERE rule IN ('shp', 'time_adjacent'))
SELECT v.rule, count(*) AS shared, count(*) FILTER (WHERE s.chosen_id = v.chosen_id) AS agree
FROM v JOIN s ON least(s.chosen_id, s.rejected_id) = least(v.chosen_id, v.rejected_id)
      AND greatest(s.chosen_id, s.rejected_id) = greatest(v.chosen_id, v.rejected_id)
GROUP BY v.rule
"""


# -- sentiment workers -----------------------------------------------------------------------

_worker_vader: Vader | None = None


def _init_worker() -> None:
    global _worker_vader
    _worker_vader = Vader()


def _score_chunk(texts: list[str]) -> list[float]:
    return _worker_vader.compounds(texts)


class _Scorer:
    """Scores a list of texts in-process or across a process pool (started once, on first need)."""

    def __init__(self, config: SentimentConfig, workers: int | None = None):
        self.config = config
        self.workers = workers or config.workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None
        self._local = Vader()

    def __call__(self, texts: list[str]) -> list[float]:
        if self.workers <= 1 or len(texts) < self.config.pool_min_texts:
            return self._local.compounds(texts)
        if self._pool is None:
            # spawn, not fork: the parent holds a multi-threaded DuckDB connection.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                             initializer=_init_worker)
        size = max(1000, math.ceil(len(texts) / (self.workers * 8)))
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        return [score for part in self._pool.map(_score_chunk, chunks) for score in part]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


_SCORERS: dict[str, _Scorer] = {}  # this process's scorer per sentiment config, its pool started once


def _scorer(config: SentimentConfig, in_process: bool) -> _Scorer:
    """The local engine shares one scorer (and its process pool) across partitions; an engine that
    already runs partitions in parallel (Ray) scores each in the task's own process."""
    if in_process:
        return _Scorer(config, workers=1)
    key = config.model_dump_json()
    if key not in _SCORERS:
        _SCORERS[key] = _Scorer(config)
    return _SCORERS[key]


def _close_scorers() -> None:
    while _SCORERS:
        _SCORERS.popitem()[1].close()


# -- one partition of posts: the same function for every engine --------------------------------

@dataclass
class LabelTask:
    """What a partition needs: plain values, so that a Ray task can receive it."""

    store_dir: str
    config: LabelConfig
    part: int
    parts: int
    bots: list[str]
    score_in_process: bool = False


@dataclass
class PartitionLabels:
    """A partition's votes, pairs and reply sentiment (Arrow), and what it counted."""

    votes: pa.Table
    pairs: pa.Table
    sentiment: pa.Table
    replies_scored: int = 0
    distinct_texts: int = 0
    pool_workers: int = 1
    phase_seconds: dict[str, float] = field(default_factory=dict)


def label_partition(task: LabelTask) -> PartitionLabels:
    """Votes, pairs and reply sentiment of the turns whose post falls in partition `task.part`
    (mining.schema.THREAD_KEYS): every group, sibling and reply of a post is in the same partition."""
    config = task.config
    clock = _Clock()
    # the replies join reads `comments`; a reply is in its parent's thread (mining.turns), so it narrows too
    with Store.reading(task.store_dir) as store, \
            store.partitioned(("turns",), task.part, task.parts, joined=("comments",)):
        votes = config.votes
        group = {"post": "post_id", "post_depth": "post_id || ':' || depth", "parent": "parent_id"}[votes.group_by]
        time_feature = "ln(1 + delay)" if votes.time_transform == "log" else "delay"
        vote_rows = store.arrow(_VOTES_SQL.format(group=group, time_feature=time_feature),
                                {"min_replies": votes.min_replies, "w_rank": votes.w_rank,
                                 "w_time": votes.w_time})
        clock.lap("votes")
        pair_rows = _pairs(store, config)
        clock.lap("pairs")
        store.execute(_REPLIES_SQL, {"bots": task.bots})
        replies = store.value("SELECT count(*) FROM replies")
        # Score each distinct text once: repeated replies ("lol", "this") are common on Reddit.
        texts = [row[0] for row in store.rows("SELECT DISTINCT body FROM replies")]
        clock.lap("replies_fetch")
        scorer = _scorer(config.sentiment, task.score_in_process)
        compounds = scorer(texts)
        clock.lap("vader")
        scored = pa.table({"body": pa.array(texts, pa.string()), "compound": pa.array(compounds, pa.float64())})
        with store.registered("scored", scored):
            sentiment = store.arrow(_SENTIMENT_SQL, {"floor": config.sentiment.weight_floor,
                                                     "pos": config.sentiment.positive_threshold})
        clock.lap("sentiment_aggregate")
    return PartitionLabels(vote_rows, pair_rows, sentiment, replies, len(texts),
                           scorer.workers if scorer._pool is not None else 1, clock.seconds)


def _pairs(store: Store, config: LabelConfig) -> pa.Table:
    parts = []
    shp, adjacent = config.shp, config.time_adjacent
    if shp.enabled:
        parts.append(store.arrow(_SHP_SQL, {
            "min_reply_score": shp.min_reply_score, "top_level_only": shp.top_level_only,
            "min_post_score": shp.min_post_score, "allow_unknown_post": shp.unknown_post == "allow",
            "max_candidates": shp.max_candidates_per_parent, "min_ratio": shp.min_ratio,
            "max_pairs_per_post": shp.max_pairs_per_post}))
    if adjacent.enabled:
        parts.append(store.arrow(_TIME_ADJACENT_SQL, {"max_gap_s": adjacent.max_gap_s,
                                                      "min_score_diff": adjacent.min_score_diff}))
    return pa.concat_tables([t.cast(PAIR_SCHEMA) for t in parts]) if parts else empty_table(PAIR_SCHEMA)


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


# -- the pipeline ------------------------------------------------------------------------------

def label_store(store_dir: str | Path, config: LabelConfig | None = None, progress=None,
                engine=None) -> LabelReport:
    """Compute `labels` and `pairs` for every turn of the store, replacing earlier results atomically.

    `config=None` reads configs/labels.yaml. The partitions of posts run on `engine` (ahf.engine;
    default: this process); the tiers (quantiles over all partitions) and the swap run here.
    `progress(n)` is called with the number of turns done after each partition.
    """
    from ahf.engine import LocalEngine

    config = config or load_config(LabelConfig, "labels")
    engine = engine or LocalEngine()
    started = time.perf_counter()
    report = LabelReport()
    with Store(store_dir, read_only=True) as store:
        report.turns = store.require("turns", f"run `ahf turns --store {store_dir}` first")
        bots = _bot_authors(store)
    report.partitions = parts = max(1, math.ceil(report.turns / config.partition_turns))
    tasks = [LabelTask(str(store_dir), config, part, parts, bots, score_in_process=engine.name != "local")
             for part in range(parts)]
    results = []
    try:
        for result in engine.map(label_partition, tasks):
            results.append(result)
            report.replies_scored += result.replies_scored
            report.distinct_texts += result.distinct_texts
            for phase, seconds in result.phase_seconds.items():
                report.phase_seconds[phase] = round(report.phase_seconds.get(phase, 0.0) + seconds, 3)
            if progress:
                progress(report.turns // parts)
    finally:
        _close_scorers()
    report.workers = engine.workers if engine.name != "local" else max(r.pool_workers for r in results)
    t = time.perf_counter()
    with Store(store_dir, create=False) as store:
        _finish(store, config, report, results)
    report.timed("tiers_and_swap", t)
    report.seconds = time.perf_counter() - started
    return report


def _bot_authors(store: Store) -> list[str]:
    """The bots the turns were built without (a store from before that was recorded: mining.yaml's)."""
    built_with = store.meta("turns_config")
    return built_with["bot_authors"] if built_with else load_config(MiningConfig, "mining").turns.bot_authors


def _finish(store: Store, config: LabelConfig, report: LabelReport, results: list[PartitionLabels]) -> None:
    """Tiers over every partition's votes, rewards, sentiment tiers and pairs, and the swap of `labels`
    and `pairs`."""
    votes, reward = config.votes, config.reward
    tier_key = {True: ("coalesce(subreddit, '')", "coalesce(l.subreddit, '')"), False: ("''", "''")}
    sql = _FINAL_SQL.format(
        tier_key=tier_key[votes.tier_by == "subreddit"][0],
        tier_key_l=tier_key[votes.tier_by == "subreddit"][1],
        sentiment_tier_key_l=tier_key[config.sentiment_tiers.tier_by == "subreddit"][1],
        shrunk=_SHRUNK_SENTIMENT,
        sentiment_col="s.weighted_mean" if reward.sentiment == "weighted_mean" else "s.mean",
    )
    gathered = {name: pa.concat_tables([getattr(r, attr) for r in results])
                for name, attr in (("labels_new", "votes"), ("pairs_new", "pairs"), ("sentiment_new", "sentiment"))}
    report.sentiment_prior = _sentiment_prior(gathered["sentiment_new"])
    shrink = {"prior": report.sentiment_prior, "prior_replies": config.sentiment.prior_replies}
    params = {"q_lo": votes.tier_quantiles[0], "q_hi": votes.tier_quantiles[1], "w_vote": reward.w_vote,
              "w_sentiment": reward.w_sentiment, "missing": reward.missing_sentiment,
              "sq_lo": config.sentiment_tiers.tier_quantiles[0], "sq_hi": config.sentiment_tiers.tier_quantiles[1],
              "tier_min_replies": config.sentiment_tiers.min_replies} | shrink
    with store.registered("sentiment_new", gathered["sentiment_new"]):
        if config.sentiment_pairs.enabled:
            gathered["pairs_new"] = pa.concat_tables(
                [gathered["pairs_new"], _sentiment_pairs(store, config.sentiment_pairs, shrink)])
        with store.registered("labels_new", gathered["labels_new"]), \
                store.registered("pairs_new", gathered["pairs_new"]):
            store.replace_tables({"labels": (sql, params),
                                  "pairs": "SELECT * FROM pairs_new ORDER BY post_id, rule, chosen_id, rejected_id"},
                                 meta={"labels_config": config.model_dump(mode="json")})
    report.labelled = store.value("SELECT count(*) FROM labels WHERE adjusted IS NOT NULL")
    report.tiers = dict(store.rows("SELECT tier, count(*) FROM labels WHERE tier IS NOT NULL GROUP BY tier ORDER BY tier"))
    report.sentiment_tiers = dict(store.rows("SELECT sentiment_tier, count(*) FROM labels "
                                             "WHERE sentiment_tier IS NOT NULL GROUP BY 1 ORDER BY 1"))
    report.pairs = dict(store.rows("SELECT rule, count(*) FROM pairs GROUP BY rule ORDER BY rule"))
    report.sentiment_vote_agreement = sentiment_vote_agreement(store)
    report.turns_with_replies = store.value("SELECT count(*) FROM labels WHERE reply_count > 0")
    corr = store.value("SELECT corr(z_rank, z_time) FROM labels WHERE adjusted IS NOT NULL")
    report.rank_time_correlation = None if corr is None or math.isnan(corr) else round(corr, 4)


def _sentiment_prior(sentiment: pa.Table) -> float:
    """The shrinkage target: the mean weighted reply sentiment over the turns that have scored replies
    (0, neutral, in a store without any)."""
    values = [v for v in sentiment["weighted_mean"].to_pylist() if v is not None]
    # fsum: exactly rounded whatever the order, so any partitioning gives the same prior to the last bit
    return math.fsum(values) / len(values) if values else 0.0


def _sentiment_pairs(store: Store, rule: SentimentPairsConfig, shrink: dict) -> pa.Table:
    return store.arrow(_SENTIMENT_PAIRS_SQL, {
        "min_replies": rule.min_replies, "min_difference": rule.min_difference,
        "max_candidates": rule.max_candidates_per_parent} | shrink).cast(PAIR_SCHEMA)


def sentiment_vote_agreement(store: Store) -> dict[str, dict[str, int]]:
    """For each vote rule (and "votes", either of them): the sibling pairs it and the sentiment rule
    both made (`shared`) and how many of those choose the same reply (`agree`). Zeros without
    sentiment pairs."""
    found = {rule: {"shared": shared, "agree": agree} for rule, shared, agree in store.rows(_AGREEMENT_SQL)}
    return {rule: found.get(rule, {"shared": 0, "agree": 0}) for rule in ("shp", "time_adjacent", "votes")}
