"""Rotary embeddings looked up in a table in tunebench's decode loop.

transformers computes each forward's cos/sin afresh from the positions: a float32 outer product
(on transformers 5.17, the GPU machines' version, a batched cuBLAS matmul of 0.09 ms per call),
a concatenation, cos, sin, scaling and casts: about ten kernels per layer type and step, for
values that depend on the position only. Inside `rotary_tables` the model's rotary modules compute
cos/sin once for every position of the loop's cache, by their own forward, and each step indexes
that table (one kernel each for cos and sin). Each value is the model's own cos/sin of that
position, computed by the same code on a longer tensor. Only the text decoder's own rotary module,
of transformers' classes, with frequencies that do not change with the sequence length (ROPE_TYPES;
dynamic and longrope scaling do) and one position axis (not mrope) is switched, and only inside the
block.
"""

from __future__ import annotations

import inspect

import torch

from tunebench.generate.switched import stock, switched_forwards
from tunebench.train.wrapped import causal_lm

# rope_type values whose inverse frequencies are fixed at init (transformers' modeling_rope_utils)
ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


def switchable(module) -> bool:
    """A transformers rotary module whose cos/sin depend on the position only."""
    if not type(module).__name__.endswith("RotaryEmbedding") or not stock(module) or "forward" in vars(module):
        return False
    rope_type = getattr(module, "rope_type", None)
    kinds = set(rope_type.values()) if isinstance(rope_type, dict) else {rope_type}
    parameters = list(inspect.signature(module.forward).parameters)
    return bool(kinds) and kinds <= ROPE_TYPES and parameters[:2] == ["x", "position_ids"]


def multimodal_rope(model) -> bool:
    """Rotary embeddings over several position axes (Qwen2-VL's mrope): positions are not one index."""
    config = model.config.get_text_config()
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    return isinstance(scaling, dict) and "mrope_section" in scaling


def tabled_forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
    """cos, sin of each position, read from the table built by the module's own forward."""
    table = self.rotary_table.get((layer_type, x.dtype, x.device))
    if table is None:  # a dtype or device the table was not built for: the module's own code
        return self.table_source(x, position_ids, *([layer_type] if layer_type is not None else []))
    cos, sin = table
    return cos[position_ids], sin[position_ids]


def rotary_tables(model, length: int, dtype: torch.dtype):
    """Inside the block, the model's switchable rotary modules return cos/sin for positions below
    `length` from a table (built here, in `dtype`); restored after."""
    device = next(model.parameters()).device
    positions = torch.arange(length, device=device)[None]
    probe = torch.empty(0, dtype=dtype, device=device)

    def choices():
        module = getattr(causal_lm(model).get_decoder(), "rotary_emb", None)  # the text decoder's only
        if module is None or not switchable(module) or multimodal_rope(model):
            return
        table = {}
        try:
            with torch.no_grad():
                for layer_type in sorted(getattr(module, "layer_types", None) or []) or [None]:
                    cos, sin = module(probe, positions, *([layer_type] if layer_type is not None else []))
                    table[(layer_type, dtype, device)] = (cos[0], sin[0])
        except Exception:  # a module this cannot tabulate: its own forward every step, as before
            return
        yield module, tabled_forward, {"rotary_table": table, "table_source": module.forward}

    return switched_forwards(choices())
