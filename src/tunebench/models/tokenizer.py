"""Resolve where a model lives and load its tokenizer."""

from __future__ import annotations

from pathlib import Path

from tunebench.config import ModelConfig
from tunebench.errors import ModelError
from tunebench.models.embedded import EMBEDDED_NAME, embedded_checkpoint


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or folder stays as it is; the embedded name becomes its cached safetensors folder."""
    if name_or_path == EMBEDDED_NAME or name_or_path == "embedded":
        return str(embedded_checkpoint())
    if name_or_path.startswith("embedded:"):
        raise ModelError(f"unknown embedded model '{name_or_path}' (have: {EMBEDDED_NAME})")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise ModelError(f"{name_or_path}: no such model folder or run directory "
                         "(a hub model is named like 'llm-jp/llm-jp-3-13b')")
    return name_or_path


def load_tokenizer(config: ModelConfig):
    """The tokenizer, with a pad token set (EOS is reused for padding only if there is none)."""
    from transformers import AutoTokenizer

    source = resolve_model_path(config.tokenizer or config.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of '{source}': {exc}") from exc
    if tokenizer.pad_token_id is None:
        # Safe because labels are built by masking, not from pad ids: the final EOS keeps its label.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
