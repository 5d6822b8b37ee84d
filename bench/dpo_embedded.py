"""Issue 14's result on the embedded model: SFT on megagon, pairs from the SFT model's own answers
(--mode reference), DPO from the SFT run, then both runs' answers to ELYZA-tasks-100.

Every stage runs through the `tunebench` CLI, as a user would. Written to OUT (default $OUT or
docs/results/dpo): sft.jsonl and dpo.jsonl (the answers: 512 new tokens, greedy, repetition_penalty
1.2), summary.json (per run: reference NLL, mean answer length in characters and in new tokens,
share of answers that hit max_new_tokens; the pairs' counts; both runs' last training metrics) and
the CLI logs.

    python bench/dpo_embedded.py                    # the GPU run (a few minutes on an H100)
    python bench/dpo_embedded.py --smoke            # every stage at toy size (CPU: a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "src" / "tunebench" / "presets"

# SFT: the course settings (batch 2 × accum 4, lr 2e-4, warmup 10) on megagon, LoRA, 3 epochs.
SFT = ["train.method=lora", "train.max_steps=null", "train.num_train_epochs=3", "train.per_device_train_batch_size=2",
       "train.gradient_accumulation_steps=4", "train.learning_rate=2e-4", "train.warmup_steps=10",
       "train.logging_steps=10", "train.save_steps=100000", "data.max_seq_length=512"]
# DPO: one epoch over the pairs from the SFT run, the SFT model as the reference.
DPO = ["train.method=lora", "train.objective=dpo", "train.max_steps=null", "train.num_train_epochs=1",
       "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=4", "train.learning_rate=5e-5",
       "train.warmup_steps=10", "train.logging_steps=10", "train.save_steps=100000", "data.max_seq_length=1024"]
ANSWERS = ["generate.max_new_tokens=512", "generate.do_sample=false", "generate.repetition_penalty=1.2",
           "generate.batch_size=null", "generate.tasks=elyza-tasks-100"]
SMOKE = ["train.max_steps=2", "generate.limit=3", "generate.max_new_tokens=8", "generate.batch_size=4"]


def tunebench(args: list[str], log: Path) -> str:
    """Run one CLI command, tee its output into log, stop the script if it fails."""
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "tunebench.cli", *args], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    log.write_text(result.stdout + result.stderr, encoding="utf-8")
    print(f"[{time.time() - start:6.0f}s] tunebench {' '.join(args[:2])}: exit {result.returncode}", flush=True)
    if result.returncode:
        print((result.stdout + result.stderr)[-3000:])
        sys.exit(result.returncode)
    return result.stdout


def sets(overrides: list[str]) -> list[str]:
    return [f"--set={o}" for o in overrides]


def answer_stats(run: Path, answers: Path, out: Path, extra: list[str], name: str) -> dict:
    stdout = tunebench(["generate", str(run), "--tasks", "elyza-tasks-100", "--out", str(answers), *sets(extra)],
                       out / f"{name}-generate.log")
    hit = re.search(r"(\d+) hit max_new_tokens", stdout)
    limit = ["--limit", "3"] if "generate.limit=3" in extra else []
    nll = tunebench(["eval", "nll", str(run), "--tasks", "elyza-tasks-100", *limit], out / f"{name}-nll.log")
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run / "adapter"))
    tokens = [len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in rows]
    return {"answers": str(answers.name), "n": len(rows),
            "reference_nll": json.loads(nll.strip().splitlines()[-1])["nll"],
            "mean_answer_chars": sum(len(r["output"]) for r in rows) / len(rows),
            "mean_answer_tokens": sum(tokens) / len(tokens),
            "hit_max_new_tokens": int(hit.group(1)) if hit else None,
            "hit_max_new_tokens_share": int(hit.group(1)) / len(rows) if hit else None}


def last_metrics(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {k: v for k, v in lines[-1].items() if isinstance(v, (int, float))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "docs" / "results" / "dpo")))
    parser.add_argument("--work", default="/tmp/dpo-embedded", help="run folders")
    parser.add_argument("--smoke", action="store_true", help="every stage at toy size")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    smoke = SMOKE if args.smoke else []
    sft, dpo, pairs = work / "sft", work / "dpo", work / "pairs.jsonl"
    # A stage whose result exists is skipped, so a run cut by a time limit continues where it stopped.
    if not (sft / "adapter" / "tunebench.json").exists():
        tunebench(["train", str(PRESETS / "quickstart.yaml"), "--run-dir", str(sft), "--set=name=sft",
                   *sets(SFT + ANSWERS + smoke)], out / "sft-train.log")
    limit = ["--limit", "6"] if args.smoke else []
    if not Path(f"{pairs}.summary.json").exists():
        # megagon's answers are short (~128 characters): 256 new tokens is room enough for the rejected side
        tunebench(["pairs", "make", str(sft), "--prompts", "builtin:ja-instruct-megagon", "--out", str(pairs),
                   "--mode", "reference", *limit,
                   *sets(["generate.max_new_tokens=256", "generate.batch_size=null", *smoke])], out / "pairs.log")
    if not (dpo / "adapter" / "tunebench.json").exists():
        tunebench(["train", str(PRESETS / "quickstart-dpo.yaml"), "--run-dir", str(dpo), "--set=name=dpo",
                   f"--set=train.init_from={sft}", f"--set=data.sources=[{{path: '{pairs}'}}]",
                   *sets(DPO + ANSWERS + smoke)], out / "dpo-train.log")
    summary = {"sft": answer_stats(sft, out / "sft.jsonl", out, smoke, "sft"),
               "dpo": answer_stats(dpo, out / "dpo.jsonl", out, smoke, "dpo"),
               "pairs": json.loads(Path(f"{pairs}.summary.json").read_text()),
               "sft_last_metrics": last_metrics(sft), "dpo_last_metrics": last_metrics(dpo),
               "settings": {"sft": SFT, "dpo": DPO, "answers": ANSWERS, "smoke": smoke}}
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("sft", "dpo")}, indent=2))


if __name__ == "__main__":
    main()
