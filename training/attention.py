"""Block-sparse attention for packed rows: PyTorch FlexAttention behind a transformers attention name.

A packed row holds many sequences (or prompt + chosen + rejected groups). With SDPA its mask is a
dense (L, L) tensor, and the kernel computes every one of the L x L scores, most of them masked: at
`pack_tokens` 4096 on gpt2-xl that is ~40 % more FLOPs than the model's matmuls, growing with L.
FlexAttention takes the same mask as a `BlockMask` and skips the 128 x 128 tiles that are fully
masked, so the attention costs about what the sequences themselves need.

Use: `register()` once, build the backbone with `attn_implementation=BLOCK_SPARSE`, and pass
`block_mask=segment_block_mask(...)` to its forward (transformers hands extra keyword arguments to
the attention function). Without a `block_mask` the same model attends like SDPA (padded batches
for scoring and evaluation). On CUDA the kernel is compiled once (rows are padded to one length);
on the CPU FlexAttention runs unfused: correct (tested against SDPA with the dense mask) but slow,
so the CPU default stays SDPA.
"""

from __future__ import annotations

import torch

BLOCK_SPARSE = "ahf_block_sparse"
_registered = False
_compiled = None


def _flex(query, key, value, block_mask, scale):
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention

    if query.device.type != "cuda":
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale)
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled(query, key, value, block_mask=block_mask, scale=scale)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, block_mask=None, **kwargs):
    """transformers' attention signature: (batch, heads, L, head_dim) in, (batch, L, heads, head_dim) out."""
    if block_mask is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise ValueError("block-sparse attention does not apply attention dropout; set attn_pdrop to 0")
    out = _flex(query, key, value, block_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `BLOCK_SPARSE` a transformers attention implementation (its masks: SDPA's)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(BLOCK_SPARSE, _attention)
    AttentionMaskInterface.register(BLOCK_SPARSE, sdpa_mask)
    _registered = True


def without_attention_dropout(model: torch.nn.Module) -> int:
    """Set attention-probability dropout to 0 (FlexAttention has none); returns how many modules changed.
    Residual and embedding dropout stay as configured."""
    changed = 0
    for module in model.modules():
        dropout = getattr(module, "attn_dropout", None)
        if isinstance(dropout, torch.nn.Dropout) and dropout.p:
            dropout.p = 0.0
            changed += 1
    for name in ("attn_pdrop", "attention_dropout"):
        if getattr(model.config, name, 0):
            setattr(model.config, name, 0.0)
    return changed


def segment_block_mask(segments: torch.Tensor, shared: torch.Tensor | None, causal: bool = True):
    """The BlockMask of one packed row (the same rule as training.tokens.block_mask).

    `segments[i]`: sequence id of token i, -1 for padding; `shared[i]`: a prompt token that the
    other members of its group (segments 4k..4k+3) see too. Padding tokens see only themselves."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = segments.shape[0]
    groups = torch.where(segments >= 0, segments // 4, -1)
    shared = torch.zeros_like(segments, dtype=torch.bool) if shared is None else shared

    def mask_mod(b, h, q, kv):
        visible = (segments[q] == segments[kv]) | (shared[kv] & (groups[q] == groups[kv]))
        if causal:
            visible = visible & (kv <= q)
        return (visible & (segments[q] >= 0)) | (q == kv)

    return create_block_mask(mask_mod, 1, None, length, length, device=segments.device)
