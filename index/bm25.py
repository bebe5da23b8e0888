"""BM25 over turns with Lucene (Anserini, through pyserini), built in-process.

Each turn is one Lucene document: `id` = comment_id, `contents` = the reply (what BM25 ranks), and
`context` (post title, selftext, ancestor bodies) as a separate indexed field, so a query can
weight it: `search(q, fields={"contents": 1.0, "context": 0.3})`. Positions (phrase queries) and
the raw JSON are stored, so a hit gives back its reply and context without a store lookup; term
vectors are not (nothing reads them, and they slow the build down).

Anserini indexes one input file per thread, so the turns are written as `threads` JSONL files.
The build goes into a fresh directory and is switched in by `index.manifest.commit`: a failed
build leaves the previous index usable. Additions rebuild the Lucene index from the store (about
5k turns/s on 2 cores); BM25's corpus statistics (idf, average length) change with every addition
anyway, and the rebuild never touches the dense side.

With `bm25_shards` > 1 (configs/index.yaml) the turns are split by thread (the engines' partitions)
into that many Lucene indexes, `shard-NNN/` in the build directory, each built by one engine task (in
parallel on Ray). The searcher opens them as one Lucene `MultiReader`: a query fans out to every
shard and the hits merge into one top k, and the corpus statistics are summed over the shards, so the
scores equal one index's (tested). One searcher holds at most `IndexWriter.MAX_DOCS` (2^31 - 129)
documents in all; docs/index.md sizes that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from ahf.console import UserError
from index import manifest
from index.corpus import iter_turn_batches
from index.jvm import ensure_jvm
from mining.store import Store, task_threads

SHARD_PREFIX = "shard-"


@dataclass
class BM25Report:
    docs: int
    seconds: float
    dir: str
    shards: int = 1

    def to_dict(self) -> dict:
        return {"docs": self.docs, "seconds": round(self.seconds, 3), "dir": self.dir, "shards": self.shards,
                "docs_per_s": round(self.docs / self.seconds, 1) if self.seconds else None}


def write_input_files(batches, out_dir: Path, files: int, progress=None) -> int:
    """Write turns as Anserini JsonCollection files (`{"id", "contents", "context"}` per line)."""
    outs = [open(out_dir / f"part-{i:03d}.jsonl", "wb") for i in range(files)]
    n = 0
    try:
        for batch in batches:
            cols = batch.to_pydict()
            for cid, reply, context in zip(cols["comment_id"], cols["reply"], cols["context"]):
                outs[n % files].write(orjson.dumps({"id": cid, "contents": reply, "context": context}))
                outs[n % files].write(b"\n")
                n += 1
            if progress:
                progress(batch.num_rows)
    finally:
        for f in outs:
            f.close()
    return n


def run_indexer(input_dir: Path, index_dir: Path, threads: int) -> None:
    """Anserini's IndexCollection in this process (the JVM is ours, see index.jvm)."""
    ensure_jvm()
    from jnius import autoclass

    args = ["-collection", "JsonCollection", "-generator", "DefaultLuceneDocumentGenerator",
            "-input", str(input_dir), "-index", str(index_dir), "-threads", str(threads),
            "-fields", "context", "-storePositions", "-storeRaw", "-quiet"]
    autoclass("io.anserini.index.IndexCollection").main(args)


def index_turns(batches, index_dir: Path, threads: int, progress=None) -> int:
    """Index the turns of `batches` into a new Lucene index at `index_dir`; the number indexed (0: no
    index written). Never drops a document silently."""
    with tempfile.TemporaryDirectory(prefix="ahf-bm25-input-", dir=index_dir.parent) as tmp:
        # 2 files per thread keeps both threads busy when file sizes differ a little.
        n = write_input_files(batches, Path(tmp), files=max(1, 2 * threads), progress=progress)
        if n:
            run_indexer(Path(tmp), index_dir, threads)
    if n and count_docs(index_dir) != n:  # Anserini logs and skips bad documents; we never drop silently
        raise UserError(f"Lucene indexed {count_docs(index_dir)} of {n} turns in {index_dir}; see the Anserini log above")
    return n


@dataclass
class ShardTask:
    """One BM25 shard: the turns of the threads in partition `part` of `parts`, from this process's open
    store (local engine) or the store's path (a Ray task), indexed into `out`."""

    store: object
    out: str
    part: int
    parts: int
    threads: int


def bm25_shard(task: ShardTask) -> int:
    """Build one shard; the same function for every engine. Returns its documents (0: no shard written)."""
    with Store.reading(task.store) as store, store.partitioned(("turns", "comments"), task.part, task.parts):
        return index_turns(iter_turn_batches(store), Path(task.out), task_threads() or task.threads)


def build_bm25(store, root: str | Path, threads: int | None = None, progress=None, shards: int = 1,
               engine=None) -> BM25Report:
    """Index every turn of the open `store` into a new Lucene index under `root`: one index, or
    `shards` indexes of partitions of threads, built as tasks on `engine` (default: this process)."""
    from ahf.engine import LocalEngine

    threads = threads or max(1, min(8, os.cpu_count() or 1))
    engine = engine or LocalEngine()
    started = time.perf_counter()
    build_dir = manifest.new_build_dir(root, "bm25")
    info: dict = {}
    try:
        if shards <= 1:
            n = index_turns(iter_turn_batches(store), build_dir, threads, progress)
        else:
            ref = store if engine.name == "local" else str(store.path)
            tasks = [ShardTask(ref, str(build_dir / f"{SHARD_PREFIX}{part:03d}"), part, shards, threads)
                     for part in range(shards)]
            counts = []
            for docs in engine.map(bm25_shard, tasks):
                counts.append(docs)
                if progress:
                    progress(docs)
            n = sum(counts)
            # a partition without turns (a tiny store) writes no shard; the searcher opens those listed
            info["shards"] = [{"dir": Path(t.out).name, "docs": d} for t, d in zip(tasks, counts) if d]
        if n == 0:
            raise UserError("the store has no turns to index")
        seconds = time.perf_counter() - started
        manifest.commit(root, "bm25", build_dir, {"docs": n, "built_s": round(seconds, 3),
                                                   "built_at": int(time.time()), **info})
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return BM25Report(docs=n, seconds=seconds, dir=str(build_dir), shards=len(info.get("shards", [])) or 1)


def count_docs(index_dir: Path) -> int:
    ensure_jvm()
    from jnius import autoclass

    reader = autoclass("io.anserini.index.IndexReaderUtils").getReader(str(index_dir))
    try:
        return reader.numDocs()
    finally:
        reader.close()


class BM25Searcher:
    """BM25 over the live Lucene index of an index root (one index, or its shards as one).

    `search` on the reply field goes to Lucene's own `IndexSearcher` with the query pyserini would
    build (Anserini's analyzer and bag-of-words generator, BM25 k1=0.9 b=0.4). pyserini's
    `LuceneSearcher` sorts hits by (score, id string), which turns off Lucene's dynamic pruning
    (block-max WAND skips documents that cannot enter the top k) and loads every hit's whole
    stored document; ours reads each hit's `id` from its doc values. Same documents and scores as
    pyserini's (tested); two differences, both about ties: equal scores come in index order, not
    id order, and scores are Lucene's float32 as they are (Anserini rounds to 4 decimals and
    spaces ties 1e-6 apart). On one index, multi-field queries (`fields=`) and `batch_search` use
    pyserini; on shards (a `MultiReader`, which pyserini cannot open) they use the same query
    generator on our searcher.
    """

    def __init__(self, root: str | Path, threads: int = 1):
        ensure_jvm()
        from jnius import autoclass

        self.dir = manifest.live_dir(root, "bm25")
        shards = manifest.read_manifest(root)["bm25"].get("shards")
        utils = autoclass("io.anserini.index.IndexReaderUtils")
        if shards:
            self.searcher = None
            readers = [utils.getReader(str(self.dir / shard["dir"])) for shard in shards]
            self._reader = autoclass("org.apache.lucene.index.MultiReader")(readers, True)  # closes them
        else:
            from pyserini.search.lucene import LuceneSearcher

            self.searcher = LuceneSearcher(str(self.dir))
            self._reader = utils.getReader(str(self.dir))
        self.shards = len(shards or [None])
        # With `threads` > 1 a query searches its index segments (Lucene's slices) in parallel: same
        # hits, but at 1M turns on 2 vCPUs the median query got slower (6.7 -> 8.3 ms), so one by default.
        self._pool = autoclass("java.util.concurrent.Executors").newFixedThreadPool(threads) if threads > 1 else None
        from jnius import cast  # pyjnius would match a MultiReader to the IndexReaderContext overload

        self._lucene = autoclass("org.apache.lucene.search.IndexSearcher")(
            cast("org.apache.lucene.index.IndexReader", self._reader), self._pool)
        self._lucene.setSimilarity(autoclass("org.apache.lucene.search.similarities.BM25Similarity")(0.9, 0.4))
        self._analyzer = autoclass("io.anserini.analysis.DefaultEnglishAnalyzer").newDefaultInstance()
        self._generator = autoclass("io.anserini.search.query.BagOfWordsQueryGenerator")()
        self._stored = self._reader.storedFields()
        self._doc_values = autoclass("org.apache.lucene.index.MultiDocValues")
        # Anserini writes `id` as binary doc values; an index from elsewhere may not have them
        self._has_id_doc_values = self._doc_values.getBinaryValues(self._reader, "id") is not None
        if self.searcher is None and not self._has_id_doc_values:
            raise UserError(f"the BM25 shards under {self.dir} have no `id` doc values: rebuild with `ahf index`")
        self._lucene_doc: dict[str, int] = {}  # comment id -> Lucene docid, for the last search's hits

    @property
    def num_docs(self) -> int:
        return self._reader.numDocs() if self.searcher is None else self.searcher.num_docs

    def search(self, query: str, k: int = 10, fields: dict[str, float] | None = None) -> list[tuple[str, float]]:
        """[(comment_id, bm25 score)] best first; an empty or stop-word-only query gives []."""
        if not query.strip():
            return []
        k = max(1, min(k, self.num_docs))
        if self.searcher is not None and (fields or not self._has_id_doc_values):
            hits = self.searcher.search(query, k=k, fields=fields or {})
            return [(h.docid, float(h.score)) for h in hits]
        if fields:  # what pyserini's searchFields builds: one boosted bag of words per field
            from jnius import autoclass

            boosts = autoclass("java.util.HashMap")()
            for name, boost in fields.items():
                boosts.put(name, autoclass("java.lang.Float")(boost))
            lucene_query = self._generator.buildQuery(boosts, self._analyzer, query)
        else:
            lucene_query = self._generator.buildQuery("contents", self._analyzer, query)
        hits = [(hit.doc, float(hit.score)) for hit in self._lucene.search(lucene_query, k).scoreDocs]
        # ids from the `id` doc values (no stored-block decompression); that iterator only moves forward
        ids = self._doc_values.getBinaryValues(self._reader, "id")
        id_of = {}
        for doc in sorted(doc for doc, _ in hits):
            ids.advanceExact(doc)
            id_of[doc] = ids.binaryValue().utf8ToString()
        self._lucene_doc = {id_of[doc]: doc for doc, _ in hits}
        return [(id_of[doc], score) for doc, score in hits]

    def raw(self, docid: str) -> dict:
        """The stored document: {"id", "contents" (the reply), "context"}."""
        lucene_doc = self._lucene_doc.get(docid)
        if lucene_doc is None and self.searcher is None:  # shards: look the id up
            from jnius import autoclass

            term = autoclass("org.apache.lucene.index.Term")("id", docid)
            found = self._lucene.search(autoclass("org.apache.lucene.search.TermQuery")(term), 1).scoreDocs
            lucene_doc = found[0].doc if len(found) else None
            if lucene_doc is None:
                raise UserError(f"{docid} is not in the BM25 index {self.dir}: rebuild with `ahf index`")
        if lucene_doc is not None:  # a hit of `search`: no id lookup
            return orjson.loads(self._stored.document(lucene_doc).get("raw"))
        doc = self.searcher.doc(docid)
        if doc is None:
            raise UserError(f"{docid} is not in the BM25 index {self.dir}: rebuild with `ahf index`")
        return orjson.loads(doc.raw())

    def batch_search(self, queries: list[str], k: int = 10, threads: int = 2) -> list[list[tuple[str, float]]]:
        if self.searcher is None:
            return [self.search(query, k) for query in queries]
        ids = [str(i) for i in range(len(queries))]
        results = self.searcher.batch_search(queries, ids, k=max(1, min(k, self.num_docs)), threads=threads)
        return [[(h.docid, float(h.score)) for h in results[i]] for i in ids]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        if self.searcher is not None:
            self.searcher.close()
        self._reader.close()
