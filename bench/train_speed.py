"""Training throughput and memory: the course sample's stack (TRL SFTTrainer) vs tunebench.

Models: (a) random-initialised llm-jp-3-13b shape (see train_gpu.py), 4-bit NF4 QLoRA; (b) the real
Gemma 3 270M (embedded model), LoRA or QLoRA; (c) `gemmarandom`, Gemma 3 270M's architecture with random
weights (the same work per token, no GGUF to carry). r 16 on all linear layers, lr 2e-4, warmup 10,
gradient checkpointing, sdpa, bf16. Data: megagon rendered with the course template, tokenised once
by tunebench's data stage (for (a) ids folded into the 13B vocabulary) and fed to both sides as the
same token ids; the baseline gets them as a pre-tokenised dataset with a completion mask, so both
compute the loss on answer tokens only and the losses compare.

  baseline   TRL SFTTrainer, default collator, no packing, batch 2 × grad-accum 4
  tunebench  `tunebench.train.sft.train` with the given --set overrides

Reported: median real (non-pad) tokens/s over steps after the first two, peak allocated GPU memory,
loss at the last step, and MFU = 6 × parameters × tokens/s against a bf16 matmul measured in the same call.

    python bench/train_speed.py --variant baseline --steps 20 [--model gemma --method lora] [--seq 1024]
    python bench/train_speed.py --variant tunebench --steps 20 [--set train.step_tokens=null ...]
    python bench/train_speed.py --table results.jsonl     # all results so far, with ratios

Each run appends one JSON line to --results (peak memory counts from the start of training, after
the model is loaded, on both sides; "loss_last" is the mean of the last five logged steps).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_gpu import LLMJP_13B, TOKENIZER, build_random_13b, build_random_gemma, run_case  # noqa: E402

MODEL = Path("/tmp/llmjp13b")
GEMMA_RANDOM = Path("/tmp/gemma270m-random")  # train_gpu.py's gemmarandom case


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


PARAMS = {"llmjp13b": 13.7e9, "gemma": 268e6, "gemmarandom": 268e6}  # for MFU: 6 × parameters × tokens/s


def prepared_rows(seq: int, fold: bool = True) -> list[dict]:
    """The tunebench-prepared rows; for the 13B shape with ids folded into its vocabulary."""
    from tunebench.config import load_config
    from tunebench.data.prepare import prepare, read_token_rows
    from tunebench.models.tokenizer import load_tokenizer
    from tunebench.runs import RunDir

    config = load_config("configs/llm-jp-3-13b-qlora.yaml", [
        f"data.max_seq_length={seq}", "data.sources=[{path: 'builtin:ja-instruct-megagon'}]",
        f"model.tokenizer={TOKENIZER}"])
    run = RunDir(Path("/tmp/bench-speed-data"))
    prepare(config, run, load_tokenizer(config.model), "gemma")
    vocab = LLMJP_13B["vocab_size"] if fold else 1 << 62
    return [{"input_ids": [i % vocab for i in r["input_ids"]],
             "completion_mask": [int(label != -100) for label in r["labels"]]} for r in read_token_rows(run.data_dir / "train.jsonl")]


def load_baseline_model(model_name: str, method: str):
    """The course stack's model: bf16, sdpa, on GPU 0; NF4 double-quant 4-bit for qlora."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunebench.models.tokenizer import resolve_model_path

    path = {"llmjp13b": MODEL, "gemmarandom": GEMMA_RANDOM}.get(model_name) or resolve_model_path("embedded:gemma-3-270m")
    quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16) if method == "qlora" else None)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                device_map={"": 0}, quantization_config=quantization)


def time_trainer(trainer, count_tokens) -> dict:
    """Train with a transformers Trainer, counting each batch's real tokens with count_tokens(batch).

    Returns the median real tokens/s over the steps after the first two, the peak GPU memory from the
    start of training, the wall time, and the logged records that hold a loss ("logged")."""
    from transformers import TrainerCallback

    tokens: list[int] = []
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        tokens.append(count_tokens(batch))
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
    return {"tokens_per_s": statistics.median(rates), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "wall_s": time.time() - start, "logged": [h for h in trainer.state.log_history if "loss" in h]}


def run_baseline(model_name: str, method: str, steps: int, seq: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tunebench.config import ModelConfig
    from tunebench.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=TOKENIZER))
    dataset = Dataset.from_list(prepared_rows(seq, fold=model_name == "llmjp13b"))
    model = load_baseline_model(model_name, method)
    args = SFTConfig(output_dir="/tmp/bench-trl", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                     max_steps=steps, learning_rate=2e-4, warmup_steps=10, logging_steps=1, bf16=True,
                     gradient_checkpointing=True, max_length=seq, packing=False, report_to="none",
                     save_strategy="no", seed=42, dataloader_num_workers=0, completion_only_loss=True)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    timed = time_trainer(trainer, lambda batch: int(batch["attention_mask"].sum()) if "attention_mask" in batch
                         else int((batch["input_ids"] != tokenizer.pad_token_id).sum()))
    logged = timed.pop("logged")
    # HF Trainer logs a NaN/inf loss as 0.0 (logging_nan_inf_filter); the grad norm still shows it.
    return {"variant": "baseline (TRL SFTTrainer)", "steps": steps, **timed,
            "loss_last": statistics.mean(h["loss"] for h in logged[-5:]), "loss_first": logged[0]["loss"],
            "grad_norm_finite": all(math.isfinite(h.get("grad_norm", 0.0)) for h in logged)}


def print_table(path: Path) -> None:
    """Every result in the file, with throughput and memory as ratios to the baseline of its case."""
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    base = {(r["model"], r["method"], r["seq"]): r for r in results if r["variant"].startswith("baseline")}
    print(f"{'model':<9}{'method':<7}{'seq':>5}  {'variant':<42}{'tok/s':>7}{'×':>6}{'GiB':>6}{'×':>6}"
          f"{'loss 1st→last':>16}{'Δloss':>7}{'MFU':>6}{'finite':>7}")
    for r in results:
        b = base.get((r["model"], r["method"], r["seq"]))
        speed = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        memory = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b else "-"
        delta = f"{(r['loss_last'] - b['loss_last']) / b['loss_last']:+.1%}" if b and b["loss_last"] else "-"
        print(f"{r['model']:<9}{r['method']:<7}{r['seq']:>5}  {r['variant'][:41]:<42}{r['tokens_per_s']:>7.0f}"
              f"{speed:>6}{r['peak_gib']:>6.1f}{memory:>6}{r['loss_first']:>8.3f}→{r['loss_last']:<7.3f}"
              f"{delta:>7}{r['mfu']:>6.1%}{str(r['grad_norm_finite']):>7}")


def compare_losses(run: Path, other: Path) -> None:
    """Per-step relative loss difference of two runs over the steps both logged (same data, same seed)."""
    def losses(folder: Path) -> dict[int, float]:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    a, b = losses(run), losses(other)
    diffs = [abs(a[s] - b[s]) / abs(b[s]) for s in sorted(a.keys() & b.keys())]
    print(f"{run.name} vs {other.name}: {len(diffs)} steps, loss within {100 * max(diffs):.3f}% "
          f"(mean {100 * statistics.mean(diffs):.3f}%)")


def speed_arguments(seq: int, results: Path) -> argparse.ArgumentParser:
    """The command line of a baseline-vs-tunebench benchmark (this one and dpo_speed.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["baseline", "tunebench"])
    parser.add_argument("--model", choices=["llmjp13b", "gemma", "gemmarandom"], default="llmjp13b",
                        help="gemmarandom: Gemma 3 270M's architecture, random weights (no GGUF needed)")
    parser.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--logit-slab-mib", type=int, default=None,
                        help="tunebench: the output layer's logits block (train/output_layer.py SLAB_ELEMENTS, 16 MiB)")
    parser.add_argument("--tag", default="", help="tunebench: a name for what the environment changed "
                        "(TORCHINDUCTOR_* variables): added to the variant and the run folder")
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument("--table", type=Path, help="print the table of a results file and stop")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("RUN", "OTHER_RUN"),
                        help="print the per-step loss difference of two runs' metrics.jsonl and stop")
    return parser


def main() -> None:
    args = speed_arguments(seq=512, results=Path("/tmp/train_speed.jsonl")).parse_args()
    if args.table:
        print_table(args.table)
        return
    if args.compare:
        compare_losses(*args.compare)
        return
    if args.model == "llmjp13b":
        build_random_13b(MODEL)
    if args.model == "gemmarandom":
        build_random_gemma(GEMMA_RANDOM)
    peak = matmul_peak_tflops()
    if args.variant == "baseline":
        result = run_baseline(args.model, args.method, args.steps, args.seq)
    else:
        out = Path("/tmp/bench-speed")
        if args.logit_slab_mib:
            from tunebench.train import output_layer

            output_layer.SLAB_ELEMENTS = args.logit_slab_mib * 2**20 // 4  # fp32 elements
            out = out / f"slab{args.logit_slab_mib}"
        if args.tag:
            out = out / args.tag
        r = run_case(f"{args.model}-{args.method}", args.steps, args.seq, out, args.extra)
        result = {key: r[key] for key in ("steps", "tokens_per_s", "peak_gib", "loss_first", "loss_last", "wall_s",
                                          "grad_norm_finite")}
        result["variant"] = "tunebench " + (" ".join(e.split(".")[-1] for e in args.extra) or "default") + (
            f" slab={args.logit_slab_mib}MiB" if args.logit_slab_mib else "") + (f" [{args.tag}]" if args.tag else "")
    result.update(model=args.model, method=args.method, seq=args.seq, matmul_tflops=peak,
                  mfu=6 * PARAMS[args.model] * result["tokens_per_s"] / (peak * 1e12),
                  device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"))
    with args.results.open("a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
