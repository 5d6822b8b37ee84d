"""RMSNorm through torch's fused kernel in tunebench's uncompiled decode loop.

transformers writes each RMSNorm as Python arithmetic: a cast to float32, square, mean, add, rsqrt,
multiply, the weight (Gemma: 1 + weight, in float32), a cast back: about eight kernels, and Gemma 3
has six norms in each layer (input, after attention, before and after the MLP, and on the queries
and keys). In a decode step captured as a CUDA graph the kernel count, not the weights, sets a small
model's step time (docs/PERFORMANCE.md), and these norms are half of it. torch.nn.functional.rms_norm
does the square-mean-rsqrt-multiply in one kernel on a GPU; the casts around it are kept where the
model's own code has them, so the arithmetic is the model's (float32 throughout, rounded where the
model rounds). Known norm classes of transformers' own modeling files only (NORMS, by the way their
forward computes); any other norm, remote code's included, runs as written. Switched on only while
the decode loop runs (`fused_norms`), like decode_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunebench.generate.switched import stock, switched_forwards


def gemma_norm(self, x: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm: normalised and scaled by (1 + weight) in float32, then rounded to x's dtype."""
    return F.rms_norm(x.float(), x.shape[-1:], self.fused_scale, self.eps).type_as(x)


def llama_norm(self, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm: normalised in float32, rounded to x's dtype, then scaled by the weight."""
    return self.weight * F.rms_norm(x.float(), x.shape[-1:], None, self.variance_epsilon).to(x.dtype)


# class name → its fused forward; the classes' own forwards are in
# transformers' modeling files; tests/generate/test_decode_norms.py holds each against it
NORMS = {
    "GemmaRMSNorm": gemma_norm, "Gemma2RMSNorm": gemma_norm, "Gemma3RMSNorm": gemma_norm,
    "LlamaRMSNorm": llama_norm, "MistralRMSNorm": llama_norm, "Qwen2RMSNorm": llama_norm,
    "Qwen3RMSNorm": llama_norm,
}


def fused_norms(model):
    """Inside the block, the model's known RMSNorm modules run through F.rms_norm; restored after."""
    def choices():
        for module in model.modules():
            forward = NORMS.get(type(module).__name__)
            if forward is None or not stock(module) or "forward" in vars(module):
                continue
            # (1 + weight) once: read by every step, the weights being fixed while decoding
            yield module, forward, {"fused_scale": 1.0 + module.weight.float()} if forward is gemma_norm else {}

    return switched_forwards(choices())
