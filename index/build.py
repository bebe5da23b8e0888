"""`ahf index`: build (or refresh) the BM25 and dense indexes of a store's turns.

Both live under `STORE/index/` (see index.manifest for the layout and the atomic switch). The
store is opened read-only, so other readers keep working while it runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from ahf.config import load_config
from index.bm25 import build_bm25
from index.corpus import require_turns
from index.dense import DenseConfig, build_dense
from index.manifest import default_root
from mining.store import Store


def build_index(store_dir: str | Path, config: DenseConfig | None = None, index_root: str | Path | None = None,
                bm25: bool = True, dense: bool = True, threads: int | None = None, progress=None,
                engine=None) -> dict:
    """Index every turn; returns what each side did (docs, seconds, how many texts were encoded).
    `config=None` reads configs/index.yaml. `engine` (ahf.engine, default local) encodes the texts
    the embedding cache lacks and builds the shards of an ivfpq index and of BM25 (`bm25_shards`)."""
    config = config or load_config(DenseConfig, "index")
    root = Path(index_root) if index_root else default_root(store_dir)
    started = time.perf_counter()
    result: dict = {"store": str(store_dir), "index": str(root), "engine": getattr(engine, "name", "local")}
    with Store(store_dir, read_only=True) as store:
        result["turns"] = require_turns(store)
        if bm25:
            result["bm25"] = build_bm25(store, root, threads=threads, progress=progress, shards=config.bm25_shards,
                                        engine=engine).to_dict()
        if dense:
            turns = store.arrow("SELECT comment_id, reply FROM turns ORDER BY comment_id")
    if dense:
        result["dense"] = build_dense(turns["comment_id"].to_pylist(), turns["reply"].to_pylist(), root,
                                      config, progress=progress, engine=engine).to_dict()
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result
