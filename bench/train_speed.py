"""Training throughput and memory: the course sample's stack (TRL SFTTrainer) vs tunebench.

Model: random-initialised llm-jp-3-13b shape (see train_gpu.py), 4-bit NF4 QLoRA, r 16 on all linear
layers, lr 2e-4, warmup 10, gradient checkpointing, sdpa, bf16. Data: megagon rendered with the
course template, tokenised once by tunebench's data stage (ids folded into the 13B vocabulary) and
fed to both sides as the same token ids; the baseline gets them as a pre-tokenised dataset with a
completion mask, so both compute the loss on answer tokens only and the losses compare.

  baseline   TRL SFTTrainer, default collator, no packing, batch 2 × grad-accum 4
  tunebench  `tunebench.train.sft.train` with the given --set overrides

Reported: median real (non-pad) tokens/s over steps after the first two, peak allocated GPU memory,
loss at the last step, and MFU = 6 × parameters × tokens/s against a bf16 matmul measured in the same call.

    python bench/train_speed.py --variant baseline --steps 20
    python bench/train_speed.py --variant tunebench --steps 20 [--set data.packing=true ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_gpu import LLMJP_13B, TOKENIZER, build_random_13b, run_case  # noqa: E402

MODEL = Path("/tmp/llmjp13b")


def matmul_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def prepared_rows(seq: int) -> list[dict]:
    """The tunebench-prepared, vocabulary-folded rows (run a tunebench variant first, or prepare here)."""
    from tunebench.config import load_config
    from tunebench.data.prepare import prepare, read_rows
    from tunebench.models.tokenizer import load_tokenizer
    from tunebench.runs import RunDir

    config = load_config("configs/llm-jp-3-13b-qlora.yaml", [
        f"data.max_seq_length={seq}", "data.sources=[{path: 'builtin:ja-instruct-megagon'}]",
        f"model.tokenizer={TOKENIZER}"])
    run = RunDir(Path("/tmp/bench-speed-data"))
    prepare(config, run, load_tokenizer(config.model), "gemma")
    vocab = LLMJP_13B["vocab_size"]
    return [{"input_ids": [i % vocab for i in r["input_ids"]],
             "completion_mask": [int(label != -100) for label in r["labels"]]} for r in read_rows(run.data_dir / "train.jsonl")]


def run_baseline(steps: int, seq: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunebench.config import ModelConfig
    from tunebench.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=TOKENIZER))
    dataset = Dataset.from_list(prepared_rows(seq))
    model = AutoModelForCausalLM.from_pretrained(
        MODEL, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    args = SFTConfig(output_dir="/tmp/bench-trl", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                     max_steps=steps, learning_rate=2e-4, warmup_steps=10, logging_steps=1, bf16=True,
                     gradient_checkpointing=True, max_length=seq, packing=False, report_to="none",
                     save_strategy="no", seed=42, dataloader_num_workers=0, completion_only_loss=True)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    tokens: list[int] = []
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch
                      else int((batch["input_ids"] != tokenizer.pad_token_id).sum()))
        return batch

    trainer.data_collator = counting
    stamps: list[tuple[float, int]] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            stamps.append((time.perf_counter(), sum(tokens)))

    trainer.add_callback(Timer())
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    trainer.train()
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(stamps, stamps[1:])][2:]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"variant": "baseline (TRL SFTTrainer)", "steps": steps, "tokens_per_s": statistics.median(rates),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss_last": losses[-1],
            "wall_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["baseline", "tunebench"], required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    build_random_13b(MODEL)
    peak = matmul_peak_tflops()
    if args.variant == "baseline":
        result = run_baseline(args.steps, args.seq)
    else:
        r = run_case("llmjp13b-qlora", args.steps, args.seq, Path("/tmp/bench-speed"), args.extra)
        result = {"variant": "tunebench " + (" ".join(args.extra) or "default"), "steps": r["steps"],
                  "tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"], "loss_last": r["loss_last"],
                  "wall_s": r["wall_s"]}
    params = 13.7e9  # llm-jp-3-13b: 13.7 B parameters
    result.update(seq=args.seq, matmul_tflops=peak, mfu=6 * params * result["tokens_per_s"] / (peak * 1e12))
    print(json.dumps(result), flush=True)
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 matmul {peak:.0f} TFLOP/s")
    print(f"{'variant':<44}{'seq':>5}{'tok/s':>9}{'peak GiB':>10}{'loss':>8}{'MFU':>7}")
    print(f"{result['variant'][:43]:<44}{args.seq:>5}{result['tokens_per_s']:>9.0f}{result['peak_gib']:>10.1f}"
          f"{result['loss_last']:>8.3f}{result['mfu']:>7.1%}")


if __name__ == "__main__":
    main()
