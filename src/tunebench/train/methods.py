"""The method table: how each train.method turns a base model into a trainable one (through peft)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tunebench.errors import ConfigError

if TYPE_CHECKING:  # config reads the method names from here, so no import back at run time
    from tunebench.config import TrainConfig


@dataclass(frozen=True)
class Method:
    """What a train.method is, for every module that must treat methods differently."""

    name: str
    lora: bool = False  # low-rank adapters on linear layers: mergeable, offloadable, vLLM-servable
    quantized: bool = False  # the frozen base is loaded in 4-bit (bitsandbytes NF4)
    virtual_tokens: bool = False  # prepends trained tokens to every row: rows are never joined or packed

    @property
    def peft(self) -> bool:
        """Saved as a peft adapter (else the whole model is saved)."""
        return self.lora or self.virtual_tokens


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("qlora", lora=True, quantized=True),
    Method("lora", lora=True),
    Method("full"),
    Method("prefix", virtual_tokens=True),
    Method("prompt", virtual_tokens=True),
)}
METHOD_NAMES = tuple(METHODS)
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]  # the config's type for train.method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown train.method '{name}' (choose from: {', '.join(METHOD_NAMES)})")
    return METHODS[name]


def peft_config(train: TrainConfig):
    """The peft config for a method, or None for full fine-tuning."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    method = get_method(train.method)
    if method.lora:
        return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                          target_modules=train.target_modules, use_dora=train.use_dora,
                          use_rslora=train.use_rslora, bias="none", task_type=TaskType.CAUSAL_LM)
    if train.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=train.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)
    if train.method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=train.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)
    return None  # full fine-tuning


def make_trainable(model, train: TrainConfig, adapter=None):
    """Attach the method's adapters (or unfreeze everything for full) and set up checkpointing.
    adapter: a saved LoRA adapter folder to go on training (lora/qlora starting from a run)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    method = get_method(train.method)
    if method.lora:
        check_target_modules(model, train.target_modules)
    # Frozen-weight offload needs the re-entrant form (see train/offload.py); otherwise the
    # non-re-entrant one, which needs no inputs that require grad.
    checkpointing = {"use_reentrant": train.offload_frozen}
    recompute = train.gradient_checkpointing is not False  # auto is resolved in setup; unresolved, it is on
    if method.quantized and train.kbit_upcast:
        # peft's recipe: casts every non-quantised weight (embeddings and lm_head too) to fp32.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recompute, gradient_checkpointing_kwargs=checkpointing)
    elif recompute and not method.virtual_tokens:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if recompute and checkpointing["use_reentrant"]:
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


def check_target_modules(model, target_modules: list[str] | str) -> None:
    """Refuse target module names this model does not have, naming its linear modules (peft would
    raise a library traceback). A list matches a module by its name's last parts, a string other
    than all-linear is a regular expression over full names: peft's rules."""
    import torch

    names = [name for name, _ in model.named_modules() if name]
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):
        missing = [] if any(re.fullmatch(target_modules, n) for n in names) else [target_modules]
    else:
        missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ConfigError(f"train.target_modules: this model has no module named "
                          f"{', '.join(map(repr, missing))} (its linear modules: {', '.join(linear)}; "
                          "or all-linear)")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
