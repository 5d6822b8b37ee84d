"""Gemma's one-token attention in three kernels (uncompiled decode loop, decode_fused_layers.py).

After the stacked query/key/value projection, transformers' order of work, fused in torch operations,
is still ~15 kernels a layer: the queries' and keys' RMSNorm (cast, norm, scale, cast), their rotary
embedding (two products, a roll, a sum), the key and value written into the cache (two copies), the
scores (a matmul, a cast, a scale, the mask), a softmax, a cast and the matmul with the values. With
the step captured as a CUDA graph each costs a few microseconds whatever its size, and the score
matmul reads every slot of the static cache, written or not, inside a sliding window or not.

On a CUDA GPU with Triton, for bf16/fp16 models:
- `rotate_and_write`: one program per head normalises, scales and rotates a query or key head and
  writes the keys and values straight into their cache slot, written to round where the model rounds
  (the normalised head, each rotary product and their sum to the model's dtype; under the interpreter
  it equals torch bit for bit, but on an H100 ~23% of rotated elements land one bf16 rounding away,
  for a reason not yet found: bench/decode_profile.py's kernel check, docs/PERFORMANCE.md);
- `attend_new_token`: the cache's slots in chunks of CHUNK, one program per row, key/value head and
  chunk (scores rounded to the model's dtype as its matmul returns them, then scaled, masked, and a
  softmax over the chunk), then one program per query head that combines the chunks (flash-decoding).
  A chunk holding only slots after the fed token, or before a sliding layer's window, is skipped
  without reading it: those slots are masked anyway.
The softmax's sums are added in another order than torch's and its weights are rounded to the
model's dtype before their normalisation rather than after: bf16 answers can differ where rounding
does. Elsewhere (CPU, fp32/fp64, no Triton) the same steps run as torch operations (`*_reference`),
which are what the CPU tests hold against transformers' layers; under Triton's interpreter the kernels
are held against them on CPU (tests/generate/test_decode_attention_kernels.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CHUNK = 64  # cache slots per program of attend_new_token
# the combining kernel is compiled once per power of two of the chunk count from this one up: one kernel for
# caches of up to 1,024 slots (a prompt and its answer of up to 512 tokens), whatever a request's length
CHUNKS_PAD = 16
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def rotate_and_write_reference(qkv: torch.Tensor, scale: torch.Tensor, eps: float, cos: torch.Tensor,
                               signed_sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, fed: torch.Tensor,
                               heads: int, kv_heads: int) -> torch.Tensor:
    """qkv (rows, 1, (heads + 2 kv_heads) dim): the stacked projection of the fed tokens; scale
    (heads + kv_heads, dim) float32: each head's norm weight (1 + weight); cos, signed_sin (rows, 1, dim):
    sin with its first half negated; keys, values (rows, kv_heads, slots, dim): the layer's cache, written
    at slot `fed` ((1,) long). Returns the queries (rows, heads, dim), normalised and rotated."""
    qk, value = normed_and_rotated(qkv, scale, eps, cos, signed_sin, heads, kv_heads)
    keys.index_copy_(2, fed, qk[:, :, heads:].transpose(1, 2))
    values.index_copy_(2, fed, value.transpose(1, 2))
    return qk[:, 0, :heads]


def normed_and_rotated(qkv: torch.Tensor, scale: torch.Tensor, eps: float, cos: torch.Tensor, signed_sin: torch.Tensor,
                       heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked projection qkv (rows, 1, (heads + 2 kv_heads) dim) split: the query and key heads
    normalised (RMSNorm in float32 times `scale`) and rotated, (rows, 1, heads + kv_heads, dim), and the value
    heads as projected, (rows, 1, kv_heads, dim)."""
    rows, dim = qkv.shape[0], scale.shape[-1]
    qk = qkv[..., : (heads + kv_heads) * dim].view(rows, 1, heads + kv_heads, dim)
    qk = (F.rms_norm(qk.float(), (dim,), None, eps) * scale).to(qkv.dtype)
    qk = qk * cos[:, :, None] + qk.roll(dim // 2, -1) * signed_sin[:, :, None]
    return qk, qkv[..., (heads + kv_heads) * dim :].view(rows, 1, kv_heads, dim)


def attend_new_token_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                               scaling: float, fed: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """query (rows, heads, dim); keys, values (rows, kv_heads, slots, dim); mask (rows, slots) float32,
    added to the scores (0 or -inf). Returns (rows, heads · dim); query head h reads key/value head
    h // (heads / kv_heads) (transformers' repeat_kv order). `fed` and `window` only let the kernel skip
    slots the mask blocks."""
    rows, heads, dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scaling + mask[:, None, None, :]
    out = torch.matmul(scores.softmax(-1).to(values.dtype), values)  # (rows, kv_heads, group, dim)
    return out.reshape(rows, heads * dim)


@functools.cache
def triton_kernels():
    """(rotate, chunks, combine, next_power_of_2): the Triton kernels, defined at their first use, or None
    where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def rotate_kernel(QKV, SCALE, COS, SIN, QUERY, KEYS, VALUES, FED, qkv_row, cos_row, query_row, cache_row,
                      cache_head, cache_slot, eps, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, DIM)
        other = (cols + DIM // 2) % DIM  # roll by half: position i reads i + dim/2
        source = QKV + row * qkv_row + head * DIM
        x = tl.load(source + cols).to(tl.float32)
        x_other = tl.load(source + other).to(tl.float32)
        inverse = tl.math.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)
        dtype = QUERY.dtype.element_ty
        normed = (x * inverse * tl.load(SCALE + head * DIM + cols)).to(dtype).to(tl.float32)
        normed_other = (x_other * inverse * tl.load(SCALE + head * DIM + other)).to(dtype).to(tl.float32)
        cos = tl.load(COS + row * cos_row + cols).to(tl.float32)
        sin = tl.load(SIN + row * cos_row + cols).to(tl.float32)
        rotated = ((normed * cos).to(dtype).to(tl.float32) + (normed_other * sin).to(dtype).to(tl.float32)).to(dtype)
        if head < HEADS:
            tl.store(QUERY + row * query_row + head * DIM + cols, rotated)
        else:
            slot = tl.load(FED)
            at = row * cache_row + (head - HEADS) * cache_head + slot * cache_slot + cols
            tl.store(KEYS + at, rotated)
            value = tl.load(QKV + row * qkv_row + (head + KV_HEADS) * DIM + cols)
            tl.store(VALUES + at, value)

    # the cache's length changes from batch to batch (and request to request): one compiled kernel whatever it is
    @triton.jit(do_not_specialize=["mask_row", "slots", "window", "chunks"])
    def chunks_kernel(QUERY, KEYS, VALUES, MASK, FED, ACC, MAX, SUM, query_row, cache_row, cache_head, cache_slot,
                      mask_row, slots, scaling, window, chunks, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                      GROUP_PAD: tl.constexpr, DIM: tl.constexpr, CHUNK: tl.constexpr):
        row, kv_head, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        part = (row * KV_HEADS + kv_head) * chunks + chunk
        group = tl.arange(0, GROUP_PAD)
        first = chunk * CHUNK
        fed = tl.load(FED)
        lowest = tl.where(window > 0, fed - window + 1, 0)  # the first slot a sliding layer's window holds
        if (first > fed) | (first + CHUNK <= lowest):
            tl.store(MAX + part * GROUP_PAD + group, tl.full([GROUP_PAD], float("-inf"), tl.float32))
            tl.store(SUM + part * GROUP_PAD + group, tl.zeros([GROUP_PAD], tl.float32))
        else:
            cols = tl.arange(0, DIM)
            slot = first + tl.arange(0, CHUNK)
            inside = slot < slots
            query = tl.load(QUERY + row * query_row + (kv_head * GROUP + group)[:, None] * DIM + cols[None, :],
                            mask=(group < GROUP)[:, None], other=0.0)
            at = row * cache_row + kv_head * cache_head + slot[:, None] * cache_slot + cols[None, :]
            keys = tl.load(KEYS + at, mask=inside[:, None], other=0.0)
            scores = tl.dot(query, tl.trans(keys)).to(QUERY.dtype.element_ty).to(tl.float32) * scaling
            scores += tl.load(MASK + row * mask_row + slot, mask=inside, other=float("-inf"))[None, :]
            top = tl.max(scores, axis=1)
            top_or_zero = tl.where(top == float("-inf"), 0.0, top)  # a row with no slot here: weights 0, not NaN
            weights = tl.exp(scores - top_or_zero[:, None])
            values = tl.load(VALUES + at, mask=inside[:, None], other=0.0)
            acc = tl.dot(weights.to(VALUES.dtype.element_ty), values)
            tl.store(ACC + (part * GROUP_PAD + group)[:, None] * DIM + cols[None, :], acc)
            tl.store(MAX + part * GROUP_PAD + group, top)
            tl.store(SUM + part * GROUP_PAD + group, tl.sum(weights, axis=1))

    # compiled once per power of two of the chunk count from CHUNKS_PAD up
    @triton.jit(do_not_specialize=["chunks"])
    def combine_kernel(ACC, MAX, SUM, OUT, out_row, chunks, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                       GROUP_PAD: tl.constexpr, DIM: tl.constexpr, CHUNKS_PAD: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        chunk = tl.arange(0, CHUNKS_PAD)
        cols = tl.arange(0, DIM)
        parts = (row * KV_HEADS + head // GROUP) * chunks + chunk
        held = chunk < chunks
        top = tl.load(MAX + parts * GROUP_PAD + head % GROUP, mask=held, other=float("-inf"))
        overall = tl.max(top, axis=0)
        scale = tl.exp(top - tl.where(overall == float("-inf"), 0.0, overall))  # skipped chunks: 0
        total = tl.sum(scale * tl.load(SUM + parts * GROUP_PAD + head % GROUP, mask=held, other=0.0), axis=0)
        acc = tl.load(ACC + (parts * GROUP_PAD + head % GROUP)[:, None] * DIM + cols[None, :],
                      mask=(held & (scale > 0))[:, None], other=0.0)  # a skipped chunk's ACC was never written
        out = tl.sum(acc * scale[:, None], axis=0) / total
        tl.store(OUT + row * out_row + head * DIM + cols, out.to(OUT.dtype.element_ty))

    return rotate_kernel, chunks_kernel, combine_kernel, triton.next_power_of_2


def kernel_case(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """The kernels' case: a CUDA device, bf16/fp16 (fp32 would go through TF32 in tl.dot), a head size that is
    a power of two (tl.arange's), and Triton."""
    return device.type == "cuda" and dtype in KERNEL_DTYPES and head_dim > 0 and head_dim & (head_dim - 1) == 0 \
        and triton_kernels() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors are the kernels' case (kernel_case), all on a CUDA device."""
    first = tensors[0]
    return all(t.is_cuda for t in tensors) and kernel_case(first.device, first.dtype, first.shape[-1])


def rotate_and_write_triton(qkv, scale, eps, cos, signed_sin, keys, values, fed, heads, kv_heads) -> torch.Tensor:
    """rotate_and_write_reference as one kernel."""
    rotate, _, _, _ = triton_kernels()
    rows, dim = qkv.shape[0], scale.shape[-1]
    qkv, cos, signed_sin = qkv.reshape(rows, -1), cos.reshape(rows, dim), signed_sin.reshape(rows, dim)
    assert keys.stride() == values.stride() and keys.stride(-1) == 1 and qkv.stride(-1) == 1
    assert cos.stride() == signed_sin.stride() and cos.stride(-1) == 1
    query = torch.empty(rows, heads, dim, dtype=qkv.dtype, device=qkv.device)
    rotate[(rows, heads + kv_heads)](
        qkv, scale.contiguous(), cos, signed_sin, query, keys, values, fed, qkv.stride(0), cos.stride(0),
        query.stride(0), keys.stride(0), keys.stride(1), keys.stride(2), eps, HEADS=heads, KV_HEADS=kv_heads, DIM=dim)
    return query


def attend_new_token_triton(query, keys, values, mask, scaling, fed, window) -> torch.Tensor:
    """attend_new_token_reference as a kernel over chunks of the cache and one that combines them."""
    _, chunks_kernel, combine, next_power_of_2 = triton_kernels()
    rows, heads, dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    group_pad = max(16, next_power_of_2(group))  # tl.dot's smallest tile
    chunks = -(-slots // CHUNK)
    assert keys.stride() == values.stride() and keys.stride(-1) == 1 and mask.stride(-1) == 1
    query = query.contiguous()
    acc = torch.empty(rows * kv_heads * chunks * group_pad, dim, dtype=torch.float32, device=query.device)
    top = torch.empty(rows * kv_heads * chunks * group_pad, dtype=torch.float32, device=query.device)
    total = torch.empty_like(top)
    chunks_kernel[(rows, kv_heads, chunks)](
        query, keys, values, mask, fed, acc, top, total, query.stride(0), keys.stride(0), keys.stride(1),
        keys.stride(2), mask.stride(0), slots, scaling, window or 0, chunks, KV_HEADS=kv_heads, GROUP=group,
        GROUP_PAD=group_pad, DIM=dim, CHUNK=CHUNK)
    out = torch.empty(rows, heads * dim, dtype=query.dtype, device=query.device)
    combine[(rows, heads)](acc, top, total, out, out.stride(0), chunks, KV_HEADS=kv_heads, GROUP=group,
                           GROUP_PAD=group_pad, DIM=dim, CHUNKS_PAD=max(CHUNKS_PAD, next_power_of_2(chunks)))
    return out


def rotate_and_write(qkv, scale, eps, cos, signed_sin, keys, values, fed, heads, kv_heads) -> torch.Tensor:
    """rotate_and_write_reference's result: one Triton kernel where `usable`, torch operations elsewhere."""
    if usable(keys, qkv, cos) and cos.dtype == qkv.dtype == keys.dtype and signed_sin.dtype == cos.dtype:
        return rotate_and_write_triton(qkv, scale, eps, cos, signed_sin, keys, values, fed, heads, kv_heads)
    return rotate_and_write_reference(qkv, scale, eps, cos, signed_sin, keys, values, fed, heads, kv_heads)


def attend_new_token(query, keys, values, mask, scaling, fed, window=None) -> torch.Tensor:
    """attend_new_token_reference's result: two Triton kernels where `usable`, torch operations elsewhere."""
    if usable(query, keys) and query.dtype == keys.dtype and mask.dtype == torch.float32:
        return attend_new_token_triton(query, keys, values, mask, scaling, fed, window)
    return attend_new_token_reference(query, keys, values, mask, scaling, fed, window)
