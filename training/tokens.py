"""Token-level layout shared by every trainer: prompt/reply encoding, length policy, padding and packing.

Three ways to lay a batch of (prompt, reply...) sequences into tensors:
- `padded`: one row per sequence, right-padded (works everywhere, wastes compute on padding).
- `varlen`: sequences concatenated into rows without padding, `position_ids` restart per sequence and
  attention is block-diagonal. On CUDA with flash-attention 2 the kernels read the boundaries from
  `position_ids`; elsewhere we pass the equivalent 4-D boolean mask to SDPA.
- `shared_prompt` (pairs): `prompt, chosen, rejected` in one block; both replies attend to the one copy
  of the prompt and never to each other, and the rejected reply's positions continue from the prompt.
  The prompt is encoded once instead of twice; needs a 4-D mask (SDPA / flex attention).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from training.data import FilterReport

PROMPT_SEPARATOR = "\n\n"


def has_bert_specials(tokenizer) -> bool:
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def window_spans(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) windows `size` tokens wide, a new one every `stride` (<= size) tokens, covering 0..n; the
    last one ends at n. The probe's embedding windows and the reward model's reply windows."""
    spans = [(0, min(size, n))]
    while spans[-1][1] < n:
        start = spans[-1][0] + stride
        spans.append((start, min(start + size, n)))
    return spans


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prefix every reply continues: `[CLS] prompt [SEP]` for encoders, `prompt\\n\\n` for causal LMs."""
    if has_bert_specials(tokenizer):
        return [tokenizer.cls_token_id] + _ids(tokenizer, prompt) + [tokenizer.sep_token_id]
    return _ids(tokenizer, prompt + PROMPT_SEPARATOR)


def encode_reply(tokenizer, reply: str) -> list[int]:
    end = tokenizer.sep_token_id if has_bert_specials(tokenizer) else tokenizer.eos_token_id
    return _ids(tokenizer, reply) + ([end] if end is not None else [])


def _ids(tokenizer, text: str) -> list[int]:
    """The whole text's token ids. Not `verbose`: a text past the model's positions is expected here (it is
    truncated or windowed afterwards, and counted), so transformers' "will result in indexing errors"
    warning would be wrong."""
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)


@dataclass
class LengthPolicy:
    """`drop` pairs over `max_length`, or `truncate` them (the prompt to `max_prompt_length`, at most half
    of `max_length`, keeping its last token; then the reply's tail, keeping its end token). Either way
    the report counts every row affected."""
    max_length: int
    max_prompt_length: int
    overlong: str = "truncate"  # truncate | drop

    def fit(self, prompt: list[int], replies: list[list[int]], report: FilterReport) -> tuple | None:
        report.total += 1
        longest = max(len(r) for r in replies)
        if len(prompt) + longest <= self.max_length:
            report.kept += 1
            _count_reply_tokens(report, replies, replies)
            return prompt, replies
        if self.overlong == "drop":
            report.dropped[f"over_max_length_{self.max_length}"] += 1
            return None
        prompt_cap = max(2, min(self.max_prompt_length, self.max_length // 2))
        if len(prompt) > prompt_cap:
            prompt = prompt[: prompt_cap - 1] + prompt[-1:]
            report.truncated["prompt"] += 1
        budget = self.max_length - len(prompt)
        if budget < 2:
            report.dropped["prompt_fills_max_length"] += 1
            return None
        fitted = []
        for reply in replies:
            if len(reply) > budget:
                reply = reply[: budget - 1] + reply[-1:]
                report.truncated["reply"] += 1
            fitted.append(reply)
        report.kept += 1
        _count_reply_tokens(report, replies, fitted)
        return prompt, fitted


def _count_reply_tokens(report: FilterReport, whole: list[list[int]], seen: list[list[int]]) -> None:
    """How much of the replies truncation left (FilterReport.reply_tokens in results)."""
    report.reply_tokens_whole += sum(len(r) for r in whole)
    report.reply_tokens_seen += sum(len(r) for r in seen)


# ----------------------------------------------------------------------------- masks

def block_mask(segments: torch.Tensor, causal: bool, shared: torch.Tensor | None = None) -> torch.Tensor:
    """4-D boolean mask (1, 1, L, L) for one row. `segments[i]` = sequence id of token i (-1 = padding).
    `shared[i]` = True for prompt tokens that every sequence of the same group may see (shared_prompt).
    """
    same = segments[:, None] == segments[None, :]
    if shared is not None:
        groups = torch.where(segments >= 0, segments // 4, -1)  # pair k: segments 4k (prompt), 4k+1, 4k+2
        same = same | (shared[None, :] & (groups[:, None] == groups[None, :]))
    if causal:
        length = segments.shape[0]
        same = same & torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = same & (segments[:, None] >= 0)
    # padding rows see themselves so softmax never sees an all-masked row (their output is ignored)
    same = same | torch.eye(segments.shape[0], dtype=torch.bool, device=segments.device)
    return same[None, None]


@dataclass
class Batch:
    """Model inputs plus where to read each sequence's score (flat indices into batch*length)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    score_index: torch.Tensor | None = None
    real_tokens: int = 0
    extras: dict = field(default_factory=dict)
    # block-sparse rows (training.attention): the mask as segment ids and shared-prompt flags
    segments: torch.Tensor | None = None
    shared: torch.Tensor | None = None

    def model_inputs(self, device) -> dict:
        out = {"input_ids": self.input_ids.to(device)}
        for name in ("attention_mask", "position_ids", "score_index"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.to(device)
        if self.segments is not None:
            from training.attention import segment_block_mask

            shared = None if self.shared is None else self.shared.to(device)
            out["block_mask"] = segment_block_mask(self.segments.to(device), shared)
        return out


def shuffled_chunks(n: int, size: int, rng: random.Random | None) -> list[list[int]]:
    """Indices 0..n-1, shuffled by `rng` (kept in order without one), cut into chunks of `size`."""
    order = list(range(n))
    if rng:
        rng.shuffle(order)
    return [order[start:start + size] for start in range(0, n, size)]


def pad_rows(rows: list[list[int]], pad_id: int) -> Batch:
    """Right-padded rows with a 2-D mask; the model pools each row itself."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return Batch(ids, mask, None, None, real_tokens=sum(len(r) for r in rows))


def pack_rows(blocks: list[list[list[int]]], pad_id: int, causal: bool, shared_prompt: bool,
              use_position_boundaries: bool = False, block_sparse_length: int | None = None) -> Batch:
    """Pack `blocks` (each a list of segments) into one row.

    varlen: each block is one sequence [tokens]; the score is read at its last token.
    shared_prompt: each block is [prompt, chosen, rejected]; scores are read at the ends of chosen and
    rejected (in that order, block by block). With `use_position_boundaries` (flash-attention varlen) no
    mask is built: the kernels take sequence boundaries from the restarting position_ids. With
    `block_sparse_length` the row is padded to that many tokens (one shape: one compiled kernel) and the
    mask stays as segment ids for training.attention (`Batch.model_inputs` builds the BlockMask).
    """
    ids, segments, positions, shared, score_at = [], [], [], [], []
    for b, block in enumerate(blocks):
        if shared_prompt:
            prompt, chosen, rejected = block
            base = len(ids)
            for seg_no, seg in ((0, prompt), (1, chosen), (2, rejected)):
                start_pos = 0 if seg_no == 0 else len(prompt)
                ids += seg
                segments += [4 * b + seg_no] * len(seg)
                positions += list(range(start_pos, start_pos + len(seg)))
                shared += [seg_no == 0] * len(seg)
                if seg_no:
                    score_at.append(len(ids) - 1)
            assert len(ids) - base == len(prompt) + len(chosen) + len(rejected)
        else:
            (sequence,) = block
            ids += sequence
            segments += [b] * len(sequence)
            positions += list(range(len(sequence)))
            shared += [False] * len(sequence)
            score_at.append(len(ids) - 1)
    real = len(ids)
    if block_sparse_length is not None:
        if real > block_sparse_length:
            raise ValueError(f"a packed row of {real} tokens does not fit block_sparse_length={block_sparse_length}")
        padding = block_sparse_length - real
        ids, positions = ids + [pad_id] * padding, positions + [0] * padding
        segments, shared = segments + [-1] * padding, shared + [False] * padding
        return Batch(torch.tensor([ids]), None, torch.tensor([positions]), torch.tensor(score_at), real_tokens=real,
                     segments=torch.tensor(segments), shared=torch.tensor(shared) if shared_prompt else None)
    input_ids = torch.tensor([ids], dtype=torch.long)
    position_ids = torch.tensor([positions], dtype=torch.long)
    if use_position_boundaries and not shared_prompt:
        mask = None
    else:
        mask = block_mask(torch.tensor(segments), causal, torch.tensor(shared) if shared_prompt else None)
    return Batch(input_ids, mask, position_ids, torch.tensor(score_at), real_tokens=len(ids))


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` tokens, longest first (first-fit decreasing)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, left in enumerate(room):
            if lengths[i] <= left:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins
