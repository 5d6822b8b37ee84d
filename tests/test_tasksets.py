"""Named task sets: ELYZA-tasks-100 shipped, ELYZA-tasks-100-TV added once by the user — never a dev folder."""

import json

import pytest

from tunebench.cli import main
from tunebench.errors import DataError
from tunebench.tasksets import load_tasks, resolve_task_file


@pytest.fixture()
def user(tmp_path, monkeypatch):
    """A user's machine: an empty cache, no TUNEBENCH_TV_TASKS, a working folder of their own."""
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TUNEBENCH_TV_TASKS", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def task_file(path, n=100, broken=None):
    rows = [{"task_id": i, "input": f"質問{i}"} for i in range(n)]
    if broken is not None:
        del rows[broken]["input"]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_tv_tasks_are_never_looked_for_in_a_dev_folder(user):
    # the layout the old code searched for, in the working folder and its parent
    for folder in (user / "work", user):
        (folder / "shared/data/elyza-tasks-100-tv").mkdir(parents=True)
        task_file(folder / "shared/data/elyza-tasks-100-tv/tasks.jsonl")
    with pytest.raises(DataError) as caught:
        resolve_task_file("elyza-tasks-100-tv")
    message = str(caught.value)
    assert "tunebench tasks add elyza-tasks-100-tv FILE" in message and "TUNEBENCH_TV_TASKS" in message
    assert "--tasks" in message and "shared" not in message


def test_tasks_add_once_then_use_by_name_from_any_folder(user, capsys):
    source = task_file(user / "download.jsonl")
    assert main(["tasks", "add", "elyza-tasks-100-tv", str(source)]) == 0
    kept = user / "cache" / "tasks" / "elyza-tasks-100-tv.jsonl"
    assert f"added elyza-tasks-100-tv: 100 tasks, kept at {kept}" in capsys.readouterr().out
    source.unlink()  # the copy is tunebench's own
    assert resolve_task_file("elyza-tasks-100-tv") == kept and len(load_tasks("elyza-tasks-100-tv")) == 100
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["elyza-tasks-100", "shipped"]
    assert out[1].split() == ["elyza-tasks-100-tv", "added", str(kept)]


def test_tasks_list_says_how_to_add_a_missing_set(user, capsys):
    assert main(["tasks", "list"]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("elyza-tasks-100-tv") and "not added" in line and "tunebench tasks add" in line


@pytest.mark.parametrize("n, broken, expected", [
    (100, 6, "download.jsonl:7: field 'input' is missing"),
    (99, None, "download.jsonl: 99 tasks, but elyza-tasks-100-tv has 100"),
])
def test_tasks_add_refuses_a_bad_file_with_file_line_and_field(user, capsys, n, broken, expected):
    source = task_file(user / "download.jsonl", n, broken)
    assert main(["tasks", "add", "elyza-tasks-100-tv", str(source)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not (user / "cache" / "tasks" / "elyza-tasks-100-tv.jsonl").exists()


def test_tasks_add_refuses_the_shipped_set_under_the_tv_name(user, capsys):
    from tunebench.tasksets import BUILTIN_DIR

    assert main(["tasks", "add", "elyza-tasks-100-tv", str(BUILTIN_DIR / "elyza-tasks-100.jsonl")]) == 2
    assert "this is elyza-tasks-100, which is shipped (use it by name), not elyza-tasks-100-tv" in capsys.readouterr().err


def test_environment_variable_wins_and_a_wrong_one_is_named(user, monkeypatch):
    source = task_file(user / "tv.jsonl")
    monkeypatch.setenv("TUNEBENCH_TV_TASKS", str(source))
    assert resolve_task_file("elyza-tasks-100-tv") == source
    monkeypatch.setenv("TUNEBENCH_TV_TASKS", str(user / "nope.jsonl"))
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file \(from \$TUNEBENCH_TV_TASKS\)"):
        resolve_task_file("elyza-tasks-100-tv")
