"""The model as the training loop calls it: through DDP (or FSDP) and down to the decoder.

answer_only_logits runs the decoder, then the output layer only where a label is. Called directly,
the decoder would run past DDP's forward (its gradient bookkeeping) and FSDP's root (its unsharding
of the embeddings). So what a data-parallel wrapper wraps is `DecoderOrLM`: its forward returns the
causal LM's output, or with hidden_only=True the decoder's last hidden state, and either way the
wrapper's own forward runs around it.
"""

from __future__ import annotations

import torch


class DecoderOrLM(torch.nn.Module):
    """The causal LM (or its peft model), with a forward that can stop at the decoder."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, hidden_only: bool = False, **kwargs):
        if hidden_only:
            return causal_lm(self.model).get_decoder()(*args, **kwargs).last_hidden_state
        return self.model(*args, **kwargs)


def inner(model):
    """The module under DDP/FSDP-style wrappers (`.module`), ours included (`.model`)."""
    model = getattr(model, "module", model)
    return model.model if isinstance(model, DecoderOrLM) else model


def causal_lm(model):
    """The transformers causal LM under any wrapper and peft."""
    model = inner(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden(model, inputs: dict) -> torch.Tensor:
    """The decoder's last hidden state (B, T, H), through the data-parallel wrapper when there is one."""
    if isinstance(getattr(model, "module", model), DecoderOrLM):
        return model(hidden_only=True, use_cache=False, **inputs)
    return causal_lm(model).get_decoder()(**inputs, use_cache=False).last_hidden_state
