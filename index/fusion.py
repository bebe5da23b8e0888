"""Fuse ranked lists (BM25 and dense) into one ranking.

A run is a list of `(docid, score)`, best first. Both methods match pyserini's conventions
(`pyserini.fusion`), which tests/test_index.py::test_fusion_matches_pyserini_on_real_runs checks:
- `rrf`: score = sum over runs of 1 / (rrf_k + rank), rank counted from 1 (Cormack et al. 2009);
- `interpolate`: each run's scores min-max normalised to [0, 1] (all equal -> 1), then
  alpha * first + (1 - alpha) * second; a document missing from a run gets 0 from it.
Ties are broken by docid ascending, as pyserini does; `depth` cuts each input run, `k` the output.
"""

from __future__ import annotations

Run = list[tuple[str, float]]


def _ranked(scores: dict[str, float], k: int | None) -> Run:
    fused = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    return fused[:k] if k is not None else fused


def rrf(runs: list[Run], rrf_k: int = 60, depth: int | None = None, k: int | None = None) -> Run:
    scores: dict[str, float] = {}
    for run in runs:
        for rank, (docid, _) in enumerate(run[:depth] if depth is not None else run, start=1):
            scores[docid] = scores.get(docid, 0.0) + 1 / (rrf_k + rank)
    return _ranked(scores, k)


def normalise(run: Run) -> Run:
    """Min-max scale a run's scores to [0, 1]; a run of equal scores becomes all 1."""
    if not run:
        return []
    values = [s for _, s in run]
    low, high = min(values), max(values)
    if high == low:
        return [(d, 1.0) for d, _ in run]
    return [(d, (s - low) / (high - low)) for d, s in run]


def interpolate(runs: list[Run], alpha: float = 0.5, depth: int | None = None, k: int | None = None) -> Run:
    """alpha * norm(runs[0]) + (1 - alpha) * norm(runs[1])."""
    if len(runs) != 2:
        raise ValueError("interpolation fuses exactly two runs")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    scores: dict[str, float] = {}
    for run, weight in zip(runs, (alpha, 1 - alpha)):
        # Normalise the whole run, then cut it to `depth`: the order pyserini uses.
        scaled = normalise(run)
        for docid, score in scaled[:depth] if depth is not None else scaled:
            scores[docid] = scores.get(docid, 0.0) + score * weight
    return _ranked(scores, k)


def fuse(runs: list[Run], method: str = "rrf", k: int | None = None, rrf_k: int = 60,
         alpha: float = 0.5) -> Run:
    """One entry point for configs: `method` is "rrf" or "interpolate"; a single run passes through."""
    runs = [r for r in runs if r]
    if not runs:
        return []
    if len(runs) == 1:
        return runs[0][:k] if k is not None else runs[0]
    if method == "rrf":
        return rrf(runs, rrf_k=rrf_k, k=k)
    if method == "interpolate":
        return interpolate(runs, alpha=alpha, k=k)
    raise ValueError(f"unknown fusion method {method!r} (rrf or interpolate)")
