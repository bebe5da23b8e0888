"""`ahf query --act TYPE [TEXT]`: the top turns of a dialog act, optionally ranked by relevance to TEXT.

Without TEXT the turns tagged TYPE come by act confidence (ties: comment id). With TEXT, BM25
(Lucene) and dense (FAISS) each rank the turns tagged TYPE for TEXT and the two runs are fused
(reciprocal-rank fusion by default, or interpolation of normalised scores). The dense side
searches only inside the act (a FAISS bitmap selector, built once per act; exact for flat
indexes); the BM25 side keeps the act's turns among its top `bm25_depth` (50) hits. The query's
transformer (ONNX Runtime on the CPU, see index.query_encoder) runs in a second thread while Lucene
searches on this one (pruned top-k on one thread, ids from doc values, see index.bm25). At 1M
turns on 2 vCPUs the encoding (≈ 10 ms of one core for a 35-token query, near its fp32 peak) is
the floor; each query also slows the other half down (shared cache and memory bandwidth).

`ActSearcher` loads everything once, so a process answering many queries (the benchmark, a
server) pays the JVM start, the index loads and the encoder load once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ahf.console import UserError
from index.corpus import fetch_turns
from index.fusion import fuse
from index.manifest import default_root
from mining.store import Store


@dataclass
class Hit:
    comment_id: str
    act: str
    score: float
    confidence: float
    subreddit: str
    context: str
    reply: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ActSearcher:
    def __init__(self, store_dir: str | Path, index_root: str | Path | None = None, fusion: str = "rrf",
                 alpha: float = 0.5, bm25_depth: int = 50, dense_depth: int = 50):
        self.store_dir = Path(store_dir)
        self.root = Path(index_root) if index_root else default_root(store_dir)
        self.fusion, self.alpha = fusion, alpha
        self.bm25_depth, self.dense_depth = bm25_depth, dense_depth
        self.store = Store(store_dir, read_only=True)
        self.store.require("acts", "run `ahf acts tag --store DIR` first")
        rows = self.store.arrow("SELECT a.comment_id, a.act, a.confidence, coalesce(t.subreddit, '') AS subreddit "
                                "FROM acts a JOIN turns t USING (comment_id) "
                                "ORDER BY a.act, a.confidence DESC, a.comment_id")
        rows = {name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names}
        self._ids, self._acts = rows["comment_id"].astype(object), rows["act"].astype(object)
        self._conf = rows["confidence"].astype(float)
        self._subs = rows["subreddit"].astype(object)
        self.acts = sorted(set(self._acts.tolist()))
        # every act the tagger knew, found or not (a store tagged before `act_types` existed: those found)
        tagged = self.store.rows("SELECT act FROM act_types") if self.store.has_table("act_types") else []
        self.known_acts = sorted({*self.acts, *(row[0] for row in tagged)})
        self._by_act: dict[str, np.ndarray] = {a: np.flatnonzero(self._acts == a) for a in self.acts}
        self._conf_of = dict(zip(self._ids.tolist(), self._conf.tolist()))
        self._sub_of = dict(zip(self._ids.tolist(), self._subs.tolist()))
        # (act, subreddit) -> (rows, comment ids, FAISS restriction): built on first use, then reused
        self._candidates: dict[tuple[str, str | None], tuple[np.ndarray, set[str], object]] = {}
        self._bm25 = self._dense = None
        self._encoder_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ahf-query-encoder")

    def close(self) -> None:
        self._encoder_thread.shutdown()
        self.store.close()
        if self._bm25 is not None:
            self._bm25.close()

    def __enter__(self) -> ActSearcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ candidates

    def _candidate_rows(self, act: str, subreddit: str | None) -> np.ndarray:
        if act not in self.known_acts:
            raise UserError(f"unknown act {act!r}; the acts of this store: {', '.join(self.known_acts)}")
        rows = self._by_act.get(act, np.empty(0, np.int64))  # a known act may have no turns here
        if subreddit is not None:
            rows = rows[self._subs[rows] == subreddit]
        return rows

    def _candidates_for(self, act: str, subreddit: str | None):
        key = (act, subreddit)
        if key not in self._candidates:
            rows = self._candidate_rows(act, subreddit)
            ids = self._ids[rows]
            restriction = None
            if self._dense is not None:
                lookup = self._dense.row
                dense_rows = np.fromiter((lookup.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
                restriction = self._dense.restriction(dense_rows[dense_rows >= 0])
            self._candidates[key] = (rows, set(ids.tolist()), restriction)
        return self._candidates[key]

    def _load_engines(self) -> None:
        if self._dense is None:
            from index.bm25 import BM25Searcher
            from index.dense import DenseSearcher

            self._dense = DenseSearcher(self.root)
            self._bm25 = BM25Searcher(self.root, threads=1)  # the encoder has the other core
            self._candidates.clear()
            for act in self.acts:  # at load, not in some act's first query (≈0.1 s per 250k turns)
                self._candidates_for(act, None)

    # ------------------------------------------------------------------ search

    def ranked(self, act: str, text: str | None = None, k: int = 10,
               subreddit: str | None = None) -> list[tuple[str, float]]:
        """[(comment_id, score)] best first; score = confidence without TEXT, the fused score with it."""
        if k < 1:
            raise UserError("--k must be at least 1")
        if not text or not text.strip():
            rows = self._candidate_rows(act, subreddit)[:k]  # already sorted by confidence
            return list(zip(self._ids[rows].tolist(), self._conf[rows].tolist()))
        self._load_engines()
        _, allowed, restriction = self._candidates_for(act, subreddit)
        if not allowed:
            return []
        # The query's transformer (ONNX Runtime, no GIL) runs on the second core while Lucene searches.
        query_vector = self._dense.encode_query_in(self._encoder_thread, text)
        lexical = [(d, s) for d, s in self._bm25.search(text, k=self.bm25_depth) if d in allowed]
        semantic = self._dense.search_vector(query_vector.result(), k=max(k, self.dense_depth),
                                             restriction=restriction)
        return fuse([lexical, semantic], method=self.fusion, k=k, alpha=self.alpha)

    def _turns(self, ids: list[str]) -> dict[str, dict]:
        if self._bm25 is None:  # no engine loaded (a query without TEXT): read the store
            return fetch_turns(self.store, ids)
        # The Lucene documents store the reply and context as indexed: no SQL on the query path.
        out = {}
        for cid in ids:
            raw = self._bm25.raw(cid)
            out[cid] = {"subreddit": self._sub_of[cid], "reply": raw["contents"], "context": raw["context"]}
        return out

    def query(self, act: str, text: str | None = None, k: int = 10, subreddit: str | None = None) -> list[Hit]:
        ranked = self.ranked(act, text, k, subreddit)
        turns = self._turns([cid for cid, _ in ranked])
        return [Hit(comment_id=cid, act=act, score=round(score, 6), confidence=round(self._conf_of[cid], 6),
                    subreddit=turns[cid]["subreddit"], context=turns[cid]["context"], reply=turns[cid]["reply"])
                for cid, score in ranked]


def query(store_dir: str | Path, act: str, text: str | None = None, k: int = 10, subreddit: str | None = None,
          fusion: str = "rrf", index_root: str | Path | None = None) -> list[dict]:
    with ActSearcher(store_dir, index_root, fusion=fusion) as searcher:
        return [hit.to_dict() for hit in searcher.query(act, text, k, subreddit)]
