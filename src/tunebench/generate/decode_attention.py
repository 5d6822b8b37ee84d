"""Attention for one new token per row that reads each key/value head once (grouped-query attention).

With a padding mask, transformers' sdpa path copies every key/value head once per query head that
shares it before calling SDPA (Gemma 3 270M: 4 query heads on 1 key/value head, so 4 copies of the
whole static cache per layer per token), because SDPA's fused kernels take grouped heads only
without a mask. For a one-token query the attention is two small batched matmuls; done per
key/value group they read the cache once. Prompts (more than one query position) still go through
transformers' SDPA. Registered with transformers' attention and mask interfaces under NAME and
switched on only while tunebench's decode loop runs (`decode_attention`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "tunebench_decode"


def grouped_decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (rows, heads, 1, dim); key, value (rows, kv_heads, length, dim); attention_mask (rows, 1, 1,
    length) bool (True: attend), additive (0 or -inf) or None. Returns (rows, 1, heads, dim), as
    transformers' attention functions do."""
    rows, heads, positions, dim = query.shape
    if positions != 1 or (module.training and dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      softcap=softcap, **kwargs)
    kv_heads = key.shape[1]
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    # query head h uses key/value head h // group (transformers' repeat_kv order)
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * (dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool(), float("-inf")) if attention_mask.dtype == torch.bool \
            else scores + attention_mask.float()  # additive (decode_masks.py's: float32, no cast)
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (rows, kv_heads, group, dim)
    return out.reshape(rows, 1, heads, dim), None


AttentionInterface.register(NAME, grouped_decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def decode_attention(model):
    """Runs the model's sdpa attention layers through grouped_decode_attention inside the block, which
    gets whether they were switched. Only the text model's config is switched (transformers' setter
    would carry a top-level value into every sub-config, a vision tower's included, and back)."""
    config = model.config.get_text_config()
    before = config._attn_implementation
    if before != "sdpa":
        yield False
        return
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = before
