"""`tunebench judge`, `tunebench judge calibrate`, `tunebench eval nll`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tunebench.commands.options import add_overrides_arg
from tunebench.config import JudgeConfig, key_help, load_config
from tunebench.data.templates import TEMPLATE_NAMES
from tunebench.errors import ConfigError
from tunebench.runs import CONFIG, PREDICTIONS

JUDGE_EPILOG = """examples:
  GEMINI_API_KEY=... tunebench judge runs/quickstart/predictions.jsonl --judge gemini:gemini-2.5-flash
  tunebench judge predictions.jsonl --tasks elyza-tasks-100 --judge openai:gpt-4o-mini --samples 3
  tunebench judge predictions.jsonl --judge openai:qwen2.5 --base-url http://127.0.0.1:11434/v1   # Ollama
  tunebench judge calibrate --judge openai:gpt-4o-mini --n 100     # agreement with GPT-4-class scores
  tunebench judge calibrate --pairwise --judge openai:gpt-4o-mini  # picks the better of two published answers?
  tunebench judge preds.jsonl --judge openai:gpt-4o-mini --judge gemini:gemini-2.5-flash   # a panel of judges

Judgments are cached in judgments.jsonl next to the predictions: a rerun pays only for what changed
(and asks again for unscored answers). Exits 1 when no answer could be scored.
API keys are read from the environment (GEMINI_API_KEY, OPENAI_API_KEY or --api-key-env NAME) and sent
only to their own provider or to a base URL you name (--base-url, OPENAI_BASE_URL), never to one that
only a config file names, and never over plain http to another machine."""


def register(sub) -> None:
    judge = sub.add_parser("judge", help="score answers 1-5 with an LLM judge (or: judge calibrate)",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=JUDGE_EPILOG,
                           description="Score each answer on ELYZA's 1-5 scale and report the mean with a 95% CI.")
    judge.add_argument("predictions", metavar="PREDICTIONS|calibrate",
                       help="a predictions JSONL (or a run directory), or the word 'calibrate'")
    judge.add_argument("--judge", action="append", default=[],
                       help="BACKEND:MODEL — openai:MODEL, gemini:MODEL or local:RUN_OR_MODEL (repeat for a panel)")
    judge.add_argument("--tasks", help="task set the answers belong to (default: the run's generate.tasks)")
    judge.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    judge.add_argument("--api-key-env", help="environment variable holding the API key")
    judge.add_argument("--samples", type=int, help=key_help("judge.samples"))
    judge.add_argument("--temperature", type=float, help=key_help("judge.temperature"))
    judge.add_argument("--concurrency", type=int, help=key_help("judge.concurrency"))
    judge.add_argument("--rpm", type=int, help=key_help("judge.requests_per_minute"))
    judge.add_argument("--config", help="take judge settings from this config (default: the run's own)")
    add_overrides_arg(judge, "judge.concurrency=8")
    judge.add_argument("--n", type=int, default=50, help="calibrate: answers to sample")
    judge.add_argument("--data", help="calibrate: a folder of calibration JSONL files (default: the published scores "
                       "shipped with tunebench)")
    judge.add_argument("--reference-judge", default="gpt-4-turbo-preview", help="calibrate: judge to compare with")
    judge.add_argument("--out", help="calibrate: output folder (default runs/calibration/<judge>)")
    judge.add_argument("--pairwise", action="store_true",
                       help="calibrate: pairs of published answers scored ≥2 apart; how often the judge picks the better")
    judge.set_defaults(func=run_judge)

    evaluate = sub.add_parser("eval", help="API-free evaluation signals",
                              description="API-free evaluation: reference-answer NLL.")
    eval_sub = evaluate.add_subparsers(dest="eval_command", metavar="ACTION")
    evaluate.set_defaults(func=lambda args: evaluate.print_help())
    nll = eval_sub.add_parser("nll", help="mean per-token NLL of ELYZA-tasks-100's reference answers",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example:\n  tunebench eval nll runs/quickstart --tasks elyza-tasks-100")
    nll.add_argument("target", help="a run directory, merged model, or hub id / folder")
    nll.add_argument("--tasks", default="elyza-tasks-100", help="a task set with reference answers")
    nll.add_argument("--template", choices=TEMPLATE_NAMES, help="for a plain model")
    nll.add_argument("--limit", type=int, help="score only the first N tasks (a quick check)")
    nll.set_defaults(func=run_nll)


def judge_settings(args, run_config: Path | None):
    config_path = args.config or (str(run_config) if run_config and run_config.exists() else None)
    config = load_config(config_path, args.overrides)
    j = config.judge
    for field, value in (("judge", args.judge[0] if args.judge else None), ("base_url", args.base_url), ("api_key_env", args.api_key_env),
                         ("samples", args.samples), ("temperature", args.temperature),
                         ("concurrency", args.concurrency), ("requests_per_minute", args.rpm)):
        if value is not None:
            setattr(j, field, value)
    from tunebench.config_checks import check_config

    check_config(config)  # --concurrency 0 and the like, before any request
    if not j.judge:
        raise ConfigError("no judge configured: pass --judge BACKEND:MODEL (e.g. gemini:gemini-2.5-flash with "
                          "GEMINI_API_KEY set) or set judge.judge in the config")
    from tunebench.judge.backends import parse_judge_spec

    parse_judge_spec(j.judge)  # a malformed spec fails before any data is read
    return config


def user_backend(args, judge: JudgeConfig):
    """An API backend that may send keys where this command line points (None: built later as usual).

    The run's config.yaml is read too, but only --base-url and --api-key-env are the user's own word."""
    from tunebench.judge.backends import make_backend, parse_judge_spec

    if parse_judge_spec(judge.judge)[0] == "local":
        return None  # no key involved; the model loads only once the predictions are checked
    return make_backend(judge, user_urls=(args.base_url,) if args.base_url else (),
                        user_key_env=args.api_key_env is not None)


def user_backends(args, judge: JudgeConfig, specs: list[str]) -> list:
    """user_backend for each judge of a panel (all settings but the judge shared)."""
    return [user_backend(args, dataclasses.replace(judge, judge=spec)) for spec in specs]


def run_judge(args) -> int:
    if args.predictions == "calibrate":
        from tunebench.judge.calibrate import calibrate, format_calibration

        config = judge_settings(args, None)
        safe = config.judge.judge.replace(":", "_").replace("/", "_")
        out = Path(args.out) if args.out else Path("runs") / "calibration" / safe
        if args.pairwise:
            from tunebench.judge.calibrate_pairwise import calibrate_pairwise, format_pairwise_calibration

            result = calibrate_pairwise(config.judge, args.n, out, args.data, args.reference_judge,
                                        backend=user_backend(args, config.judge))
            print(format_pairwise_calibration(result))
            print(f"wrote {out / 'calibration_pairwise.json'}")
            return 0
        result = calibrate(config.judge, args.n, out, args.data, args.reference_judge,
                           backend=user_backend(args, config.judge))
        print(format_calibration(result))
        print(f"wrote {out / 'calibration.json'}")
        return 0
    from tunebench.judge.score import judge_predictions

    path = Path(args.predictions)
    if path.is_dir():
        path = path / PREDICTIONS
    if not path.exists():
        raise ConfigError(f"{path}: no predictions file; run `tunebench generate` first")
    config = judge_settings(args, path.parent / CONFIG)
    if len(args.judge) > 1:
        from tunebench.judge.backends import parse_judge_spec
        from tunebench.judge.panel import format_panel, judge_panel

        for spec in args.judge[1:]:
            parse_judge_spec(spec)  # every judge of the panel is checked before any is paid

        report = judge_panel(path, args.tasks or config.generate.tasks, config.judge, args.judge,
                             backends=user_backends(args, config.judge, args.judge))
        print(report.table())
        print(format_panel(report.data))
        print(f"wrote {path.parent / 'scores.json'} and {path.parent / 'judgments.jsonl'}")
        return 0
    report = judge_predictions(path, args.tasks or config.generate.tasks, config.judge,
                               backend=user_backend(args, config.judge))
    print(report.table())
    print(f"wrote {path.parent / 'scores.json'} and {path.parent / 'judgments.jsonl'}")
    if not report.data["scored"]:
        # A script must be able to tell: every call failed or no reply held a 1-5 score.
        print(f"error: no answer was scored ({report.data['unscored']} unscored; each task's 'error' in "
              f"{path.parent / 'scores.json'} says why); a rerun asks the judge again for the unscored ones",
              file=sys.stderr)
        return 1
    return 0


def run_nll(args) -> int:
    from tunebench.models.trained import load_for_inference, pick_template
    from tunebench.train.nll import reference_nll

    loaded = load_for_inference(args.target)
    template = pick_template(loaded.template, args.template, loaded.tokenizer)
    result = reference_nll(loaded.model, loaded.tokenizer, template, args.tasks, limit=args.limit)
    print(json.dumps(result, ensure_ascii=False))
    return 0
