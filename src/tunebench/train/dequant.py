"""4-bit base weights dequantised by torch ops inside the compiled layers (`train.compile_dequant`).

bitsandbytes' Linear4bit calls its own CUDA kernel through Python for every matmul, in the forward
and again in the backward: on the 13B shape ~190 µs of host time each, 560 calls a step, in a step
that is bound by host time (docs/PERFORMANCE.md, the compiled-offload profile). Written as torch ops,
the dequantisation is traced into each compiled layer's graph, where inductor fuses it into one kernel
launched from the layer's compiled code, with no Python call per weight.

Exactness: the same float32 arithmetic as bitsandbytes (double-quantised absmax = code₂[q]·absmax₂ +
offset; weight = table[nibble]·absmax, rounded once to the weight's dtype; the high nibble of each byte
first), so the weights are bit-identical to bitsandbytes' dequantize_4bit (tested on CPU against it).
The backward dequantises again instead of keeping the bf16 weight, as bitsandbytes does.

When: with the layers compiled and not replayed as CUDA graphs (auto). Measured on the 13B shape (H100,
docs/PERFORMANCE.md): 1.43x the compiled step, 0.5 GiB more at the peak (dequantised weights of a layer's
backward). Eagerly the torch ops are several kernels where bitsandbytes launches one, so auto leaves them
off without compile; with CUDA graphs the host cost they save is gone anyway. If compiling fails under
train.compile auto and the layers fall back to eager, the torch ops stay (correct, slower).
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F

from tunebench.errors import ConfigError


def parts(state) -> tuple:
    """A bitsandbytes QuantState as the tensors and numbers dequantize_4bit reads (a flat tuple, so the
    compiled layer traces through them with no Python object in between)."""
    nested = (None,) * 4
    if getattr(state, "nested", False):
        nested = (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset)
    return (state.code, state.absmax, state.blocksize, tuple(state.shape), state.dtype, *nested)


def dequantize_4bit(packed, code, absmax, blocksize, shape, dtype, code2=None, absmax2=None, blocksize2=None,
                    offset=None) -> torch.Tensor:
    """The weight of a bitsandbytes 4-bit tensor (NF4 or FP4: `code` is its 16-value table); code2,
    absmax2, blocksize2 and offset undo the double quantisation of absmax where it was applied."""
    if code2 is not None:
        index = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
        absmax = code2[absmax.long()] * absmax2[index] + offset
    flat = packed.flatten().view(torch.uint8)  # bytes stored as bf16 (sharded qlora) read as bytes
    nibbles = torch.stack([flat >> 4, flat & 0x0F], dim=1).flatten().long()
    count = math.prod(shape)
    block = torch.arange(count, device=packed.device) // blocksize
    values = code.float()[nibbles[:count]] * absmax.float()[block]
    return values.to(dtype).view(shape)


class Linear4bit(torch.autograd.Function):
    """x Wᵀ for a frozen 4-bit W, dequantised in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x, packed, code, absmax, blocksize, shape, dtype, code2, absmax2, blocksize2, offset):
        ctx.numbers = (blocksize, shape, dtype, blocksize2)
        ctx.save_for_backward(packed, code, absmax, code2, absmax2, offset)
        weight = dequantize_4bit(packed, code, absmax, blocksize, shape, dtype, code2, absmax2, blocksize2, offset)
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        packed, code, absmax, code2, absmax2, offset = ctx.saved_tensors
        blocksize, shape, dtype, blocksize2 = ctx.numbers
        weight = dequantize_4bit(packed, code, absmax, blocksize, shape, dtype, code2, absmax2, blocksize2, offset)
        return (grad @ weight.to(grad.dtype),) + (None,) * 10


def use_compile_dequant(setting: bool | str, quantized: bool, compiled: bool, graphs: bool = False) -> bool:
    """Resolve train.compile_dequant: auto is on for a 4-bit (qlora) base whose layers are compiled and not
    replayed as CUDA graphs (replayed, no host time is left to save, and the pair is not measured); true
    insists (eager too, where it is slower); false declines."""
    if setting == "auto":
        return quantized and compiled and not graphs
    return bool(setting)


def torch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """bitsandbytes Linear4bit.forward with the dequantisation in torch ops (installed per module)."""
    dtype = x.dtype
    if getattr(self, "compute_dtype", None) is not None:
        x = x.to(self.compute_dtype)
    out = Linear4bit.apply(x, self.weight.data, *parts(self.weight.quant_state))
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out.to(dtype)


def use_torch_dequant(model) -> int:
    """Point every bitsandbytes 4-bit linear of `model` at torch_forward; returns how many."""
    try:
        from bitsandbytes.nn import Linear4bit as BnbLinear4bit
    except ImportError as exc:
        raise ConfigError("train.compile_dequant needs bitsandbytes (pip install 'tunebench[qlora]')") from exc
    count = 0
    for module in model.modules():
        if isinstance(module, BnbLinear4bit):
            module.forward = types.MethodType(torch_forward, module)
            count += 1
    if not count:
        raise ConfigError("train.compile_dequant: the model has no 4-bit linear layers (it applies to qlora)")
    return count
