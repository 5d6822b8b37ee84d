"""DPO throughput and memory: TRL's DPOTrainer as a course participant runs it vs tunebench DPO.

Same pairs on both sides: megagon prompts rendered with the course template, chosen = the
record's answer, rejected = the answer of another record (a fixed derangement, seed 0). Both
start from the base model with a fresh LoRA adapter (r 16, all linear layers) whose disabled
state is the reference, lr 5e-6, beta 0.1, dropout off (TRL disables dropout by default, so
tunebench runs with train.lora_dropout=0), gradient checkpointing, sdpa, bf16.

  baseline   TRL DPOTrainer (trl 1.16), default collator (padded), batch 2 × grad-accum 4, peft_config,
             QLoRA via BitsAndBytesConfig for --method qlora
  tunebench  `tunebench.train.sft.train` with train.objective=dpo, same batch (step_tokens joins pairs)

Models: (a) the random-initialised llm-jp-3-13b shape of train_gpu.py (ids folded into its 99,487-token
vocabulary on both sides; TRL gets a tokenizer whose output ids are folded the same way), QLoRA;
(b) the real Gemma 3 270M (embedded model), LoRA. Reported: median real (non-pad) tokens/s over
steps after the first two, peak allocated GPU memory from the start of training, first-step loss
(log 2 on both sides when the policy starts as the reference), last loss.

    python bench/dpo_speed.py --variant baseline --model llmjp13b --method qlora --steps 20
    python bench/dpo_speed.py --variant tunebench --model llmjp13b --method qlora --steps 20
    python bench/dpo_speed.py --variant baseline --model gemma --method lora --steps 20
    python bench/dpo_speed.py --variant tunebench --model gemma --method lora --steps 20
    python bench/dpo_speed.py --table /tmp/dpo_speed.jsonl       # ratios to the baseline
    python bench/dpo_speed.py --cpu-smoke                         # tunebench side on a tiny model, CPU
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_gpu import LLMJP_13B, TOKENIZER, build_random_13b, metrics_summary, step_records  # noqa: E402
from train_speed import load_baseline_model, speed_arguments, time_trainer  # noqa: E402

MODEL = Path("/tmp/llmjp13b")
PAIRS = Path("/tmp/bench-dpo/pairs.jsonl")
LR, BETA = 5e-6, 0.1


def write_pairs(path: Path, limit: int | None = None) -> Path:
    """Megagon as pairs: chosen = its answer, rejected = another record's answer (fixed derangement)."""
    from tunebench.data.readers import read_source

    examples = read_source("builtin:ja-instruct-megagon").examples[:limit]
    shift = random.Random(0).randrange(1, len(examples))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i, example in enumerate(examples):
            other = examples[(i + shift) % len(examples)]
            row = {"prompt": example.messages[0]["content"], "chosen": example.messages[-1]["content"],
                   "rejected": other.messages[-1]["content"]}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def folding(tokenizer, vocab: int):
    """The tokenizer with every output id taken modulo `vocab` (how the 13B shape's ids are made)."""
    base = type(tokenizer)

    def call(self, *args, **kwargs):
        out = base.__call__(self, *args, **kwargs)
        ids = out["input_ids"]
        out["input_ids"] = [[i % vocab for i in row] for row in ids] if ids and isinstance(ids[0], list) \
            else [i % vocab for i in ids]
        return out

    tokenizer.__class__ = type(f"Folded{base.__name__}", (base,), {"__call__": call})
    return tokenizer


def run_baseline(model_name: str, method: str, steps: int, seq: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from tunebench.config import ModelConfig
    from tunebench.data.templates import render_prompt
    from tunebench.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=TOKENIZER))
    if model_name == "llmjp13b":
        tokenizer = folding(tokenizer, LLMJP_13B["vocab_size"])
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
    dataset = Dataset.from_list([{"prompt": render_prompt(r["prompt"], "course"), "chosen": r["chosen"],
                                  "rejected": r["rejected"]} for r in rows])
    model = load_baseline_model(model_name, method)
    args = DPOConfig(output_dir="/tmp/bench-trl-dpo", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                     max_steps=steps, learning_rate=LR, beta=BETA, warmup_steps=10, logging_steps=1, bf16=True,
                     gradient_checkpointing=True, max_length=seq, report_to="none", save_strategy="no", seed=42,
                     dataloader_num_workers=0)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    timed = time_trainer(trainer, lambda batch: int(batch["attention_mask"].sum()))
    logged = timed.pop("logged")
    return {"variant": "baseline (TRL DPOTrainer)", "steps": steps, **timed, "loss_first": logged[0]["loss"],
            "loss_last": logged[-1]["loss"]}


def run_tunebench(model: str, method: str, steps: int, seq: int, out: Path, extra: list[str] = ()) -> dict:
    from tunebench.config import load_config
    from tunebench.data.prepare import prepare_pairs
    from tunebench.models.tokenizer import load_tokenizer
    from tunebench.runs import RunDir
    from tunebench.train.sft import train

    overrides = [f"train.method={method}", "train.objective=dpo", f"train.dpo_beta={BETA}", f"train.max_steps={steps}",
                 "train.logging_steps=1", "train.save_steps=100000", f"data.max_seq_length={seq}",
                 "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=4", "train.warmup_steps=10",
                 f"train.learning_rate={LR}", "train.lora_dropout=0.0", "data.template=course",
                 "data.contamination_sets=[]", f"data.sources=[{{path: '{PAIRS}'}}]"]
    if model == "gemma":
        overrides += ["model.name_or_path=embedded:gemma-3-270m"]
    elif model == "llmjp13b":
        overrides += [f"model.name_or_path={MODEL}", f"model.tokenizer={TOKENIZER}"]
    else:
        overrides += [f"model.name_or_path={model}"]
    config = load_config(None, overrides + list(extra))
    run = RunDir(out / f"{Path(model).name}-{method}-{seq}{''.join('+' + e.split('.')[-1] for e in extra)}")
    if model == "llmjp13b":  # fold ids into the 13B vocabulary; train() then reuses these rows
        prepare_pairs(config, run, load_tokenizer(config.model), config.model.tokenizer)
        path = run.data_dir / "train.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        vocab = LLMJP_13B["vocab_size"]
        with path.open("w") as handle:
            for row in rows:
                for side in ("chosen", "rejected"):
                    row[side]["input_ids"] = [i % vocab for i in row[side]["input_ids"]]
                    row[side]["labels"] = [i if i == -100 else i % vocab for i in row[side]["labels"]]
                handle.write(json.dumps(row) + "\n")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    train(config, run)
    wall = time.time() - start
    logged = step_records(run)
    summary = metrics_summary(logged)
    return {"variant": "tunebench " + (" ".join(e.split(".")[-1] for e in extra) or "default"), "steps": steps,
            "tokens_per_s": summary["tokens_per_s"], "peak_gib": summary["peak_gib"],
            "loss_first": summary["loss_first"], "loss_last": logged[-1]["loss"],
            "reward_accuracy_last": logged[-1]["reward_accuracy"], "wall_s": wall}


def cpu_smoke() -> None:
    """The tunebench side end to end on a tiny random Llama with Gemma's vocabulary, on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunebench.config import ModelConfig
    from tunebench.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path="embedded:gemma-3-270m"))
    path = Path("/tmp/bench-dpo/tiny")
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True)).save_pretrained(path)
        tokenizer.save_pretrained(path)
    write_pairs(PAIRS, limit=32)
    result = run_tunebench(str(path), "lora", 4, 256, Path("/tmp/bench-dpo/runs"), ["train.precision=fp32"])
    print(json.dumps(result), flush=True)
    assert abs(result["loss_first"] - 0.6931) < 1e-3, result  # the policy starts as the reference: log 2


def print_table(path: Path) -> None:
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    base = {(r["model"], r["method"], r["seq"]): r for r in results if r["variant"].startswith("baseline")}
    print(f"{'model':<9}{'method':<7}{'seq':>5}  {'variant':<30}{'tok/s':>8}{'×':>6}{'GiB':>7}{'×':>6}"
          f"{'loss 1st':>10}{'Δrel':>9}{'last':>8}")
    for r in results:
        b = base.get((r["model"], r["method"], r["seq"]))
        speed = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        memory = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b else "-"
        delta = f"{abs(r['loss_first'] - b['loss_first']) / b['loss_first']:.1e}" if b else "-"
        print(f"{r['model']:<9}{r['method']:<7}{r['seq']:>5}  {r['variant'][:29]:<30}{r['tokens_per_s']:>8.0f}"
              f"{speed:>6}{r['peak_gib']:>7.2f}{memory:>6}{r['loss_first']:>10.4f}{delta:>9}{r['loss_last']:>8.4f}")


def main() -> None:
    parser = speed_arguments(seq=1024, results=Path("/tmp/dpo_speed.jsonl"))
    parser.add_argument("--cpu-smoke", action="store_true", help="tunebench side on a tiny model on CPU, then stop")
    args = parser.parse_args()
    if args.cpu_smoke:
        return cpu_smoke()
    if args.table:
        return print_table(args.table)
    if args.model == "llmjp13b":
        build_random_13b(MODEL)
    if not PAIRS.exists():
        write_pairs(PAIRS)
    if args.variant == "baseline":
        result = run_baseline(args.model, args.method, args.steps, args.seq)
    else:
        result = run_tunebench(args.model, args.method, args.steps, args.seq, Path("/tmp/bench-dpo/runs"), args.extra)
    result.update(model=args.model, method=args.method, seq=args.seq, device=torch.cuda.get_device_name(),
                  date=time.strftime("%Y-%m-%d"))
    with args.results.open("a") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
