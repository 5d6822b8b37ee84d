"""One kernel for what a Gemma decoder layer does between its attention and MLP: RMSNorm, residual add,
RMSNorm (uncompiled decode loop, decode_fused_layers.py).

transformers' Gemma 3 layer normalises the attention's output, adds it to the residual stream,
normalises the sum for the MLP, and after the MLP normalises and adds again: with each RMSNorm a cast
to float32, the norm and a cast back, that is 11 kernels of a layer's ~37 in the captured decode
step, each a few microseconds whatever its size. `norm_add_norm` does such a run in one Triton kernel
on a CUDA GPU, rounding where the model rounds (the normalised value to the model's dtype before the
add, the sum before the second norm); the sums of squares are added in another order than torch's,
as torch's own fused rms_norm does. Elsewhere (CPU, no Triton) the same arithmetic runs as torch
operations (`reference`), which the CPU tests hold against transformers' layers; bench/decode_profile.py
holds the kernel against `reference` on the GPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def reference(x: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
              scale2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed, normed): summed = residual + norm(x)·scale, rounded to x's dtype (without a residual,
    norm(x)·scale); normed = norm(summed)·scale2 in x's dtype (None without scale2). Norms in float32
    (Gemma's RMSNorm: x·rsqrt(mean(x²) + eps)·(1 + weight); `scale` is 1 + weight in float32)."""
    summed = (F.rms_norm(x.float(), x.shape[-1:], None, eps) * scale).to(x.dtype)
    if residual is not None:
        summed = residual + summed
    normed = None if scale2 is None else (F.rms_norm(summed.float(), x.shape[-1:], None, eps) * scale2).to(x.dtype)
    return summed, normed


@functools.cache
def triton_kernel():
    """The Triton kernel, defined at its first use (importing Triton costs start-up time), or None where
    Triton is not installed (CPU-only installs)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def norm_add_norm_kernel(X, R, S1, S2, SUMMED, NORMED, n, eps, BLOCK: tl.constexpr,
                             HAS_RESIDUAL: tl.constexpr, HAS_SECOND: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < n
        x = tl.load(X + row * n + cols, mask=inside, other=0.0).to(tl.float32)
        normed_x = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        summed = (normed_x * tl.load(S1 + cols, mask=inside, other=0.0)).to(SUMMED.dtype.element_ty)
        if HAS_RESIDUAL:
            residual = tl.load(R + row * n + cols, mask=inside, other=0.0).to(tl.float32)
            summed = (residual + summed.to(tl.float32)).to(SUMMED.dtype.element_ty)
        tl.store(SUMMED + row * n + cols, summed, mask=inside)
        if HAS_SECOND:
            s = summed.to(tl.float32)
            normed = s * tl.math.rsqrt(tl.sum(s * s, axis=0) / n + eps)
            normed = normed * tl.load(S2 + cols, mask=inside, other=0.0)
            tl.store(NORMED + row * n + cols, normed.to(NORMED.dtype.element_ty), mask=inside)

    return norm_add_norm_kernel, triton.next_power_of_2


def triton_norm_add_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                         scale2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`reference` as one Triton kernel (one program per row)."""
    kernel, next_power_of_2 = triton_kernel()
    x = x.contiguous()
    n = x.shape[-1]
    summed = torch.empty_like(x)
    normed = torch.empty_like(x) if scale2 is not None else None
    residual_in = residual.contiguous() if residual is not None else x
    kernel[(x.numel() // n,)](
        x, residual_in, scale, scale2 if scale2 is not None else scale, summed,
        normed if normed is not None else summed, n, eps, BLOCK=next_power_of_2(n),
        HAS_RESIDUAL=residual is not None, HAS_SECOND=scale2 is not None)
    return summed, normed


def norm_add_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                  scale2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`reference`'s result: one Triton kernel on a CUDA GPU, torch operations elsewhere."""
    if x.is_cuda and triton_kernel() is not None:
        return triton_norm_add_norm(x, scale, eps, residual, scale2)
    return reference(x, scale, eps, residual, scale2)
