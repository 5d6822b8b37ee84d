"""`tunebench generate`, `tunebench validate`, `tunebench serve`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tunebench.commands.options import add_overrides_arg
from tunebench.config import load_config
from tunebench.data.templates import TEMPLATE_NAMES
from tunebench.errors import ConfigError
from tunebench.runs import CONFIG, PREDICTIONS


def register(sub) -> None:
    gen = sub.add_parser(
        "generate", help="answer a task set in the submission format (batched, resumable, validated)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write {task_id, input, output} lines, one per task in task order. A rerun resumes.\n"
                    "A LoRA adapter on a bf16/fp32 base is merged in memory first (generate.merge_adapter; the\n"
                    "files on disk unchanged, a 4-bit base never); on a CUDA GPU each decode step is one captured\n"
                    "CUDA graph over a static KV cache (generate.cuda_graphs). Greedy answers are the same, bf16\n"
                    "rounding aside.",
        epilog="examples:\n  tunebench generate runs/quickstart --tasks elyza-tasks-100-tv\n"
               "  tunebench generate llm-jp/llm-jp-3-13b --template course --tasks my_tasks.jsonl --out base.jsonl")
    gen.add_argument("target", help="a run directory, a merged model folder, or a hub id / model folder")
    gen.add_argument("--tasks", help="task-set name (elyza-tasks-100, elyza-tasks-100-tv) or JSONL with task_id+input"
                     " (default: generate.tasks of the run's config)")
    gen.add_argument("--out", help="predictions file (default: RUN/predictions.jsonl, or predictions.jsonl)")
    gen.add_argument("--template", choices=TEMPLATE_NAMES, help="prompt template, required for a plain model "
                     "without a chat template (a run uses its own)")
    gen.add_argument("--config", help="take generate settings from this config (default: the run's own)")
    add_overrides_arg(gen, "generate.max_new_tokens=256")
    gen.set_defaults(func=run_generate)

    val = sub.add_parser("validate", help="check a predictions file against its task file",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="example:\n  tunebench validate predictions.jsonl --tasks elyza-tasks-100-tv")
    val.add_argument("predictions")
    val.add_argument("--tasks", required=True, help="task-set name or JSONL with task_id+input")
    val.set_defaults(func=run_validate)

    serve = sub.add_parser("serve", help="an OpenAI-compatible chat server over a run or model",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="example:\n  tunebench serve runs/quickstart --port 8000\n"
                                  "  then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none')")
    serve.add_argument("target", help="a run directory, merged model folder, or hub id / model folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--template", choices=TEMPLATE_NAMES)
    serve.add_argument("--name", help="model name reported by /v1/models (default: the target)")
    serve.add_argument("--max-tokens", type=int, default=1024,
                       help="most new tokens one request may ask for (default 1024; more is a 400)")
    serve.add_argument("--max-prompt-tokens", type=int, default=4096,
                       help="longest prompt accepted, in tokens (default 4096; longer is a 400)")
    add_overrides_arg(serve, "generate.repetition_penalty=1.1")
    serve.set_defaults(func=run_serve)


def settings_for(target: str, config_path: str | None, overrides: list[str]):
    """Generation settings: --config, else the run's saved config, else defaults; then --set."""
    from tunebench.models.trained import find_trained

    if config_path is None:
        trained = find_trained(Path(target))
        if trained is not None and (trained / CONFIG).exists():
            config_path = str(trained / CONFIG)
    return load_config(config_path, overrides)


def run_generate(args) -> int:
    from tunebench.generate.answers import generate_answers
    from tunebench.models.trained import find_trained

    config = settings_for(args.target, args.config, args.overrides)
    trained = find_trained(Path(args.target))
    out = Path(args.out) if args.out else (trained.parent / PREDICTIONS if trained else Path("predictions.jsonl"))
    result = generate_answers(args.target, args.tasks or config.generate.tasks, out, config.generate, args.template)
    if trained is not None and out.resolve() == (trained.parent / PREDICTIONS).resolve():
        from tunebench.pipeline import GENERATE_SECTIONS, settings_of
        from tunebench.runs import RunDir, write_json_atomic

        # the run's own submission: record what made it, as `tunebench run` does, so a rerun compares
        write_json_atomic(RunDir(trained.parent).predictions_settings, settings_of(config, GENERATE_SECTIONS))
    speed = f", {result.new_tokens / result.seconds:.1f} new tokens/s" if result.answered and result.seconds else ""
    print(f"answered {result.answered} task(s) (reused {result.reused}) in {result.seconds:.1f}s{speed}; "
          f"{result.hit_max_tokens} hit max_new_tokens")
    print(f"submission: {result.path} (validated)")
    return 0


def run_validate(args) -> int:
    from tunebench.generate.validate import validate_predictions
    from tunebench.tasksets import load_tasks

    tasks = load_tasks(args.tasks)
    issues = validate_predictions(Path(args.predictions), tasks)
    for issue in issues:
        print(f"{args.predictions}: {issue}")
    if issues:
        print(f"{len(issues)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.predictions}: OK — {len(tasks)} tasks, one non-empty answer each")
    return 0


def run_serve(args) -> int:
    from tunebench.generate.engine import Generator
    from tunebench.generate.serve import Limits, make_server
    from tunebench.models.trained import load_for_inference, pick_template

    config = settings_for(args.target, None, args.overrides)
    loaded = load_for_inference(args.target)
    template = pick_template(loaded.template, args.template, loaded.tokenizer)
    generator = Generator(loaded.model, loaded.tokenizer, template, dataclasses.replace(config.generate, batch_size=1))
    if args.max_tokens < 1 or args.max_prompt_tokens < 1:
        raise ConfigError("--max-tokens and --max-prompt-tokens must be at least 1")
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens)
    server = make_server(generator, args.name or args.target, args.host, args.port, limits)
    print(f"serving {args.target} at http://{args.host}:{server.server_address[1]}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # the way to stop a server: nothing to resume
        print("server stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
