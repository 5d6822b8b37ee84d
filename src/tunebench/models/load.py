"""Load a base model for training or inference: hub id, local folder or the embedded model."""

from __future__ import annotations

import importlib.util

import torch

from tunebench.config import ModelConfig
from tunebench.errors import ModelError
from tunebench.models.tokenizer import resolve_model_path


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(precision: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """bf16 where the GPU supports it, fp32 otherwise (CPU bf16 matmuls are slow and lossy)."""
    device = device or pick_device()
    if precision == "fp32":
        return torch.float32
    if precision == "fp64":  # CPU checks that two computations agree to rounding (tests); slow on GPUs
        return torch.float64
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not bf16_ok:
        raise ModelError("train.precision is bf16 but this machine has no bf16 GPU; use precision: auto")
    return torch.bfloat16 if bf16_ok else torch.float32


def check_4bit_available() -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU; say what to use instead when they are missing."""
    if not torch.cuda.is_available():
        raise ModelError("train.method qlora (4-bit) needs a CUDA GPU; on this machine use "
                         "--set train.method=lora (same adapters, 16/32-bit base)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("train.method qlora needs bitsandbytes: pip install 'tunebench[qlora]', "
                         "or use --set train.method=lora")


def bnb_4bit_arguments(dtype: torch.dtype, sharded: bool = False) -> dict:
    """BitsAndBytesConfig's arguments for QLoRA: NF4, double quantisation, bf16 compute where the model
    runs in bf16. Sharded (train.sharding fsdp), the packed 4-bit weights are stored in the compute
    dtype instead of uint8: FSDP shards floating-point parameters, and one storage dtype with the other
    frozen weights keeps each decoder layer one all-gather."""
    compute = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    arguments = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                 "bnb_4bit_compute_dtype": compute}
    if sharded:
        arguments["bnb_4bit_quant_storage"] = compute
    return arguments


def load_base_model(config: ModelConfig, dtype: torch.dtype, quantize_4bit: bool = False,
                    device: torch.device | None = None, sharded: bool = False):
    """from_pretrained with the config's revision and trust_remote_code (off unless turned on).
    sharded: the model will be sharded with FSDP (4-bit weights then stored in the compute dtype)."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    kwargs = {"dtype": dtype, "revision": config.revision, "trust_remote_code": config.trust_remote_code,
              "attn_implementation": config.attn_implementation}
    if quantize_4bit:
        check_4bit_available()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**bnb_4bit_arguments(dtype, sharded))
        kwargs["device_map"] = {"": device.index or 0}
    elif sharded and device.type == "cuda":  # straight onto the GPU: N processes, not N fp32 copies in host memory
        kwargs["device_map"] = {"": device.index or 0}
    path = resolve_model_path(config.name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load model '{config.name_or_path}': {exc}") from exc
    if not quantize_4bit:
        model.to(device)
    return model
