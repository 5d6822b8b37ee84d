"""One module per CLI verb group; each has `register(subparsers)` adding its parsers and handlers."""

from tunebench.commands import (
    compare_cmd,
    config_cmd,
    data_cmd,
    generate_cmd,
    judge_cmd,
    pairs_cmd,
    pipeline_cmd,
    tasks_cmd,
    train_cmd,
)

REGISTRY = [data_cmd.register, train_cmd.register, pairs_cmd.register, generate_cmd.register, judge_cmd.register,
            compare_cmd.register, pipeline_cmd.register, tasks_cmd.register, config_cmd.register]
