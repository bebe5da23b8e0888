"""Where the indexes of a store live, and how a new build replaces an old one atomically.

Layout of an index root (default `STORE/index/`):

    manifest.json          {"bm25": {"dir": "bm25-…", ...}, "dense": {"dir": "dense-…", ...}}
    bm25-<stamp>/          a Lucene index (Anserini)
    dense-<stamp>/         faiss `index`, `docid` (one comment id per line), `text_key.npy`, `meta.json`;
                           an ivfpq build has `trained.index` and `shard-NNN/` directories instead of
                           `index`, each listed with its docs under "shards" in meta.json and here
    embeddings/<encoder>/  the embedding cache (see index.dense)

A build writes a fresh `<kind>-<stamp>/` directory, then replaces `manifest.json` with
`os.replace` (atomic on POSIX). Readers only follow the manifest, so a build that fails or is
killed midway leaves the previous index in use; its half-written directory is removed by the next
build. Directories the manifest no longer names are deleted after the swap.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from ahf.console import UserError

MANIFEST = "manifest.json"


def default_root(store_dir: str | Path) -> Path:
    return Path(store_dir) / "index"


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); rebuild with `ahf index`") from exc


def live_dir(root: str | Path, kind: str) -> Path:
    """The directory of the current `kind` index; a clear error when there is none."""
    entry = read_manifest(root).get(kind)
    if not entry:
        raise UserError(f"no {kind} index under {root}: run `ahf index --store DIR` first")
    return Path(root) / entry["dir"]


def new_build_dir(root: str | Path, kind: str) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    return path


def commit(root: str | Path, kind: str, build_dir: Path, info: dict) -> None:
    """Point the manifest at `build_dir` (atomically), then delete stale `kind-*` directories."""
    root = Path(root)
    manifest = read_manifest(root)
    manifest[kind] = {"dir": build_dir.name, **info}
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex[:6]}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, root / MANIFEST)
    collect_garbage(root, kind)


def collect_garbage(root: str | Path, kind: str) -> None:
    """Remove `kind-*` directories the manifest does not name (failed or replaced builds)."""
    root = Path(root)
    keep = (read_manifest(root).get(kind) or {}).get("dir")
    for path in root.glob(f"{kind}-*"):
        if path.is_dir() and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
