"""Checks of a whole config before any work starts: every numeric key against its stated range, and
the combinations of settings that cannot work together. Each problem is one line naming the key.

The automatic settings (`train.answer_only_logits`, `train.offload_frozen`, `train.compile`) are decided
later, once the model is loaded (train/loss.py, train/offload.py, train/compile.py); the refusals that need no model live here,
and those modules ask the same rules, so a setting is refused by one rule in one place.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from tunebench.errors import ConfigError
from tunebench.train.methods import get_method

if TYPE_CHECKING:
    from tunebench.config import Config

BOUND = re.compile(r"^(≥|>)\s*(\S+)$")
INTERVAL = re.compile(r"^([\[(])\s*([^,]+),\s*([^\])]+)([\])])$")


def in_range(value: float, spec: str) -> bool:
    """Whether `value` lies in a range written as "≥ 1", "> 0", "[0, 1)", "(0, 1]" or "[0, 2]"."""
    if match := BOUND.match(spec):
        low = float(match.group(2))
        return value >= low if match.group(1) == "≥" else value > low
    if match := INTERVAL.match(spec):
        opening, low, high, closing = match.group(1), float(match.group(2)), float(match.group(3)), match.group(4)
        above = value >= low if opening == "[" else value > low
        below = value <= high if closing == "]" else value < high
        return above and below
    raise ValueError(f"unreadable range {spec!r}")


def range_problems(section: Any, prefix: str) -> list[str]:
    """`key: must be RANGE, got VALUE` for each numeric field of `section` (a config dataclass,
    nested ones included) whose value is outside its metadata range; null is always allowed."""
    problems = []
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            problems += range_problems(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    problems += range_problems(item, f"{key}[{i}].")
        spec = f.metadata.get("range")
        if spec and isinstance(value, (int, float)) and not isinstance(value, bool) and not in_range(value, spec):
            problems.append(f"'{key}' must be {'in ' if spec[0] in '[(' else ''}{spec}, got {value!r}")
    return problems


def answer_only_logits_refusal(method: str, sharded: bool = False) -> str | None:
    """Why train.answer_only_logits cannot run with this method (None: it can). Under DDP it runs
    (train/wrapped.py); under FSDP the output layer would run outside the sharded root's forward."""
    if get_method(method).virtual_tokens:
        return "it works with lora, qlora and full (it calls the decoder directly, past peft's virtual tokens)"
    if sharded:
        return ("it does not work with train.sharding fsdp (the output layer would run outside the sharded "
                "root's forward, past its unsharding of the embeddings and output layer)")
    return None


def offload_refusal(method: str, checkpointing: bool | str, world: int) -> str | None:
    """Why train.offload_frozen cannot run with these settings (None: it can); checkpointing auto is on
    whenever offload is asked for."""
    if not get_method(method).lora or checkpointing is False or world > 1:
        return "it works with train.method qlora or lora, train.gradient_checkpointing true or auto, on one process"
    return None


def compile_refusal(sharded: bool) -> str | None:
    """Why train.compile cannot run with these levers (None: it can). FSDP's hooks gather weights around
    each layer, inside the compiled call (not yet tried compiled). Offload streams weights at each compiled
    layer's entry and before its backward, outside the graph (train/compile.py: CompiledLayer)."""
    if sharded:
        return "it does not work with train.sharding fsdp on several processes yet (use sharding: none, DDP)"
    return None


def graphs_refusal(compiled: bool, checkpointing: bool, offload: bool) -> str | None:
    """Why the compiled layers cannot be replayed as CUDA graphs (train.cuda_graphs; None: they can). A
    replayed layer writes its outputs where its next replay writes, so nothing may call it again before its
    backward, nor move the weights it reads."""
    if not compiled:
        return "it replays the compiled layers, and train.compile is off"
    if checkpointing:
        return ("gradient checkpointing calls each layer again inside its backward, which overwrites the "
                "replayed graph's outputs (set train.gradient_checkpointing to false, or auto where it fits)")
    if offload:
        return "offload_frozen moves the layers' weights to new memory every step (set it to false)"
    return None


def combination_problems(config: Config, world_size: int) -> list[str]:
    """Settings that are each valid but cannot work together."""
    t, problems = config.train, []
    if t.objective != "sft" and get_method(t.method).virtual_tokens:
        problems.append(f"'train.objective' {t.objective} works with lora, qlora and full, not {t.method} "
                        "(virtual tokens cannot be shared by a joined chosen/rejected row)")
    if config.data.packing and get_method(t.method).virtual_tokens:
        problems.append("'data.packing' cannot be combined with prefix or prompt tuning (train.method): "
                        "virtual tokens would be shared across packed examples")
    if t.sharding == "fsdp" and get_method(t.method).virtual_tokens:
        problems.append(f"'train.sharding' fsdp works with lora, qlora and full, not {t.method} (peft reads the "
                        "virtual-token embeddings outside the sharded forward; they are small: use sharding: none)")
    sharded = t.sharding == "fsdp" and world_size > 1
    if t.answer_only_logits and (why := answer_only_logits_refusal(t.method, sharded)):
        problems.append(f"'train.answer_only_logits': {why}; set it to false or leave it null")
    if t.offload_frozen and (why := offload_refusal(t.method, t.gradient_checkpointing, world_size)):
        problems.append(f"'train.offload_frozen': {why}; set it to false or leave it null")
    if t.compile is True and (why := compile_refusal(sharded)):
        problems.append(f"'train.compile': {why}; set train.compile to auto or false, or turn the other off")
    if t.cuda_graphs is True and (why := graphs_refusal(t.compile is not False, t.gradient_checkpointing is True,
                                                        bool(t.offload_frozen))):
        problems.append(f"'train.cuda_graphs': true needs train.compile on, train.gradient_checkpointing false (or "
                        f"auto) and train.offload_frozen off: {why}")
    if t.compile_skip_guards is True and t.compile is False:
        problems.append("'train.compile_skip_guards': true applies to compiled layers, and train.compile is false; "
                        "set it to auto or false, or turn train.compile on")
    if t.compile_dequant is True and not get_method(t.method).quantized:
        problems.append(f"'train.compile_dequant' applies to qlora's 4-bit base weights, not train.method "
                        f"{t.method}; set it to auto or false")
    if config.generate.do_sample and config.generate.temperature == 0:
        problems.append("'generate.temperature' must be > 0 with generate.do_sample: true "
                        "(for greedy answers set do_sample: false)")
    return problems


def config_problems(config: Config, world_size: int = 1) -> list[str]:
    """Every range and combination problem of `config`, one line each."""
    return range_problems(config, "") + combination_problems(config, world_size)


def check_config(config: Config, world_size: int = 1, where: str | None = None) -> None:
    """Raise one ConfigError listing every problem of `config` on `world_size` processes (each line
    starting with `where`, the config file, when given)."""
    problems = config_problems(config, world_size)
    if problems:
        raise ConfigError("\n".join(f"{where}: {p}" if where else p for p in problems))
