"""Fold a LoRA adapter into the weights in memory before generating (`generate.merge_adapter`).

Decoding through peft's LoRA layers runs two extra small matmuls and Python per projection per
token; with the adapter merged each projection is one plain linear layer. The adapter on disk is
never touched. A 4-bit base is never merged: the sum would be rounded back onto the NF4 grid and
lose much of what the adapter learned (the same rule as `tunebench merge`).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def is_quantized(model) -> bool:
    """Whether the (base) model holds bitsandbytes/other quantised weights (peft forwards attributes)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "hf_quantizer", None) is not None)


def has_lora_adapter(model) -> bool:
    """A peft model whose active adapter is LoRA (DoRA included): the kind that can be merged."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(model, "active_adapter"):
        return False
    config = configs.get(model.active_adapter)
    return config is not None and str(getattr(config, "peft_type", "")).split(".")[-1] == "LORA"


def should_merge(setting: str | bool, *, lora: bool, quantized: bool) -> bool:
    """auto and true merge a LoRA adapter on an unquantised base; a 4-bit base never, whatever the setting."""
    if setting not in ("auto", True, False):
        raise ValueError(f"generate.merge_adapter must be auto, true or false, got {setting!r}")
    return lora and not quantized and setting in ("auto", True)


def merge_for_generation(model, setting: str | bool):
    """The model to generate with: `model` itself, or its LoRA adapter merged in (in place: the
    PeftModel passed in keeps working, its LoRA layers now plain layers with the merged weights)."""
    lora, quantized = has_lora_adapter(model), is_quantized(model)
    if setting is True and quantized and lora:
        log.warning("generate.merge_adapter: true ignored: the base is quantised (merging into 4-bit weights "
                    "loses most of the adapter); generating through the adapter")
    if not should_merge(setting, lora=lora, quantized=quantized):
        return model
    return model.merge_and_unload()
