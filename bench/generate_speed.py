"""Generation speed (issue 15): the plain decode path against merged adapter, host stop checks and
tunebench's decode loop with each step captured as a CUDA graph, on Gemma 3 270M + a LoRA adapter
from a tunebench run.

Each variant loads the run afresh (merging changes the loaded model in place) and measures, greedy,
repetition_penalty 1.2, the run's dtype (bf16 on a GPU):
- all tasks × up to --max-new-tokens, batched as `tunebench generate` does: wall, new tok/s, how many
  answers differ from the `current` variant's (read from this call or an earlier one's answers file);
  a graphs variant runs twice (cold: the first pass in the process, compiling included; warm);
- then one prompt × --one-prompt-tokens new tokens (EOS held back so every run makes that many): new
  tok/s, first and second call.

    python bench/generate_speed.py --run /tmp/bench-runs/gemma-lora-512 --tasks .gpu/tv.jsonl
    python bench/generate_speed.py --run ... --tasks ... --variants current merged   # split over calls
    python bench/generate_speed.py --cpu-smoke   # a tiny random model + adapter, a few tokens, on CPU

--baseline-tasks N adds the course sample's one-prompt-at-a-time loop on the first N tasks (issue 4).
JSON lines are appended to OUT_DIR/generate_speed.jsonl, answers to OUT_DIR/answers-VARIANT.json
(OUT_DIR: --out-dir, else /tmp/generate-speed, which outlives one device call on a warm machine, so
`current` measured in one call is the reference of the next); both are copied into $OUT when set.
A short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunebench.config import GenerateConfig  # noqa: E402
from tunebench.data.templates import render_prompt  # noqa: E402
from tunebench.generate import decode_attention_kernels  # noqa: E402
from tunebench.generate.engine import Generator  # noqa: E402
from tunebench.generate.graph_decode import GraphDecode  # noqa: E402
from tunebench.generate.stops import STOP_CHECK_EVERY  # noqa: E402
from tunebench.models.trained import load_for_inference, pick_template  # noqa: E402
from tunebench.tasksets import load_tasks  # noqa: E402


@dataclass(frozen=True)
class Variant:
    merge_adapter: bool
    cuda_graphs: bool
    stop_check_every: int | None  # None: transformers' per-token stop_strings (the path before issue 15)
    compile: bool = False  # generate.compile: the loop's decoder layers torch.compile'd
    grouped_attention: bool = True  # the loop's own attention for the new token (decode_attention.py)
    compaction: bool = True  # the loop drops finished rows
    fused_norms: bool = True  # uncompiled loop: RMSNorms through F.rms_norm (decode_norms.py)
    step_inputs: bool = True  # the loop's own masks, cache writes and rotary table (decode_masks.py, decode_rotary.py)
    fused_layers: bool = True  # Gemma 3's one-token attention and MLP in fewer kernels (decode_fused_layers.py)
    layer_kernel: bool = True  # ... and its layer's norms and adds as norm_add_norm (decode_kernels.py: Triton)
    attention_kernels: bool = True  # ... and its attention after the projection in Triton (decode_attention_kernels.py)


VARIANTS = {
    "current": Variant(merge_adapter=False, cuda_graphs=False, stop_check_every=None),
    "merged": Variant(merge_adapter=True, cuda_graphs=False, stop_check_every=None),
    "merged+stops": Variant(merge_adapter=True, cuda_graphs=False, stop_check_every=STOP_CHECK_EVERY),
    "merged+stops+graphs": Variant(merge_adapter=True, cuda_graphs=True, stop_check_every=STOP_CHECK_EVERY),
    # ^ the GPU default for shorter jobs (norms fused, layers not compiled)
    "merged+stops+graphs+compile": Variant(merge_adapter=True, cuda_graphs=True, stop_check_every=STOP_CHECK_EVERY,
                                           compile=True),  # the GPU default for jobs of 2,000 prompts or more
    # levers of the loop, one off at a time (compiled)
    "graphs-sdpa": Variant(merge_adapter=True, cuda_graphs=True, stop_check_every=STOP_CHECK_EVERY, compile=True,
                           grouped_attention=False),
    "graphs-whole-batch": Variant(merge_adapter=True, cuda_graphs=True, stop_check_every=STOP_CHECK_EVERY,
                                  compile=True, compaction=False),
    # the uncompiled loop with the model's RMSNorms as written (merged+stops+graphs before decode_norms.py)
    "graphs-unfused-norms": Variant(merge_adapter=True, cuda_graphs=True, stop_check_every=STOP_CHECK_EVERY,
                                    fused_norms=False),
    # the uncompiled loop as it was before its own masks, cache writes and rotary table (norms fused)
    "graphs-hf-step-inputs": Variant(merge_adapter=True, cuda_graphs=True, stop_check_every=STOP_CHECK_EVERY,
                                     step_inputs=False, fused_layers=False),
    # the uncompiled loop with Gemma's attention and MLP fused, its layer's norms and adds as written
    "graphs-no-layer-kernel": Variant(merge_adapter=True, cuda_graphs=True, stop_check_every=STOP_CHECK_EVERY,
                                      layer_kernel=False),
    # the uncompiled loop with Gemma's attention after its projection in torch operations (the default before
    # decode_attention_kernels.py)
    "graphs-no-attention-kernels": Variant(merge_adapter=True, cuda_graphs=True, stop_check_every=STOP_CHECK_EVERY,
                                           attention_kernels=False),
    # the uncompiled loop with its own step inputs, Gemma's layers as written (norms fused)
    "graphs-unfused-layers": Variant(merge_adapter=True, cuda_graphs=True, stop_check_every=STOP_CHECK_EVERY,
                                     fused_layers=False),
}


WORTH_COMPACTING = GraphDecode.worth_compacting
USABLE = decode_attention_kernels.usable


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def set_levers(variant: Variant) -> None:
    """Turns the decode loop's levers on or off for this process (bench only)."""
    from contextlib import nullcontext

    from tunebench.generate import (
        decode_attention,
        decode_attention_kernels,
        decode_fused_layers,
        decode_masks,
        decode_norms,
        decode_rotary,
        graph_decode,
    )

    graph_decode.decode_attention = decode_attention.decode_attention if variant.grouped_attention else \
        (lambda model: nullcontext())
    graph_decode.GraphDecode.worth_compacting = WORTH_COMPACTING if variant.compaction else (lambda self: False)
    graph_decode.fused_norms = decode_norms.fused_norms if variant.fused_norms else (lambda model: nullcontext())
    graph_decode.fused_layers = decode_fused_layers.fused_layers if variant.fused_layers else \
        (lambda model: nullcontext())
    decode_fused_layers.LAYER = "Gemma3DecoderLayer" if variant.layer_kernel else "(layers as written)"
    decode_attention_kernels.usable = USABLE if variant.attention_kernels else (lambda *tensors: False)
    graph_decode.mask_kind = decode_masks.mask_kind if variant.step_inputs else (lambda model: None)
    graph_decode.rotary_tables = decode_rotary.rotary_tables if variant.step_inputs else \
        (lambda model, length, dtype: nullcontext())


def build_generator(run: str, variant: Variant, max_new_tokens: int, batch_size: int | None,
                    fold_ids: int | None = None) -> Generator:
    set_levers(variant)
    loaded = load_for_inference(run)
    config = GenerateConfig(max_new_tokens=max_new_tokens, repetition_penalty=1.2, merge_adapter=variant.merge_adapter,
                            cuda_graphs=variant.cuda_graphs, compile=variant.compile,
                            batch_size=batch_size)
    template = pick_template(loaded.template, None, loaded.tokenizer)
    generator = Generator(loaded.model, loaded.tokenizer, template, config, stop_check_every=variant.stop_check_every)
    if fold_ids:  # a random model of a real shape with a borrowed tokenizer (train_gpu.py's 13B): ids folded in
        encode = generator.encode
        generator.encode = lambda messages: [i % fold_ids for i in encode(messages)]
    return generator


def one_prompt(generator: Generator, tasks, new_tokens: int) -> dict:
    """Decode speed of a single row as `tunebench generate` makes it (stop strings on), EOS held back
    for `new_tokens` tokens (a stop string may still end it sooner: one_new_tokens says): the first task twice,
    then the second (another prompt length: `serve`'s case, where each request has its own)."""
    rates = {}
    for label, task in (("cold", tasks[0]), ("warm", tasks[0]), ("other", tasks[min(1, len(tasks) - 1)])):
        prompt = generator.encode([{"role": "user", "content": task.input}])
        (answer,), wall = timed(lambda prompt=prompt: generator.generate_batch([prompt], new_tokens, min_new_tokens=new_tokens))
        rates[f"one_{label}_tok_s"] = answer.new_tokens / wall
        rates.setdefault("one_new_tokens", answer.new_tokens)
    return rates


def all_tasks(generator: Generator, tasks, repeats: int) -> tuple[dict, list[str]]:
    items = [[{"role": "user", "content": t.input}] for t in tasks]
    result = {}
    for label in ("cold", "warm")[:repeats]:
        answers, wall = timed(lambda: generator.generate(items))
        new_tokens = sum(a.new_tokens for a in answers)
        result.update({f"tasks_{label}_wall_s": wall, f"tasks_{label}_tok_s": new_tokens / wall})
    result.update(tasks=len(tasks), new_tokens=new_tokens, hit_max=sum(not a.stopped for a in answers))
    return result, [a.text for a in answers]


PHASES = {GraphDecode: ("start", "capture", "finished", "compact"), Generator: ("read_answers",)}


def phase_times(generator: Generator, tasks) -> dict:
    """One more pass over the tasks with the decode loop's phases timed, each ended by a sync (so the GPU
    work queued before a phase counts as steps): the prompts' pass (start), capturing, the host's checks
    (finished: stop strings, all done), dropping rows, reading the answers; steps: the rest of the wall."""
    items = [[{"role": "user", "content": t.input}] for t in tasks]
    totals = dict.fromkeys([name for names in PHASES.values() for name in names], 0.0)

    def timing(name, real):
        def timed_phase(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                sync()
                totals[name] += time.perf_counter() - start
        return timed_phase

    reals = {(cls, name): getattr(cls, name) for cls, names in PHASES.items() for name in names}
    for (cls, name), real in reals.items():
        setattr(cls, name, timing(name, real))
    try:
        _, wall = timed(lambda: generator.generate(items))
    finally:
        for (cls, name), real in reals.items():
            setattr(cls, name, real)
    return {"phases_wall_s": wall, **{f"phase_{k}_s": v for k, v in totals.items()},
            "phase_steps_s": wall - sum(totals.values())}


def measure(name: str, args, tasks, out_dir: Path) -> dict:
    variant = VARIANTS[name]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    generator, load_s = timed(lambda: build_generator(args.run, variant, args.max_new_tokens, args.batch_size,
                                                      args.fold_ids))
    first_phases = {}
    if args.first_pass_phases and variant.cuda_graphs:  # where a process's first pass spends its extra time
        first_phases = {f"first_{k}": v for k, v in phase_times(generator, tasks).items()}
    # the tasks first: their cold pass is what one `tunebench generate` does (compiling included)
    summary, texts = all_tasks(generator, tasks, 2 if variant.cuda_graphs else 1)
    summary.update(first_phases)
    row = {"variant": name, **vars(variant), "load_s": load_s, "device": device_name(), **summary,
           **one_prompt(generator, tasks, args.one_prompt_tokens)}
    if args.phases and variant.cuda_graphs:
        row.update(phase_times(generator, tasks))
    if torch.cuda.is_available():
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (out_dir / f"answers-{name}.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    current = out_dir / "answers-current.json"
    if current.exists():
        reference = json.loads(current.read_text(encoding="utf-8"))
        if len(reference) == len(texts):
            row["differ_from_current"] = sum(a != b for a, b in zip(reference, texts))
    del generator
    return row


def course_loop(run: str, tasks, max_new_tokens: int) -> dict:
    """The course sample: tokenizer(prompt) → model.generate, one task at a time (issue 4's baseline)."""
    loaded = load_for_inference(run)
    model, tok = loaded.model, loaded.tokenizer
    new_tokens = 0

    def loop():
        nonlocal new_tokens
        for task in tasks:
            inputs = tok(render_prompt(task.input, "course"), return_tensors="pt").to(model.device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2,
                                     pad_token_id=tok.pad_token_id)
            new_tokens += out.shape[1] - inputs["input_ids"].shape[1]

    _, wall = timed(loop)
    return {"variant": "course loop (1 at a time)", "tasks": len(tasks), "tasks_cold_wall_s": wall,
            "new_tokens": new_tokens, "tasks_cold_tok_s": new_tokens / wall, "device": device_name()}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def smoke_run(root: Path) -> tuple[str, str]:
    """A tiny random Llama with Gemma's tokenizer, a random (non-zero) LoRA adapter saved as a tunebench
    run, and six tasks: the whole script on CPU in a minute."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunebench.models.embedded import embedded_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_checkpoint()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.2)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(root / "run" / "adapter")
    tokenizer.save_pretrained(root / "run" / "adapter")
    (root / "run" / "adapter" / "tunebench.json").write_text(json.dumps(
        {"base_model": str(root / "base"), "method": "lora", "template": "course"}))
    tasks = root / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"task_id": i, "input": q}, ensure_ascii=False) + "\n" for i, q in enumerate(
        ["日本の首都は？", "春の詩を書いてください。", "1+1は？", "自己紹介をしてください。", "おすすめの本は？", "こんにちは"])),
        encoding="utf-8")
    return str(root / "run"), str(tasks)


def print_table(rows: list[dict]) -> None:
    print(f"\n{rows[0]['device']}  torch {torch.__version__}")
    print(f"{'variant':<26}{'1 prompt tok/s':>16}{'tasks':>6}{'wall s':>9}{'new tok':>9}{'tok/s':>8}"
          f"{'warm wall s':>12}{'warm tok/s':>11}{'differ':>7}{'peak GiB':>9}")
    for r in rows:
        one = "/".join(f"{r[k]:.0f}" for k in ("one_cold_tok_s", "one_warm_tok_s", "one_other_tok_s") if k in r) or "-"
        warm_wall = f"{r['tasks_warm_wall_s']:.1f}" if "tasks_warm_wall_s" in r else "-"
        warm_rate = f"{r['tasks_warm_tok_s']:.0f}" if "tasks_warm_tok_s" in r else "-"
        print(f"{r['variant']:<26}{one:>16}{r['tasks']:>6}{r['tasks_cold_wall_s']:>9.1f}{r['new_tokens']:>9}"
              f"{r['tasks_cold_tok_s']:>8.0f}{warm_wall:>12}{warm_rate:>11}{str(r.get('differ_from_current', '-')):>7}"
              f"{r.get('peak_gib', 0):>9.2f}")
    print("wall s, tok/s: the first pass over the tasks in the process (compiling included; with --first-pass-phases "
          "the pass after the phased one); 1 prompt tok/s: first/second call of one task, then another task (another "
          "length), after the tasks; differ: answers unlike the current path's")
    for prefix, title in (("first_", "phases of the process's first pass, s"), ("", "phases of one more pass, s")):
        timed_rows = [r for r in rows if f"{prefix}phases_wall_s" in r]
        if timed_rows:
            names = [k[len(prefix + "phase_"):-2] for k in timed_rows[0] if k.startswith(prefix + "phase_")]
            print(f"\n{title:<38}{'wall':>7}" + "".join(f"{n:>14}" for n in names))
            for r in timed_rows:
                print(f"{r['variant']:<38}{r[f'{prefix}phases_wall_s']:>7.2f}" +
                      "".join(f"{r[f'{prefix}phase_{n}_s']:>14.3f}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a tunebench LoRA run (e.g. /tmp/bench-runs/gemma-lora-512 from train_gpu.py)")
    parser.add_argument("--tasks", help="ELYZA-tasks-100-TV JSONL (task_id, input)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="paths to measure, in order (default: all); current first gives the 'differ' column")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--one-prompt-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, help="only the first N tasks")
    parser.add_argument("--batch-size", type=int, help="rows per batch (default: automatic, as generate.batch_size)")
    parser.add_argument("--fold-ids", type=int, metavar="VOCAB", help="fold prompt ids into VOCAB (a random model "
                        "of a real shape trained with a borrowed tokenizer, e.g. train_gpu.py's llmjp13b-qlora)")
    parser.add_argument("--baseline-tasks", type=int, default=0, help="also time the course loop on N tasks")
    parser.add_argument("--out-dir", default="/tmp/generate-speed", help="JSON lines and answers files "
                        "(default: %(default)s; copied into $OUT when set)")
    parser.add_argument("--phases", action="store_true", help="graph variants: one more pass over the tasks with "
                        "the loop's phases timed (prompts, captures, host checks, steps)")
    parser.add_argument("--first-pass-phases", action="store_true", help="graph variants: the process's first pass "
                        "over the tasks is one with the loop's phases timed (then the usual two)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny random model + adapter, 16 tokens, on CPU")
    parser.add_argument("--table", type=Path, metavar="JSONL", help="only print the table of an earlier call's lines")
    args = parser.parse_args()
    if args.table:
        print_table([json.loads(line) for line in args.table.read_text(encoding="utf-8").splitlines() if line.strip()])
        return
    if args.cpu_smoke:
        args.run, args.tasks = smoke_run(Path(tempfile.mkdtemp(prefix="generate-speed-smoke-")))
        args.max_new_tokens, args.one_prompt_tokens = 16, 8
    elif not (args.run and args.tasks):
        parser.error("--run and --tasks are needed (or --cpu-smoke)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = load_tasks(args.tasks)[: args.limit]
    rows = []
    for name in args.variants:
        rows.append(measure(name, args, tasks, out_dir))
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    if args.baseline_tasks:
        rows.append(course_loop(args.run, tasks[: args.baseline_tasks], args.max_new_tokens))
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    with (out_dir / "generate_speed.jsonl").open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                                     "torch": torch.__version__,
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                    ensure_ascii=False) + "\n")
    if os.environ.get("OUT"):
        for path in out_dir.iterdir():
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    if rows:
        print_table(rows)


if __name__ == "__main__":
    main()
