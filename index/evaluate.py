"""`ahf eval acts --labels FILE.json`: precision@k and recall of the act tagger against labels.

FILE maps comment ids to act names (`{"c2x9": "story", ...}`; names outside the config, such as
`other`, mark negatives). For each act:
- precision@k: of the top k turns `ahf query --act ACT` returns, the share labelled ACT. A hit the
  labels do not cover counts as wrong (reported as `unlabelled`), so unlabelled noise cannot help.
- recall: of the labelled ACT turns present in the store, the share the tagger put under ACT.
Both are null for an act the labels never name.
Labelled ids that are not turns of the store (filtered by mining, or from elsewhere) are
counted in `labels_not_in_store`, never dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ahf.console import UserError


def load_labels(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"labels file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object mapping comment ids to act names")
    for key, value in data.items():
        if not isinstance(value, str) or not value:
            raise UserError(f"{path}: field {key!r}: the act must be a non-empty string, got {value!r}")
    return data


def eval_acts(store_dir: str | Path, labels_path: str | Path, k: int = 50, acts: list[str] | None = None,
              index_root: str | Path | None = None) -> dict:
    from index.acts import OTHER
    from index.query import ActSearcher

    labels = load_labels(labels_path)
    with ActSearcher(store_dir, index_root) as searcher:
        tagged = dict(zip(searcher._ids.tolist(), searcher._acts.tolist()))
        present = {cid: act for cid, act in labels.items() if cid in tagged}
        names = acts or sorted({*searcher.acts, *labels.values()} - {OTHER})
        per_act = {}
        for act in names:
            top = searcher.ranked(act, k=k) if act in searcher.acts else []
            correct = sum(labels.get(cid) == act for cid, _ in top)
            unlabelled = sum(cid not in labels for cid, _ in top)
            positives = [cid for cid, a in present.items() if a == act]
            found = sum(tagged[cid] == act for cid in positives)
            # An act nobody labelled has no precision to report (every hit would count as wrong).
            has_labels = any(a == act for a in labels.values())
            per_act[act] = {
                "k": k, "returned": len(top),
                f"precision_at_{k}": round(correct / len(top), 4) if top and has_labels else None,
                "correct": correct, "unlabelled": unlabelled,
                "labelled": len(positives), "recall": round(found / len(positives), 4) if positives else None,
                "tagged": int(sum(a == act for a in tagged.values())),
            }
    return {"store": str(store_dir), "labels": str(labels_path), "k": k, "labelled_turns": len(present),
            "labels_not_in_store": len(labels) - len(present),
            "label_counts": dict(sorted(Counter(labels.values()).items())), "acts": per_act}
