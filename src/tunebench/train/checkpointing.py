"""Gradient checkpointing (`train.gradient_checkpointing`), decided from the activations a micro-batch keeps.

Checkpointing keeps each decoder layer's input only and runs the layer again in the backward pass. On
a big model that is what lets the step fit; on a small one it costs more than the recompute's GPU time:
with compiled layers each layer's graph is called a second time from Python and its backward waits on
it, and the step is bound by those host-side calls. Gemma 3 270M LoRA at the course settings trained
2.4x as fast without it, 3.6x once the layers replay as CUDA graphs (train.cuda_graphs, which needs it
off), for 1.0 GiB more (H100, docs/PERFORMANCE.md, 'Checkpointing only where it is needed').

auto: off on one CUDA GPU when the activations one micro-batch would keep without checkpointing are
estimated under 1/ACTIVATION_SHARE of the GPU's memory; on otherwise (CPU, several processes, offload
asked for, which needs it).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ACTIVATION_SHARE = 8  # auto turns checkpointing off when the estimate is under 1/8 of the GPU's memory
# bf16 values a decoder layer keeps per token for its backward, per unit of hidden size and of MLP width.
# Gemma 3 270M (640 hidden, 2,048 intermediate, 18 layers) measured ~1.0 GiB for 2,048-token rows, about
# 12 × hidden + 3 × intermediate values per token and layer; these round that up.
PER_HIDDEN, PER_INTERMEDIATE = 16, 4


def activation_bytes(model_config, tokens: int) -> int:
    """Estimated bytes of activations a `tokens`-token micro-batch keeps over all layers, unchecked."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    return tokens * text.num_hidden_layers * (PER_HIDDEN * hidden + PER_INTERMEDIATE * intermediate) * 2


def micro_batch_tokens(step_tokens: int | None, batch_size: int, max_seq_length: int, pairs: bool) -> int:
    """The most tokens one micro-batch can hold: a joined row of step_tokens (one example longer than that
    runs alone), or batch_size padded rows; preference pairs hold a chosen and a rejected answer each."""
    tokens = max(step_tokens, max_seq_length) if step_tokens else batch_size * max_seq_length
    return tokens * (2 if pairs and not step_tokens else 1)


def use_checkpointing(setting: bool | str, model, device: torch.device | None, tokens: int,
                      offload: bool | None, world: int) -> bool:
    """Resolve train.gradient_checkpointing: true and false are kept; auto as in the module docstring."""
    if setting != "auto":
        return bool(setting)
    if offload or device is None or device.type != "cuda" or world > 1:
        return True
    need = activation_bytes(model.config, tokens)
    total = torch.cuda.get_device_properties(device).total_memory
    on = need * ACTIVATION_SHARE > total
    log.info("gradient_checkpointing auto: %s (activations of a %d-token micro-batch estimated at %.1f GiB, "
             "the GPU has %.0f GiB)", "on" if on else "off", tokens, need / 2**30, total / 2**30)
    return on
