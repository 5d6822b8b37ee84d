"""Load what a run produced — base + adapter, a full or merged model, or a plain model — for inference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunebench.config import ModelConfig
from tunebench.data.templates import TEMPLATE_NAMES
from tunebench.errors import ConfigError
from tunebench.models.load import load_base_model, pick_device
from tunebench.models.tokenizer import load_tokenizer, resolve_model_path
from tunebench.runs import ADAPTER, FULL_MODEL, MERGED, TRAINED_META


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    template: str | None  # the template the run trained with; None for a plain model
    name: str


def find_trained(path: Path) -> Path | None:
    """A run folder, or an adapter/model folder, to the folder holding tunebench.json."""
    for candidate in (path, path / ADAPTER, path / FULL_MODEL, path / MERGED):
        if (candidate / TRAINED_META).exists():
            return candidate
    return None


def pick_template(loaded_template: str | None, requested: str | None, tokenizer) -> str:
    """A run's own template wins; a plain model needs one named, or has a chat template to use."""
    if loaded_template is not None:
        if requested and requested != loaded_template:
            raise ConfigError(f"this run was trained with template '{loaded_template}'; generating with "
                              f"'{requested}' would not match training (drop --template)")
        return loaded_template
    if requested:
        return requested
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    raise ConfigError(f"a plain model needs --template ({', '.join(TEMPLATE_NAMES)}): it has no chat template")


def load_for_inference(target: str, dtype: torch.dtype | None = None, model_config: ModelConfig | None = None
                       ) -> LoadedModel:
    """Load a run (base + adapter, or full/merged model) or a plain model id/folder, in eval mode."""
    device = pick_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    trained = find_trained(Path(target))
    # the decode loop's Triton kernels load in the background while the weights do (a small Gemma 3 on a GPU)
    from tunebench.generate import decode_warmup

    if trained is None:
        config = model_config or ModelConfig(name_or_path=target)
        decode_warmup.start(resolve_model_path(config.name_or_path), dtype, device)
        model = load_base_model(config, dtype, device=device).eval()
        return LoadedModel(model, load_tokenizer(config), None, target)
    meta = json.loads((trained / TRAINED_META).read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(trained)))
    adapter = (trained / "adapter_config.json").exists()
    decode_warmup.start(resolve_model_path(meta["base_model"]) if adapter else str(trained), dtype, device)
    if adapter:
        from peft import PeftModel

        base = load_base_model(ModelConfig(name_or_path=meta["base_model"]), dtype, device=device)
        model = PeftModel.from_pretrained(base, str(trained)).to(device)
    else:
        model = load_base_model(ModelConfig(name_or_path=str(trained)), dtype, device=device)
    return LoadedModel(model.eval(), tokenizer, meta.get("template"), str(trained))

