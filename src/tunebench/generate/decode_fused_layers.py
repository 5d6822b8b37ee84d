"""Gemma 3's attention and MLP for the one-token decode step, in fewer kernels (uncompiled loop).

Per layer, transformers' Gemma 3 attention runs three projections, two RMSNorms (queries, keys) of
three kernels each once fused (decode_norms.py), and rotary embeddings of five kernels for the
queries and five for the keys (rotate_half: a negation and a concatenation); its MLP two
projections into the same input. With the step captured as a CUDA graph each kernel costs a few
microseconds whatever its size, and these are 30 of a layer's ~50. Here, for one query position:

- the query, key and value projections are one matmul on their weights stacked (and gate and up
  likewise), copied once per run; a model of FUSE_BELOW_PARAMETERS or more keeps its layers (its
  step is bound by reading the weights, and the copy would cost memory);
- queries and keys are normalised together: one float cast, one rms_norm without weight, one
  multiply by both norms' (1 + weight), one cast back, as the model computes each apart;
- their rotary embedding together: q·cos + roll(q, half)·sin_signed, where sin_signed is sin with
  its first half negated (rotate_half(q)·sin, since -a·b = a·-b exactly), in the model's dtype.

On a CUDA GPU with Triton (bf16/fp16) the attention after the projection runs as three Triton kernels
(decode_attention_kernels.py: norm, rotation and cache write in one; the attention over the cache in
chunks, then their combination) and the layer's norms and adds as norm_add_norm (decode_kernels.py).
Elsewhere the arithmetic is the model's own, in its order; in fp64 on CPU the answers equal
transformers' (tests/generate/test_decode_step_inputs.py). Only transformers' own Gemma 3 classes with plain
Linear projections are switched, only while the decode loop runs, and only for calls of one
position (the prompt's pass runs as written).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunebench.generate.decode_attention import NAME, grouped_decode_attention
from tunebench.generate.decode_attention_kernels import (
    attend_new_token,
    kernel_case,
    normed_and_rotated,
    rotate_and_write,
)
from tunebench.generate.decode_kernels import norm_add_norm
from tunebench.generate.slot_writes import SlotWrites
from tunebench.generate.switched import stock, switched_forwards

# the stacked copies (~40% of a layer's weights) are made again for each batch: small models only, whose step
# is bound by kernel count (Gemma 3 270M: ~0.1 GB)
FUSE_BELOW_PARAMETERS = 600_000_000
ATTENTION, MLP, LAYER = "Gemma3Attention", "Gemma3MLP", "Gemma3DecoderLayer"
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def plain(*linears) -> bool:
    """Plain Linear layers (not peft's or bitsandbytes' subclasses), with a bias on all of them or none."""
    return all(type(m) is nn.Linear for m in linears) and len({m.bias is None for m in linears}) == 1


def stacked(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    return weight, (torch.cat(biases) if biases[0] is not None else None)


class SignedSin:
    """sin with its first half negated, made once per sin tensor (the model makes one per layer type and
    forward, and every layer of that type gets the same tensor)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device):
        self.sign = torch.ones(dim, dtype=dtype, device=device)
        self.sign[: dim // 2] = -1
        self.last: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sin, signed), held: `is` stays sound

    def __call__(self, sin: torch.Tensor) -> torch.Tensor:
        for seen, signed in self.last:
            if seen is sin:
                return signed
        signed = sin * self.sign.to(sin.dtype)
        self.last = (self.last + [(sin, signed)])[-4:]
        return signed


def one_token_attention(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                        *args, **kwargs):
    if hidden_states.shape[1] != 1 or self.training or self.config._attn_implementation != NAME:
        return self.unfused_forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    rows, heads, kv_heads = hidden_states.shape[0], self.config.num_attention_heads, self.config.num_key_value_heads
    qkv = F.linear(hidden_states, self.fused_weight, self.fused_bias)  # (rows, 1, (heads + 2 kv_heads) dim)
    cos, sin = position_embeddings  # (rows, 1, dim)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    writes = cache.update
    if isinstance(writes, SlotWrites) and isinstance(attention_mask, torch.Tensor) and \
            attention_mask.dtype == torch.float32:  # a decode step: the loop's slot and additive mask
        layer = writes.layers[self.layer_idx]
        query = rotate_and_write(qkv, self.qk_scale, self.q_norm.eps, cos, self.signed_sin(sin), layer.keys,
                                 layer.values, writes.fed, heads, kv_heads)
        # no softcap: transformers' Gemma 3 attention passes none to its attention function either
        out = attend_new_token(query, layer.keys, layer.values, attention_mask.reshape(rows, -1), self.scaling,
                               writes.fed, getattr(self, "sliding_window", None))
        return self.o_proj(out.view(rows, 1, -1)), None
    # a prompt of one token (the prompts' pass): the cache's own update and transformers' mask
    qk, value = normed_and_rotated(qkv, self.qk_scale, self.q_norm.eps, cos, self.signed_sin(sin), heads, kv_heads)
    query, key = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
    key, value = writes(key, value.transpose(1, 2), self.layer_idx)
    out, _ = grouped_decode_attention(self, query, key, value, attention_mask, scaling=self.scaling)
    return self.o_proj(out.reshape(rows, 1, -1)), None


def one_token_layer(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Gemma 3's decoder layer: its four RMSNorms and two residual adds as three norm_add_norm calls."""
    if hidden_states.shape[1] != 1:
        return self.unfused_forward(hidden_states, *args, **kwargs)
    scales, eps = self.norm_scales, self.input_layernorm.eps
    normed, _ = norm_add_norm(hidden_states, scales[0], eps)
    attended, _ = self.self_attn(normed, *args, **kwargs)
    residual, normed = norm_add_norm(attended, scales[1], eps, hidden_states, scales[2])
    out, _ = norm_add_norm(self.mlp(normed), scales[3], eps, residual)
    return out


def one_token_mlp(self, x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 1:
        return self.unfused_forward(x)
    gate, up = F.linear(x, self.fused_weight, self.fused_bias).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def switchable(module) -> bool:
    name = type(module).__name__
    if name not in (ATTENTION, MLP, LAYER) or not stock(module) or "forward" in vars(module):
        return False
    if name == LAYER:
        norms = [getattr(module, n, None) for n in LAYER_NORMS]
        return all(type(n).__name__ == "Gemma3RMSNorm" for n in norms) and len({n.eps for n in norms}) == 1 and \
            switchable(module.self_attn) and switchable(module.mlp)
    if name == MLP:
        return plain(module.gate_proj, module.up_proj)
    norms = [getattr(module, "q_norm", None), getattr(module, "k_norm", None)]
    return plain(module.q_proj, module.k_proj, module.v_proj) and \
        all(type(n).__name__ == "Gemma3RMSNorm" for n in norms) and norms[0].eps == norms[1].eps


def fused_kernels(model, device: torch.device) -> bool:
    """Whether the loop runs this model's one-token layers fused with their Triton kernels (a CUDA GPU with
    Triton, a bf16/fp16 switchable Gemma 3 under FUSE_BELOW_PARAMETERS with sdpa attention, which the loop
    switches to its own, and a head size that is a power of two): generate.compile auto leaves such a model
    uncompiled (engine.py)."""
    config = model.config.get_text_config()
    if not kernel_case(device, model.get_input_embeddings().weight.dtype, getattr(config, "head_dim", None) or 0) \
            or config._attn_implementation != "sdpa" or \
            sum(p.numel() for p in model.parameters()) >= FUSE_BELOW_PARAMETERS:
        return False
    return any(type(m).__name__ == ATTENTION and switchable(m) for m in model.modules())


def fused_layers(model):
    """Inside the block, the model's Gemma 3 attention and MLP modules run one-position calls fused (see
    the module's docstring), for a model of fewer than FUSE_BELOW_PARAMETERS parameters; restored after.
    The decode step's cache must take `update(key, value, layer_idx)` (GraphDecode.slot_writes)."""
    def choices():
        if sum(p.numel() for p in model.parameters()) >= FUSE_BELOW_PARAMETERS:
            return
        signed_sin = None  # one for all layers: each layer type's sin of a step is signed once
        # layers first: a layer is switched only while its attention and MLP are still as written
        for module in sorted(model.modules(), key=lambda m: type(m).__name__ != LAYER):
            if switchable(module):
                if type(module).__name__ == ATTENTION and signed_sin is None:
                    weight = module.q_proj.weight
                    signed_sin = SignedSin(module.head_dim, weight.dtype, weight.device)
                with torch.no_grad():
                    yield module, *fused_forward(module, signed_sin)

    return switched_forwards(choices())


def fused_forward(module, signed_sin: SignedSin | None) -> tuple:
    """(the fused forward, the attributes it reads) for a switchable module."""
    kind, own = type(module).__name__, {"unfused_forward": module.forward}
    if kind == LAYER:
        return one_token_layer, {**own, "norm_scales": [1.0 + getattr(module, n).weight.float() for n in LAYER_NORMS]}
    if kind == MLP:
        return one_token_mlp, {**own, **dict(zip(("fused_weight", "fused_bias"),
                                                 stacked(module.gate_proj, module.up_proj)))}
    weight, bias = stacked(module.q_proj, module.k_proj, module.v_proj)
    heads, kv_heads = module.config.num_attention_heads, module.config.num_key_value_heads
    scale = torch.cat([(1.0 + module.q_norm.weight.float()).expand(heads, -1),
                       (1.0 + module.k_norm.weight.float()).expand(kv_heads, -1)])
    return one_token_attention, {**own, "fused_weight": weight, "fused_bias": bias, "qk_scale": scale,
                                 "signed_sin": signed_sin}
