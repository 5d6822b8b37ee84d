"""`tunebench pairs make`: reference mode on a tiny trained run, judge mode against a scripted server."""

import json

import pytest

from tunebench.cli import main
from tunebench.config import GenerateConfig, JudgeConfig, load_config
from tunebench.generate.engine import Answer
from tunebench.generate.pairs import make_pairs
from tunebench.runs import RunDir

from ..judge.fake_openai import FakeJudge


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    from tunebench.train.sft import train

    root = tmp_path_factory.mktemp("run")
    data = write_jsonl(root / "sft.jsonl", [{"instruction": "日本の首都は？", "input": "", "output": "東京です。"}])
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.sources=[{{path: '{data}'}}]",
                                "data.contamination_sets=[]", "train.method=lora", "train.max_steps=1",
                                "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1",
                                "generate.max_new_tokens=8", "generate.batch_size=4"])
    run = RunDir(root / "run")
    train(config, run)
    return run


def test_reference_mode_pairs_the_data_answer_with_the_runs_own_and_resumes(tmp_path, tiny_run):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"instruction": f"質問{i}です。", "input": "", "output": f"答え{i}です。"} for i in range(3)])
    out = tmp_path / "pairs.jsonl"
    argv = ["pairs", "make", str(tiny_run.root), "--prompts", str(prompts), "--out", str(out)]
    assert main(argv) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    assert summary["made"] == len(pairs) and summary["answers_made"] == 3
    assert len(pairs) == 3 and summary["dropped"] == {}  # a random tiny model never repeats the reference
    for pair in pairs:
        assert pair["chosen"] == f"答え{pair['prompt'][2]}です。" and pair["rejected"] != pair["chosen"]
    # the answers file makes a rerun generate nothing, with the same pairs
    assert main(argv) == 0
    assert json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())["answers_reused"] == 3
    assert [json.loads(line) for line in out.read_text().splitlines()] == pairs


def test_reference_mode_drops_answers_equal_to_the_reference(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "a", "output": "同じ答え。"},
                                                {"instruction": "b", "output": "別の答え。"}])

    class Echo:  # answers prompt a with its reference (plus spacing), prompt b with something else
        def generate(self, items, on_answer=None, progress=None):
            answers = [Answer(i, " 同じ答え。 " if m[-1]["content"] == "a" else "違う。", 3, True)
                       for i, m in enumerate(items)]
            for answer in answers:
                on_answer(answer)
            return answers

    summary = make_pairs("x", str(prompts), tmp_path / "out.jsonl", "reference", GenerateConfig(), JudgeConfig(),
                         generator=Echo())
    assert summary.made == 1 and summary.dropped == {"equal to the reference": 1}


def test_judge_mode_chooses_best_and_worst_by_a_real_http_judge(tmp_path):
    """k scripted answers per prompt carry the score the fake server gives them (WANT:N)."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "q1", "output": "r1"},
                                                {"instruction": "q2", "output": "r2"},
                                                {"instruction": "q3", "output": "r3"}])
    scripted = {"q1": ["WANT:2 x", "WANT:5 y", "WANT:3 z"], "q2": ["WANT:4 a", "WANT:4 b", "WANT:4 c"],
                "q3": ["CASE:NOSCORE a", "WANT:4 b", "CASE:NOSCORE c"]}
    calls = []

    class Scripted:
        def __init__(self):
            self.seen = {}

        def generate(self, items, on_answer=None, progress=None):
            calls.append(len(items))
            answers = []
            for i, messages in enumerate(items):
                q = messages[-1]["content"]
                k = self.seen.get(q, 0)
                self.seen[q] = k + 1
                answers.append(Answer(i, scripted[q][k], 3, True))
                on_answer(answers[-1])
            return answers

    server = FakeJudge()
    try:
        judge = JudgeConfig(judge="openai:fake", base_url=server.url, backoff_s=0.01, timeout_s=2.0, max_retries=1)
        out = tmp_path / "pairs.jsonl"
        summary = make_pairs("x", str(prompts), out, "judge", GenerateConfig(), judge, samples=3, generator=Scripted())
        pairs = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(p["prompt"], p["chosen"], p["rejected"], p["scores"]) for p in pairs] == [
            ("q1", "WANT:5 y", "WANT:2 x", [5, 2])]
        assert summary.dropped == {"tie": 1, "fewer than two scored answers": 1}
        hits = server.total()
        # a rerun reuses answers and scored judgments: no generation; only the two unscored answers are
        # asked again (unscored is never final: issue 18), each with its retries
        again = make_pairs("x", str(prompts), out, "judge", GenerateConfig(), judge, samples=3, generator=Scripted())
        assert calls == [9] and again.made == 1 and server.total() - hits == 2 * (judge.max_retries + 1)
    finally:
        server.stop()
