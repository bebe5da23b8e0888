"""Dialog acts: tag every turn as story / explanation / qa / summary (or `other`).

Definitions live in `configs/acts.yaml` (model: `ActsConfig`); the header of that file explains
the four cues and how they are fused. `tag_acts` reads the turns, the live BM25 and dense
indexes, and writes the `acts` table (comment_id, act, confidence) into the store, replacing the
previous one in one transaction. Subreddit names are never used, so turns keep their act when
they move to a subreddit whose name says nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from ahf.config import StageConfig
from ahf.console import UserError
from index.weak import ClassifierConfig, ClassifierReport, classifier_scores

OTHER = "other"


class Cue(StageConfig):
    """A structural cue: `pattern` (RE2, case-insensitive) searched in `field`."""

    field: Literal["reply", "parent_text", "title", "context"] = Field(
        description="the text searched: the reply, what it answers, the post title, or the whole context")
    pattern: str = Field(description="RE2 regular expression, matched case-insensitively")
    weight: float = Field(1.0, description="added to the structure score on a match (negative: a penalty)")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:  # RE2 via Arrow: the engine that runs it
            pc.match_substring_regex(pa.array(["x"]), pattern, ignore_case=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"not a valid RE2 pattern: {exc}") from exc
        return pattern


class LengthPrior(StageConfig):
    min_words: int = Field(1, ge=0, description="below it the length cue falls off linearly")
    max_words: int = Field(100_000, ge=1, description="above it the length cue falls off as max_words / words")


class ActDef(StageConfig):
    description: str = Field("", description="what the act is, for people")
    bm25_terms: str = Field("", description="the BM25 query whose hits score on the bm25 cue")
    exemplars: list[str] = Field(default_factory=list, description="replies of this act, for the dense cue")
    cues: list[Cue] = Field(default_factory=list, description="the structural (regex) cues")
    length: LengthPrior = Field(default_factory=LengthPrior, description="the reply length typical of the act")


class CueWeights(StageConfig):
    structure: float = Field(0.4, ge=0, description="the regex cues")
    dense: float = Field(0.3, ge=0, description="cosine to the act's exemplars")
    bm25: float = Field(0.1, ge=0, description="BM25 score for the act's terms")
    length: float = Field(0.2, ge=0, description="the length prior")
    classifier: float = Field(0.3, ge=0, description="the weak-label classifier (index.weak); 0 = off")


class ActsConfig(StageConfig):
    """The act definitions and how their cues are fused (see configs/acts.yaml)."""

    min_confidence: float = Field(0.40, ge=0, le=1, description="below it a turn is `other`")
    weights: CueWeights = Field(default_factory=CueWeights, description="each cue's weight in the fused confidence")
    dense_low: float = Field(0.10, description="cosine mapped to a dense cue of 0")
    dense_high: float = Field(0.55, description="cosine mapped to a dense cue of 1")
    bm25_depth: float = Field(0.25, gt=0, description="fraction of turns (< 1) or a number of hits")
    partition_turns: int = Field(1_000_000, ge=1, description="turns per partition of threads whose text cues a "
                                                             "parallel engine computes (--engine ray)")
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig, description="the weak-label classifier")
    acts: dict[str, ActDef] = Field(default_factory=dict, description="the act definitions, by name")

    @field_validator("acts")
    @classmethod
    def _named(cls, acts: dict[str, ActDef]) -> dict[str, ActDef]:
        if not acts:
            raise ValueError("define at least one act")
        if OTHER in acts:
            raise ValueError(f"'{OTHER}' is reserved for turns that match no act")
        return acts


def load_acts_config(path: str | None = None, overrides: list[str] | None = None) -> ActsConfig:
    from ahf.config import load_config

    return load_config(ActsConfig, "acts", path, overrides)


# ---------------------------------------------------------------------------- the cues

def structure_scores(turns: pa.Table, act: ActDef) -> np.ndarray:
    total = np.zeros(turns.num_rows)
    for cue in act.cues:
        column = pc.fill_null(turns[cue.field], "")
        hit = pc.match_substring_regex(column, cue.pattern, ignore_case=True)
        total += cue.weight * hit.to_numpy(zero_copy_only=False).astype(float)
    return np.clip(total, 0.0, 1.0)


def word_counts(texts: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.count_substring_regex(pc.fill_null(texts, ""), r"\S+").to_numpy(zero_copy_only=False)


def length_scores(words: np.ndarray, prior: LengthPrior) -> np.ndarray:
    words = words.astype(float)
    below = np.where(prior.min_words > 0, words / max(prior.min_words, 1), 1.0)
    above = prior.max_words / np.maximum(words, 1.0)
    return np.clip(np.minimum(below, above), 0.0, 1.0)


def dense_scores(turn_vectors: np.ndarray, exemplar_vectors: np.ndarray, low: float, high: float) -> np.ndarray:
    """Best cosine to any exemplar, mapped from [low, high] to [0, 1]."""
    if not len(exemplar_vectors):
        return np.zeros(len(turn_vectors))
    best = (turn_vectors @ exemplar_vectors.T).max(axis=1)
    return np.clip((best - low) / max(high - low, 1e-9), 0.0, 1.0)


def bm25_scores(searcher, terms: str, row_of: dict[str, int], n: int, depth: int) -> np.ndarray:
    """Each turn's BM25 score for `terms` over the best score, for the turns that rank in the top `depth`.

    Lucene returns equal scores in index order, which a parallel index build does not fix; so the cut
    keeps only the hits scoring strictly above the (depth+1)-th score: the same turns whatever the order
    of ties (a group tied at the boundary is left out whole)."""
    scores = np.zeros(n)
    hits = searcher.search(terms, k=depth + 1) if terms.strip() else []
    if len(hits) > depth:
        boundary = hits[depth][1]
        hits = [hit for hit in hits[:depth] if hit[1] > boundary]
    if hits:
        best = hits[0][1] or 1.0
        for docid, score in hits:
            row = row_of.get(docid)
            if row is not None:
                scores[row] = score / best
    return scores


@dataclass
class ActsReport:
    turns: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    classifier: dict | None = None  # weak-label classifier: positives per act, Elkan-Noto c, skips

    def to_dict(self) -> dict:
        out = {"turns": self.turns, "acts": self.counts, "seconds": round(self.seconds, 3)}
        if self.classifier is not None:
            out["classifier"] = self.classifier
        return out


def text_cues(turns: pa.Table, config: ActsConfig) -> pa.Table:
    """What the acts need from each turn's texts: its id, the reply's word count, and each act's
    structure score (`structure:<act>`): the per-turn work, done by partitions (`cue_partition`)."""
    columns = {"comment_id": turns["comment_id"], "words": word_counts(turns["reply"])}
    columns |= {f"structure:{name}": structure_scores(turns, act) for name, act in config.acts.items()}
    return pa.table(columns)


@dataclass
class CueTask:
    """One partition of threads: this process's open store (local) or the store's path (a Ray task)."""

    store: object
    config: ActsConfig
    part: int
    parts: int


def cue_partition(task: CueTask) -> pa.Table:
    """`text_cues` of the turns of the threads in partition `task.part`: the same function for every engine."""
    from index.corpus import read_turns
    from mining.store import Store

    with Store.reading(task.store) as store, store.partitioned(("turns", "comments"), task.part, task.parts):
        return text_cues(read_turns(store), task.config)


def score_acts(cues: pa.Table, vectors: np.ndarray, exemplar_vectors: dict[str, np.ndarray],
               bm25: dict[str, np.ndarray], config: ActsConfig) -> tuple[dict[str, np.ndarray], ClassifierReport | None]:
    """Confidence of every act for every turn (row order of `cues`, see `text_cues`), and the classifier's report."""
    w = config.weights
    total_weight = (w.structure + w.dense + w.bm25 + w.length + w.classifier) or 1.0
    words = cues["words"].to_numpy()
    structure = {name: cues[f"structure:{name}"].to_numpy() for name in config.acts}
    learned, report = ({name: 0.0 for name in config.acts}, None)
    if w.classifier > 0:
        learned, report = classifier_scores(vectors, structure, config.classifier)
    out = {}
    for name, act in config.acts.items():
        fused = (w.structure * structure[name]
                 + w.dense * dense_scores(vectors, exemplar_vectors[name], config.dense_low, config.dense_high)
                 + w.bm25 * bm25[name]
                 + w.length * length_scores(words, act.length)
                 + w.classifier * learned[name])
        out[name] = fused / total_weight
    return out, report


def assign(confidences: dict[str, np.ndarray], min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The best act per turn (`other` below min_confidence) and its confidence."""
    names = list(confidences)
    matrix = np.vstack([confidences[n] for n in names])
    best = matrix.argmax(axis=0)
    conf = matrix[best, np.arange(matrix.shape[1])]
    acts = np.array(names, dtype=object)[best]
    acts[conf < min_confidence] = OTHER
    return acts, conf


def tag_acts(store_dir: str | Path, config: ActsConfig | None = None,
             index_root: str | Path | None = None, engine=None) -> ActsReport:
    """Tag every turn of the store and write the `acts` table (`config=None`: configs/acts.yaml).

    The turns' text cues are computed by partitions of threads on `engine` (ahf.engine; default:
    this process, one partition); the cues that need every turn at once (the classifier trained on
    weak labels, BM25 ranks, the dense index) and the fusion run here."""
    from ahf.engine import LocalEngine
    from index.bm25 import BM25Searcher
    from index.dense import DenseSearcher
    from index.manifest import default_root
    from mining.store import Store

    config = config or load_acts_config()
    engine = engine or LocalEngine()
    root = Path(index_root) if index_root else default_root(store_dir)
    started = time.perf_counter()
    with Store(store_dir, read_only=True) as store:
        parts = engine.partitions(store.require("turns", "run `ahf turns` first"), config.partition_turns)
        ref = store if engine.name == "local" else str(store_dir)
        cues = pa.concat_tables(engine.map(cue_partition, [CueTask(ref, config, part, parts) for part in range(parts)]))
    cues = cues.take(pc.sort_indices(cues, [("comment_id", "ascending")]))  # one order, whatever the partitions
    ids = cues["comment_id"].to_pylist()
    row_of = {cid: i for i, cid in enumerate(ids)}
    n = len(ids)
    if n == 0:
        raise UserError(f"the store {store_dir} has no turns to tag")

    dense = DenseSearcher(root)
    missing = [cid for cid in ids if cid not in dense.row]
    if missing:
        raise UserError(f"{len(missing)} turns are not in the dense index (e.g. {missing[0]}): "
                        "run `ahf index` after `ahf turns`")
    vectors = dense.vectors()[np.array([dense.row[cid] for cid in ids])]
    exemplars = {name: dense.encoder.encode(act.exemplars) for name, act in config.acts.items()}

    bm25 = BM25Searcher(root)
    depth = int(config.bm25_depth * n) if config.bm25_depth < 1 else int(config.bm25_depth)
    lexical = {name: bm25_scores(bm25, act.bm25_terms, row_of, n, max(1, depth))
               for name, act in config.acts.items()}
    bm25.close()

    confidences, classifier = score_acts(cues, vectors, exemplars, lexical, config)
    acts, conf = assign(confidences, config.min_confidence)
    table = pa.table({"comment_id": ids, "act": acts.tolist(),
                      "confidence": pa.array(conf, type=pa.float64())})
    write_acts(store_dir, table, [*config.acts, OTHER], config)
    counts = dict(zip(*np.unique(acts.astype(str), return_counts=True)))
    return ActsReport(turns=n, counts={k: int(v) for k, v in sorted(counts.items())},
                      seconds=time.perf_counter() - started,
                      classifier=classifier.to_dict() if classifier else None)


def write_acts(store_dir: str | Path, table: pa.Table, act_types: list[str], config: ActsConfig) -> None:
    """Replace the `acts` table, and `act_types` (every act the tagger knew, found or not: a query for
    one it found no turns of has no hits, where an act it never knew is an error), with the config
    they came from, in one transaction (a failure keeps the previous ones)."""
    from mining.store import Store

    with Store(store_dir, create=False) as store:
        store.replace_tables({"acts": table, "act_types": pa.table({"act": act_types})},
                             meta={"acts_config": config.model_dump(mode="json")})
