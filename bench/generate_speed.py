"""Answer all 100 ELYZA-tasks-100-TV tasks: tunebench's batched path vs the course sample's loop.

Both use the same model (Gemma 3 270M + a LoRA adapter from a tunebench run), the same prompt
and max_new_tokens 512, repetition_penalty 1.2, greedy. The course loop is HF `generate` on one
prompt at a time with no stop strings; it runs on the first --baseline-tasks tasks (the whole 100
would take longer than one device call) and is compared per task and per generated token.

    python bench/generate_speed.py --run /tmp/bench-runs/gemma-lora-512 --tasks .gpu/tv.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunebench.config import GenerateConfig  # noqa: E402
from tunebench.data.templates import render_prompt  # noqa: E402
from tunebench.generate.answers import generate_answers  # noqa: E402
from tunebench.models.trained import load_for_inference  # noqa: E402
from tunebench.tasksets import load_tasks  # noqa: E402


def course_loop(run: str, tasks, max_new_tokens: int) -> dict:
    """The course sample: tokenizer(prompt) → model.generate, one task at a time."""
    loaded = load_for_inference(run)
    model, tok = loaded.model, loaded.tokenizer
    new_tokens, outputs = 0, []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for task in tasks:
        inputs = tok(render_prompt(task.input, "course"), return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2,
                                 pad_token_id=tok.pad_token_id)
        generated = out[0, inputs["input_ids"].shape[1]:]
        new_tokens += len(generated)
        outputs.append(tok.decode(generated, skip_special_tokens=True))
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"path": "course loop (1 at a time)", "tasks": len(tasks), "wall_s": wall, "new_tokens": new_tokens,
            "sample": outputs[0][:120]}


def tunebench_path(run: str, tasks_file: str, n: int, config: GenerateConfig, label: str) -> dict:
    out = Path(f"/tmp/gen-{label.split()[-1].strip('()')}.jsonl")
    out.unlink(missing_ok=True)
    torch.cuda.synchronize()
    result = generate_answers(run, tasks_file, out, config)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {"path": label, "tasks": n, "wall_s": result.seconds, "new_tokens": result.new_tokens,
            "hit_max": result.hit_max_tokens, "sample": rows[0]["output"][:120]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--baseline-tasks", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[16])
    args = parser.parse_args()
    tasks = load_tasks(args.tasks)
    base = GenerateConfig(max_new_tokens=args.max_new_tokens, repetition_penalty=1.2)
    results = [tunebench_path(args.run, args.tasks, len(tasks), base, "tunebench default (auto batch)")]
    for size in args.batch_sizes:
        fixed = dataclasses.replace(base, batch_size=size)
        results.append(tunebench_path(args.run, args.tasks, len(tasks), fixed, f"tunebench batch {size}"))
    results.append(course_loop(args.run, tasks[: args.baseline_tasks], args.max_new_tokens))
    for r in results:
        print(json.dumps(r, ensure_ascii=False), flush=True)
    course = results[-1]
    per_task = course["wall_s"] / course["tasks"]
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  max_new_tokens {args.max_new_tokens}")
    print(f"{'path':<28}{'tasks':>6}{'wall s':>9}{'new tok':>9}{'tok/s':>9}{'s/task':>8}{'speed-up/task':>15}")
    for r in results:
        s_task = r["wall_s"] / r["tasks"]
        print(f"{r['path']:<28}{r['tasks']:>6}{r['wall_s']:>9.1f}{r['new_tokens']:>9}{r['new_tokens'] / r['wall_s']:>9.0f}"
              f"{s_task:>8.2f}{per_task / s_task:>14.1f}x")


if __name__ == "__main__":
    main()
