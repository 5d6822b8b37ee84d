"""The KV cache's update during tunebench's decode steps (GraphDecode.start): the fed token's key and
value into its cache slot.

The cache's own update also counts the positions it has filled: five kernels a layer where these are
two; the count stays at the prompt's width, read by nothing while the loop passes positions and masks
itself. A `SlotWrites` holds the cache's layers and the loop's `fed` slot, not the loop: no reference
cycle keeps a finished batch's cache alive. Gemma's fused one-token attention
(decode_fused_layers.py) recognises it and writes the slot inside its own kernel instead.
"""

from __future__ import annotations

import torch


class SlotWrites:
    def __init__(self, layers: list, fed: torch.Tensor):
        self.layers, self.fed = layers, fed  # fed: (1,) long on the device, the slot of the token being fed

    def __call__(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.keys.index_copy_(2, self.fed, key_states)
        layer.values.index_copy_(2, self.fed, value_states)
        return layer.keys, layer.values
