"""The method table: how each train.method turns a base model into a trainable one (through peft)."""

from __future__ import annotations

from tunebench.config import TrainConfig
from tunebench.errors import ConfigError

METHODS = ("qlora", "lora", "full", "prefix", "prompt")


def peft_config(train: TrainConfig):
    """The peft config for a method, or None for full fine-tuning."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    if train.method in ("qlora", "lora"):
        return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                          target_modules=train.target_modules, use_dora=train.use_dora,
                          use_rslora=train.use_rslora, bias="none", task_type=TaskType.CAUSAL_LM)
    if train.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=train.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)
    if train.method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=train.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)
    if train.method == "full":
        return None
    raise ConfigError(f"unknown train.method '{train.method}' (choose from: {', '.join(METHODS)})")


def make_trainable(model, train: TrainConfig, adapter=None):
    """Attach the method's adapters (or unfreeze everything for full) and set up checkpointing.
    adapter: a saved LoRA adapter folder to go on training (lora/qlora starting from a run)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    # Frozen-weight offload needs the re-entrant form (see train/offload.py); otherwise the
    # non-re-entrant one, which needs no inputs that require grad.
    checkpointing = {"use_reentrant": train.offload_frozen}
    if train.method == "qlora" and train.kbit_upcast:
        # peft's recipe: casts every non-quantised weight (embeddings and lm_head too) to fp32.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=train.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing)
    elif train.gradient_checkpointing and train.method not in ("prefix", "prompt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if train.gradient_checkpointing and checkpointing["use_reentrant"]:
        model.enable_input_require_grads()  # re-entrant checkpoints pass gradients only to inputs that need them
    config = peft_config(train)
    if adapter is not None and config is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    if config is None:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    return get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
