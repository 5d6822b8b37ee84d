"""Decoder layers torch.compile'd for the one-token decode step (`generate.compile`).

A CUDA graph removes the host's launch work but not the kernels: transformers' Gemma 3 layer runs
~110 small kernels per token (six RMSNorms of ~8 element-wise kernels each, rotary embeddings,
casts), ~2,000 for the 270M model's 18 layers, and at a few microseconds each they, not the
weights, set the step's time. Inductor fuses each layer into a few kernels; the fused kernels are
then captured in the decode loop's graph like any other. Only the decode step's layer calls (one
query position) go through the compiled layer; the prompt's pass stays eager, so compiling sees one
kind of call. The KV cache's update runs outside the compiled code (a graph break): it looks its
layer up by the layer's index, an integer dynamo would specialise on, compiling every layer apart
(and past dynamo's recompile limit, the later layers not at all). Shapes are symbolic (rows and
cache length change from batch to batch and when finished rows are dropped), so each distinct layer
code compiles once per process (two for models that alternate sliding and global attention), and
inductor's on-disk cache makes later processes cheaper.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from tunebench.train.wrapped import causal_lm

BACKEND = "inductor"  # the tests use aot_eager: the same tracing, without Triton code generation
RECOMPILE_LIMIT = 16  # graph variants per layer code: sliding/global attention × one row/more × graph breaks


class DecodeStepLayer:
    """Installed as a layer's `_compiled_call_impl` (what nn.Module.__call__ runs when set): a call
    with one query position goes through the compiled layer, any other eagerly."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.compiled = torch.compile(layer._call_impl, backend=BACKEND, dynamic=True)
        self.compiled_calls = 0

    def __call__(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != 1:
            return self.layer._call_impl(*args, **kwargs)
        self.compiled_calls += 1
        return self.compiled(*args, **kwargs)


def eager_cache_update(cache) -> None:
    """Keeps `cache.update` (per layer index) out of the compiled layers: a graph break, not a recompile
    per layer."""
    import torch._dynamo

    cache.update = torch._dynamo.disable(cache.update)


@contextmanager
def compiled_decode_layers(model):
    """Inside the block, each decoder layer's one-token calls run compiled; the compiled layers are
    kept on the layers (`_tunebench_decode_step`) for the next batch, and the layers are as before
    outside the block."""
    import torch._dynamo

    from tunebench.train.compile import raise_recompile_limit  # torch.compile's setting, shared with training

    raise_recompile_limit(RECOMPILE_LIMIT)
    layers = list(causal_lm(model).get_decoder().layers)
    before = [layer._compiled_call_impl for layer in layers]
    for layer in layers:
        if not isinstance(getattr(layer, "_tunebench_decode_step", None), DecodeStepLayer):
            layer._tunebench_decode_step = DecodeStepLayer(layer)
        layer._compiled_call_impl = layer._tunebench_decode_step
    try:
        # the layer index read at the cache update's call: symbolic, not one graph per layer
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            yield
    finally:
        for layer, call in zip(layers, before):
            layer._compiled_call_impl = call
