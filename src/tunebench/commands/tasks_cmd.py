"""`tunebench tasks list` and `tunebench tasks add`: the named evaluation task sets."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    tasks = sub.add_parser("tasks", help="list the named task sets, or add one that cannot be shipped",
                           description="ELYZA-tasks-100 is shipped; ELYZA-tasks-100-TV has no licence, so you add "
                                       "your copy once and then use it by name.")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", metavar="ACTION")
    tasks.set_defaults(func=lambda args: tasks.print_help())

    listing = tasks_sub.add_parser("list", help="each task-set name, whether it is available, and its file")
    listing.set_defaults(func=run_list)

    add = tasks_sub.add_parser(
        "add", help="check a task file (task_id + input per line) and keep a copy in tunebench's cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validates FILE (one JSON object per line with task_id and input; ELYZA-tasks-100-TV has 100) "
                    "and copies it to $TUNEBENCH_CACHE/tasks/ (default ~/.cache/tunebench/tasks/), so the name "
                    "works from any folder.",
        epilog="example:\n  tunebench tasks add elyza-tasks-100-tv ~/Downloads/elyza-tasks-100-TV_0.jsonl\n"
               "  tunebench generate runs/quickstart --tasks elyza-tasks-100-tv")
    add.add_argument("name", choices=["elyza-tasks-100-tv"], help="the task-set name")
    add.add_argument("file", help="the JSONL file to add")
    add.set_defaults(func=run_add)


def run_list(args) -> int:
    from tunebench.tasksets import ADD_HINT, ADDABLE, list_task_sets

    for name, how, path in list_task_sets():
        if path is not None:
            print(f"{name:<20} {how:<20} {path}")
        else:
            env = ADDABLE[name][0]
            print(f"{name:<20} {how:<20} " + ADD_HINT.format(name=name, env=env))
    return 0


def run_add(args) -> int:
    from tunebench.tasksets import add_task_set, read_task_file

    target = add_task_set(args.name, Path(args.file))
    print(f"added {args.name}: {len(read_task_file(target))} tasks, kept at {target}")
    return 0
