"""The decode step's attention masks, built by tunebench's decode loop from its own bookkeeping.

For every forward transformers builds the masks from the 2-D padding mask, the cache and the
positions: ~45 small kernels per decode step for Gemma 3 (a full and a sliding-window mask), and
the loop's attention then inverts the boolean mask in every layer. The loop already keeps which
cache slots each row attends to (its prompt's real tokens and every token fed since), and the
cache is static, so a slot is a position in the cache: the full mask is that (rows, 1, 1, slots)
table, the sliding-window mask the same limited to the last `sliding_window` slots up to the fed
token's (transformers' window: key slot > query slot - window). Both are made additive (0 or -inf,
in float32, the scores' dtype in decode_attention.py) once a step, not per layer.

transformers takes such masks as they are: the models in TENSOR_MASKS use a 4-D mask as given
(masking_utils returns it unchanged), those in DICT_MASKS take a dict of one mask per layer type. Any
other model keeps transformers' masks (`mask_kind` is None): some read the 2-D padding mask for more
than masking (Falcon's ALiBi).
"""

from __future__ import annotations

import torch

from tunebench.generate.switched import stock
from tunebench.train.wrapped import causal_lm

# model_type → its forward takes {layer type: mask} as attention_mask (transformers 5.x modeling files)
DICT_MASKS = {"gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3"}
# ... or uses the one 4-D mask it is given for every layer, and the 2-D padding mask for nothing else
TENSOR_MASKS = {"llama", "gemma", "mistral"}
LAYER_TYPES = {"full_attention", "sliding_attention"}


def mask_kind(model) -> str | None:
    """"dict" (one mask per layer type), "tensor" (one 4-D mask for every layer) or None (transformers
    builds the masks: a model this module does not know to take them, remote code's included)."""
    if not stock(causal_lm(model)):
        return None
    config = model.config.get_text_config()
    layer_types = set(getattr(config, "layer_types", None) or [])
    sliding = "sliding_attention" in layer_types or getattr(config, "sliding_window", None) is not None
    if getattr(config, "use_bidirectional_attention", False):
        return None
    if config.model_type in DICT_MASKS and layer_types <= LAYER_TYPES and layer_types:
        return "dict"
    if config.model_type in TENSOR_MASKS and not sliding and layer_types <= {"full_attention"}:
        return "tensor"
    return None


class StepMasks:
    """Masks for the decode step from `attend` ((rows, slots) bool: the slots each row attends to) and
    `fed` ((1,) long: the cache slot of the token being fed), both updated in place by the loop."""

    def __init__(self, model, kind: str, slots: int, device: torch.device):
        config = model.config.get_text_config()
        self.kind = kind
        self.window = getattr(config, "sliding_window", None)
        self.layer_types = sorted(set(config.layer_types)) if kind == "dict" else []
        self.slots = torch.arange(slots, device=device)
        self.zero = torch.zeros((), device=device)  # float32: added to the float32 scores as they are
        self.blocked = torch.full((), float("-inf"), device=device)

    def additive(self, attend: torch.Tensor) -> torch.Tensor:
        return torch.where(attend, self.zero, self.blocked)[:, None, None, :]

    def __call__(self, attend: torch.Tensor, fed: torch.Tensor):
        full = self.additive(attend)
        if self.kind == "tensor":
            return full
        masks = {}
        for layer_type in self.layer_types:
            if layer_type == "sliding_attention":
                masks[layer_type] = self.additive(attend & (self.slots > fed - self.window))
            else:
                masks[layer_type] = full
        return masks
