"""tunebench training on the GPU: real Gemma 3 270M and a random llm-jp-3-13b-shaped model.

Runs `tunebench.train.sft.train` exactly as the CLI does and reads its metrics: median real
(non-pad) tokens/s over the steps after the first two (warm-up), peak GPU memory, last loss.

The 13B case is random-initialised (speed and memory do not depend on the weights' values). It
is tokenised with Gemma's tokenizer and its ids folded into llm-jp-3's 99,487-token vocabulary:
lengths, which is all speed and memory depend on, are real megagon lengths.

    python bench/train_gpu.py --cases gemma-qlora,gemma-lora,llmjp13b-qlora --steps 30
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunebench.config import load_config  # noqa: E402
from tunebench.data.prepare import prepare  # noqa: E402
from tunebench.models.tokenizer import load_tokenizer  # noqa: E402
from tunebench.runs import RunDir  # noqa: E402
from tunebench.train.sft import train  # noqa: E402

# Every process a multi-GPU benchmark starts: NVLink multicast off (the device notes' three variables).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# The tokenizer the 13B case borrows (a folder with tokenizer files works where the model is absent).
TOKENIZER = os.environ.get("BENCH_TOKENIZER", "embedded:gemma-3-270m")
LLMJP_13B = dict(vocab_size=99487, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40, intermediate_size=13824, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)


# Gemma 3 270M's architecture (the embedded model's config.json), for random-initialised speed runs
# that need no GGUF on the machine.
GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                   max_position_embeddings=32768, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=2,
                   eos_token_id=1, pad_token_id=0,
                   layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)


def build_random_13b(path: Path) -> None:
    build_random(path, LLMJP_13B)


def build_random(path: Path, shape: dict, device: str = "cuda") -> None:
    """A random Llama of `shape` (LlamaConfig arguments): the llm-jp-3 shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_random_model(path, LlamaForCausalLM, LlamaConfig(**shape), device)


def build_random_gemma(path: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    build_random_model(path, Gemma3ForCausalLM, Gemma3TextConfig(**GEMMA3_270M))


def build_random_model(path: Path, model_class, config, device: str = "cuda") -> None:
    """A random model of a real architecture in bf16, built on the GPU and saved once per machine.

    Every weight is drawn explicitly (seeded normal, std 0.02; norms 1, or 0 for Gemma's
    (1 + weight) norms) and checked finite before saving, so the benchmark never depends on how a
    transformers version initialises a model constructed under a device context.
    """
    if (path / "config.json").exists():
        return
    start = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = model_class(config)
    torch.set_default_dtype(torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    norm_value = 0.0 if config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.fill_(norm_value)
            if not torch.isfinite(param).all():
                raise RuntimeError(f"non-finite values in {name}")
    model.save_pretrained(path, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"built random {config.model_type} at {path} in {time.time() - start:.0f}s", flush=True)


def case_config(name: str, steps: int, seq: int, extra: list[str] = ()):
    """The config of a case MODEL-METHOD (course settings: batch 2 × accum 4, megagon), its random
    model built first where the case needs one."""
    model, method = name.split("-")
    overrides = [f"train.method={method}", f"train.max_steps={steps}", "train.logging_steps=1",
                 "train.save_steps=100000", f"data.max_seq_length={seq}", "train.per_device_train_batch_size=2",
                 "train.gradient_accumulation_steps=4", "train.warmup_steps=10", "data.template=course",
                 "data.sources=[{path: 'builtin:ja-instruct-megagon'}]"]
    if model == "gemma":
        overrides += ["model.name_or_path=embedded:gemma-3-270m"]
    if model == "gemmarandom":
        build_random_gemma(Path("/tmp/gemma270m-random"))
        overrides += ["model.name_or_path=/tmp/gemma270m-random", f"model.tokenizer={TOKENIZER}"]
    if model == "llmjp13b":
        build_random_13b(Path("/tmp/llmjp13b"))
        overrides += ["model.name_or_path=/tmp/llmjp13b", f"model.tokenizer={TOKENIZER}"]
    return load_config("configs/llm-jp-3-13b-qlora.yaml", overrides + list(extra))


def prepare_case(config, run: RunDir) -> None:
    """The data stage for a case that needs it: the 13B shape's ids folded into its vocabulary."""
    if config.model.name_or_path == "/tmp/llmjp13b":
        prepare_folded(config, run, LLMJP_13B["vocab_size"])


def prepare_folded(config, run: RunDir, vocab_size: int) -> None:
    """Run the data stage with the borrowed tokenizer and fold its ids into `vocab_size`; a later
    train() (or `tunebench train`) with the same data settings reuses these rows."""
    tokenizer = load_tokenizer(config.model)
    prepare(config, run, tokenizer, config.model.tokenizer or config.model.name_or_path)
    path = run.data_dir / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    with path.open("w") as handle:
        for row in rows:
            row["input_ids"] = [i % vocab_size for i in row["input_ids"]]
            row["labels"] = [i if i == -100 else i % vocab_size for i in row["labels"]]
            handle.write(json.dumps(row) + "\n")


def step_records(run: RunDir) -> list[dict]:
    """The run's metrics.jsonl lines of training steps (eval-only lines left out)."""
    return [m for m in map(json.loads, run.metrics.read_text().splitlines()) if "tokens_per_s" in m]


def metrics_summary(steps: list[dict]) -> dict:
    """Median real tokens/s after the first two steps, peak GPU memory, the first loss, the mean of the
    last five and every loss, from a run's step records."""
    return {"tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps[2:] or steps),
            "peak_gib": max(m.get("peak_memory_gib", 0) for m in steps), "loss_first": steps[0]["loss"],
            "loss_last": statistics.mean(m["loss"] for m in steps[-5:]),
            "losses": [m["loss"] for m in steps],
            "grad_norm_finite": all(math.isfinite(m["grad_norm"]) for m in steps)}


def run_case(name: str, steps: int, seq: int, out: Path, extra: list[str] = ()) -> dict:
    config = case_config(name, steps, seq, extra)
    label = name + "".join(f"+{e.split('.')[-1]}" for e in extra)
    run = RunDir(out / f"{label}-{seq}")
    prepare_case(config, run)
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    train(config, run)
    summary = metrics_summary(step_records(run))
    del summary["losses"]
    return {"case": label, "seq": seq, "steps": steps, **summary, "wall_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="gemma-qlora,gemma-lora,llmjp13b-qlora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--out", default="/tmp/bench-runs")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    results = []
    for name in args.cases.split(","):
        results.append(run_case(name, args.steps, args.seq, Path(args.out), args.extra))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'case':<28}{'seq':>5}{'steps':>6}{'tok/s':>10}{'peak GiB':>10}{'loss 1st→last':>18}{'wall s':>8}")
    for r in results:
        print(f"{r['case']:<28}{r['seq']:>5}{r['steps']:>6}{r['tokens_per_s']:>10.0f}{r['peak_gib']:>10.1f}"
              f"{r['loss_first']:>9.3f}→{r['loss_last']:<8.3f}{r['wall_s']:>8.0f}")


if __name__ == "__main__":
    main()
