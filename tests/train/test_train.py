import json

import pytest
import torch
from safetensors.torch import load_file

from tunebench.config import load_config
from tunebench.errors import ConfigError, ModelError
from tunebench.runs import RunDir
from tunebench.train import checkpoint as checkpoint_module
from tunebench.train.sft import micro_batch_order, train


@pytest.fixture()
def memo_data(tmp_path):
    path = tmp_path / "memo.jsonl"
    rows = [{"instruction": "日本の首都はどこですか？", "input": "", "output": "東京です。"},
            {"instruction": "一足す一は？", "input": "", "output": "二です。"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_config(model_dir, data, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", f"data.sources=[{{path: '{data}'}}]",
                              "data.contamination_sets=[]", "train.per_device_train_batch_size=2",
                              "train.gradient_accumulation_steps=1", "train.warmup_steps=0",
                              "train.lr_scheduler=constant", "train.logging_steps=1", "train.save_steps=100",
                              "train.lora_dropout=0.0", *extra])


def losses(run):
    return [json.loads(line)["loss"] for line in run.metrics.read_text().splitlines() if "loss" in line]


def assert_same_to_fp64_rounding(loss_a, loss_b, grads_a, grads_b):
    """Two float64 computations of one quantity that differ only in summation order. Each result sums
    at most n ≈ 3e5 terms (the 262,144-entry softmax), so reordering moves it by at most n·eps ≈ 3e-11
    of the summed magnitudes: rtol 1e-9 and an atol of 1e-9 of the largest gradient hold on any CPU,
    while a real defect (a token dropped or shifted, a row lost) moves them by 1e-3 or more."""
    assert loss_a.dtype == loss_b.dtype == torch.float64
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-9, atol=0)
    for name in grads_a:
        assert grads_a[name].dtype == torch.float64, name
        scale = float(grads_a[name].abs().max())
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-9 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("method, lr", [("lora", 5e-2), ("full", 1e-2), ("prefix", 5e-2), ("prompt", 1e-1)])
def test_each_method_learns_a_memorised_batch(tmp_path, tiny_model_dir, memo_data, method, lr):
    config = make_config(tiny_model_dir, memo_data, f"train.method={method}", "train.max_steps=8",
                         f"train.learning_rate={lr}")
    run = RunDir(tmp_path / "run")
    out = train(config, run)
    curve = losses(run)
    assert len(curve) == 8 and curve[-1] < curve[0] - 0.5, curve
    assert (out / "tunebench.json").exists()
    assert json.loads((out / "tunebench.json").read_text())["template"] == "course"


def test_dora_and_rslora_switches_reach_peft(tmp_path, tiny_model_dir, memo_data):
    config = make_config(tiny_model_dir, memo_data, "train.method=lora", "train.max_steps=1",
                         "train.use_dora=true", "train.use_rslora=true")
    out = train(config, RunDir(tmp_path / "run"))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True and adapter["use_rslora"] is True
    assert {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_loss_ignores_prompt_tokens(tmp_path, tiny_model_dir, memo_data):
    """The logged loss equals cross-entropy over answer tokens only, computed here from scratch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = make_config(tiny_model_dir, memo_data, "train.method=full", "train.max_steps=1",
                         "train.learning_rate=1e-6", "train.gradient_checkpointing=false")  # step 1's loss is logged before the update
    run = RunDir(tmp_path / "run")
    train(config, run)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total, count = 0.0, 0
    for q, a in [("日本の首都はどこですか？", "東京です。"), ("一足す一は？", "二です。")]:
        prompt = tok(f"### 指示\n{q}\n### 回答\n")["input_ids"]
        answer = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
        for i, token in enumerate(answer):
            total -= logp[len(prompt) + i - 1, token].item()
            count += 1
    assert losses(run)[0] == pytest.approx(total / count, rel=1e-4)


def test_kill_during_save_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, memo_data, monkeypatch):
    extra = ("train.method=lora", "train.max_steps=6", "train.save_steps=2", "train.learning_rate=1e-2",
             "train.lora_dropout=0.1", "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=2",
             "train.lr_scheduler=linear", "train.warmup_steps=2",
             "train.precision=fp64")  # resumed = straight to rounding on any CPU; a lost RNG/optimizer state is not
    straight = train(make_config(tiny_model_dir, memo_data, *extra), RunDir(tmp_path / "straight"))

    run = RunDir(tmp_path / "killed")
    real_write_state = checkpoint_module.write_state
    calls = []

    def dying_write_state(path, state):
        calls.append(state["step"])
        if state["step"] == 4:
            raise KeyboardInterrupt("killed while saving checkpoint-4")
        real_write_state(path, state)

    monkeypatch.setattr(checkpoint_module, "write_state", dying_write_state)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_model_dir, memo_data, *extra), run)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [".tmp-checkpoint-4", "checkpoint-2"]
    monkeypatch.setattr(checkpoint_module, "write_state", real_write_state)
    with pytest.raises(ConfigError, match="--resume"):
        train(make_config(tiny_model_dir, memo_data, *extra), run)
    resumed = train(make_config(tiny_model_dir, memo_data, *extra), run, resume=True)
    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == torch.float64, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12)
    assert losses(run) == pytest.approx(losses(RunDir(tmp_path / "straight")), rel=1e-9)
    steps = [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step logged twice across the interruption
    assert [p.name for p in run.checkpoints.iterdir()] == ["checkpoint-4"] or \
        sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_checkpoints_rotate_to_save_total_limit(tmp_path, tiny_model_dir, memo_data):
    config = make_config(tiny_model_dir, memo_data, "train.method=lora", "train.max_steps=7", "train.save_steps=2",
                         "train.save_total_limit=2")
    run = RunDir(tmp_path / "run")
    train(config, run)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]


def test_data_order_is_seeded_and_covers_each_epoch():
    order = micro_batch_order(5, 2, seed=3, count=6)
    assert order == micro_batch_order(5, 2, seed=3, count=6) != micro_batch_order(5, 2, seed=4, count=6)
    assert sorted(i for b in order[:3] for i in b) == [0, 1, 2, 3, 4]


def test_qlora_on_cpu_fails_at_start_saying_what_to_use(tmp_path, tiny_model_dir, memo_data):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelError, match="use --set train.method=lora"):
        train(make_config(tiny_model_dir, memo_data, "train.method=qlora", "train.max_steps=1"), RunDir(tmp_path / "r"))


def test_contaminated_data_is_refused_by_train(tmp_path, tiny_model_dir):
    elyza = json.loads(open("src/tunebench/builtin/elyza-tasks-100.jsonl", encoding="utf-8").readline())
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": elyza["input"], "input": "", "output": "x"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    config = make_config(tiny_model_dir, path, "data.contamination_sets=[elyza-tasks-100]", "train.max_steps=1")
    from tunebench.errors import DataError

    with pytest.raises(DataError, match="overlap evaluation data"):
        train(config, RunDir(tmp_path / "r"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_answer_only_logits_equal_loss_and_gradients(tiny_model_dir, method, tokenizer):
    """The lever computes the same loss and the same gradients as the full-logits path."""
    from transformers import AutoModelForCausalLM

    from tunebench.config import TrainConfig
    from tunebench.train.loss import token_loss_sum
    from tunebench.train.methods import make_trainable

    from .examples import course_batch

    batch = course_batch(tokenizer)
    results = []
    for answer_only in (False, True):
        torch.manual_seed(0)
        model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
                               TrainConfig(method=method, lora_dropout=0.0, gradient_checkpointing=False))
        if method == "lora":  # B starts at zero; move it so A's gradients are not all zero
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02)
        loss = token_loss_sum(model, batch, answer_only_logits=answer_only)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert grads_a.keys() == grads_b.keys()
    assert_same_to_fp64_rounding(loss_a, loss_b, grads_a, grads_b)


def test_answer_only_logits_refuses_models_that_rescale_logits():
    """Cohere multiplies logits by logit_scale: the lever would drop it, so it is refused by name."""
    from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

    from tunebench.train.loss import use_answer_only_logits

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2)
    cohere = CohereForCausalLM(CohereConfig(logit_scale=0.5, **small))
    with pytest.raises(ConfigError, match="'cohere'"):
        use_answer_only_logits(True, cohere, "lora")
    assert use_answer_only_logits(None, cohere, "lora") is False  # auto: quietly off
    llama = LlamaForCausalLM(LlamaConfig(**small))  # llm-jp-3's architecture
    assert use_answer_only_logits(None, llama, "lora") is True
    assert use_answer_only_logits(None, llama, "prompt") is False
    assert use_answer_only_logits(False, llama, "lora") is False
    with pytest.raises(ConfigError, match="peft.s virtual tokens"):  # refused before any model is loaded
        use_answer_only_logits(True, None, "prefix")


def test_step_tokens_runs_the_same_update_in_fewer_fuller_passes(tiny_model_dir):
    """The step's examples joined padding-free give the same summed loss and gradients as padded micro-batches."""
    from transformers import AutoModelForCausalLM

    from tunebench.config import TrainConfig
    from tunebench.train.loss import token_loss_sum
    from tunebench.train.methods import make_trainable
    from tunebench.train.sft import micro_batches

    gen = torch.Generator().manual_seed(3)
    rows = []
    for length in (7, 12, 5, 9, 16, 4, 11, 6):  # 2 rows × 4 accumulation steps, uneven lengths
        ids = torch.randint(10, 5000, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    groups = [rows[i : i + 2] for i in range(0, 8, 2)]
    results = []
    for step_tokens in (None, 40):
        micro = micro_batches(groups, pad_id=0, step_tokens=step_tokens)
        assert sum(real for _, real in micro) == sum(len(r["input_ids"]) for r in rows)
        assert len(micro) == (4 if step_tokens is None else 2)  # 40-token budget: 7+12+5+9 | 16+4+11+6 → 33, 37
        torch.manual_seed(0)
        model = make_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
                               TrainConfig(method="lora", lora_dropout=0.0, gradient_checkpointing=False))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        total = sum(token_loss_sum(model, batch) for batch, _ in micro)
        total.backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert_same_to_fp64_rounding(loss_a, loss_b, grads_a, grads_b)


def test_checkpointed_label_logprobs_equal_one_pass(tiny_model_dir):
    """The fallback for output layers that are not a plain nn.Linear (e.g. peft-wrapped)."""
    from transformers import AutoModelForCausalLM

    from tunebench.train.loss import checkpointed_label_logprobs, module_label_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    hidden = torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = torch.randint(0, 1000, (10,), generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (lambda: -module_label_logprobs(model, hidden, targets).sum(),
               lambda: -checkpointed_label_logprobs(model, hidden, targets, chunk=3).sum()):
        model.zero_grad()
        loss = fn()
        loss.backward()
        results.append((loss.detach(), model.get_output_embeddings().weight.grad.clone()))
    assert_same_to_fp64_rounding(results[0][0], results[1][0], {"head": results[0][1]}, {"head": results[1][1]})


class Planted:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_runs_no_code_on_resume(tmp_path, tiny_model_dir, memo_data):
    config = make_config(tiny_model_dir, memo_data, "train.method=lora", "train.max_steps=3", "train.save_steps=2")
    run = RunDir(tmp_path / "run")
    train(config, run)
    (checkpoint,) = run.checkpoints.iterdir()
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Planted(marker), "scheduler": {}, "rng": {}}, checkpoint / "optimizer.pt")
    with pytest.raises(ConfigError, match="optimizer.pt: holds objects other than tensors"):
        train(config, run, resume=True)
    assert not marker.exists()


def test_checkpoint_state_loads_with_weights_only(tmp_path, tiny_model_dir, memo_data):
    config = make_config(tiny_model_dir, memo_data, "train.method=lora", "train.max_steps=3", "train.save_steps=2")
    run = RunDir(tmp_path / "run")
    train(config, run)
    (checkpoint,) = run.checkpoints.iterdir()
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(state)
