"""DPO, ORPO and SimPO: hand-computed losses, learning on toy pairs, the cached reference, resume."""

import contextlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tunebench.config import load_config
from tunebench.errors import ConfigError
from tunebench.runs import RunDir
from tunebench.train.preference import dpo_loss, orpo_loss, simpo_loss
from tunebench.train.sft import train


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_equals_hand_computation():
    chosen, rejected, ref_c, ref_r = -10.0, -14.0, -11.0, -13.0
    losses, rc, rr = dpo_loss(torch.tensor([chosen]), torch.tensor([rejected]), torch.tensor([ref_c]),
                              torch.tensor([ref_r]), beta=0.1, label_smoothing=0.2)
    z = 0.1 * ((chosen - ref_c) - (rejected - ref_r))  # 0.1 * (1 - (-1)) = 0.2
    expected = -0.8 * math.log(sigmoid(z)) - 0.2 * math.log(sigmoid(-z))
    assert losses.item() == pytest.approx(expected, rel=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)


def test_orpo_loss_equals_hand_computation():
    pc, pr = -0.5, -1.5  # mean per-token log-probs
    losses, rc, rr = orpo_loss(torch.tensor([pc]), torch.tensor([pr]), lam=0.1)
    log_odds = (pc - math.log(1 - math.exp(pc))) - (pr - math.log(1 - math.exp(pr)))
    assert losses.item() == pytest.approx(-pc - 0.1 * math.log(sigmoid(log_odds)), rel=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((0.1 * pc, 0.1 * pr))


def test_simpo_loss_equals_hand_computation():
    pc, pr = -0.8, -1.1
    losses, rc, rr = simpo_loss(torch.tensor([pc]), torch.tensor([pr]), beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(-math.log(sigmoid(2.0 * (pc - pr) - 1.0)), rel=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((2.0 * pc, 2.0 * pr))


@pytest.fixture()
def toy_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "日本の首都はどこですか？", "chosen": "東京です。", "rejected": "大阪かもしれません。"},
            {"prompt": "一足す一は？", "chosen": "二です。", "rejected": "三です。"},
            {"prompt": "空の色は？", "chosen": "青です。", "rejected": "緑色だと思います。"},
            {"prompt": "猫は何と鳴く？", "chosen": "にゃあ。", "rejected": "わんわん。"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_config(model, data, *extra):
    return load_config(None, [f"model.name_or_path={model}", f"data.sources=[{{path: '{data}'}}]",
                              "data.contamination_sets=[]", "train.method=lora", "train.objective=dpo",
                              "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2",
                              "train.warmup_steps=0", "train.lr_scheduler=constant", "train.logging_steps=1",
                              "train.lora_dropout=0.0", "train.learning_rate=5e-2", *extra])


def metrics(run):
    return [json.loads(line) for line in run.metrics.read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    """A finished LoRA SFT run on the tiny model: the starting point (and DPO reference)."""
    root = tmp_path_factory.mktemp("sft")
    data = root / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "日本の首都はどこですか？", "input": "", "output": "東京です。"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.sources=[{{path: '{data}'}}]",
                                "data.contamination_sets=[]", "train.method=lora", "train.max_steps=2",
                                "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1",
                                "train.warmup_steps=0", "train.learning_rate=5e-2", "train.lora_dropout=0.0"])
    run = RunDir(root / "run")
    train(config, run)
    return run


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_a_few_steps_raise_the_reward_margin(tmp_path, tiny_model_dir, toy_pairs, objective):
    run = RunDir(tmp_path / "run")
    out = train(pair_config(tiny_model_dir, toy_pairs, f"train.objective={objective}", "train.max_steps=6"), run)
    curve = metrics(run)
    assert len(curve) == 6
    assert curve[-1]["reward_margin"] > curve[0]["reward_margin"] + 0.05, curve
    assert curve[-1]["loss"] < curve[0]["loss"], curve
    assert curve[-1]["reward_accuracy"] == 1.0
    assert {"logps_chosen", "logps_rejected"} <= set(curve[0])
    assert ("ref_logps_chosen" in curve[0]) == (objective == "dpo")
    assert json.loads((out / "tunebench.json").read_text())["objective"] == objective
    if objective == "dpo":  # a fresh adapter starts as the reference: zero rewards, loss log 2
        assert curve[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
        assert curve[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)


def test_dpo_from_an_sft_run_caches_the_sft_models_reference_log_probs(tmp_path, sft_run, toy_pairs):
    from tunebench.data.prepare import read_token_rows
    from tunebench.models.trained import load_for_inference
    from tunebench.train.preference import compute_reference

    run = RunDir(tmp_path / "dpo")
    out = train(pair_config(sft_run.root, toy_pairs, "train.max_steps=2", "train.step_tokens=null"), run)
    cached = json.loads((run.data_dir / "reference_logps.json").read_text())["logps"]
    loaded = load_for_inference(str(sft_run.root), dtype=torch.float32)  # the SFT model itself
    rows = read_token_rows(run.data_dir / "train.jsonl")
    plain = [[list(range(i, min(i + 2, len(rows))))] for i in range(0, len(rows), 2)]  # batches of 2, in file order
    again = compute_reference(loaded.model, rows, plain, loaded.tokenizer.pad_token_id, None, torch.device("cpu"),
                              contextlib.nullcontext, False)
    assert torch.tensor(cached) == pytest.approx(torch.tensor(again), rel=1e-4, abs=1e-4)
    assert metrics(run)[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # policy starts as the reference
    meta = json.loads((out / "tunebench.json").read_text())
    assert meta["base_model"] == str(json.loads((sft_run.adapter / "tunebench.json").read_text())["base_model"])
    # the DPO adapter went on from the SFT adapter: same keys, different values
    sft, dpo = load_file(str(sft_run.adapter / "adapter_model.safetensors")), load_file(
        str(out / "adapter_model.safetensors"))
    assert sft.keys() == dpo.keys() and any(not torch.equal(sft[k], dpo[k]) for k in sft)


def test_reference_gets_no_gradient(tiny_model_dir, tokenizer):
    """The DPO loss's gradient flows into the policy's log-probs only, never into the reference."""
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    reference = torch.tensor([-4.0, -4.0], requires_grad=False)
    losses, _, _ = dpo_loss(policy[0:1], policy[1:2], reference[0:1], reference[1:2], 0.1)
    losses.sum().backward()
    assert policy.grad is not None and reference.grad is None
    assert policy.grad[0] < 0 < policy.grad[1]  # chosen pushed up, rejected down


def test_dpo_resume_equals_uninterrupted(tmp_path, tiny_model_dir, toy_pairs):
    extra = ("train.max_steps=4", "train.save_steps=2", "train.lora_dropout=0.1", "train.per_device_train_batch_size=1")
    straight = train(pair_config(tiny_model_dir, toy_pairs, *extra), RunDir(tmp_path / "straight"))
    run = RunDir(tmp_path / "resumed")
    train(pair_config(tiny_model_dir, toy_pairs, *extra, "train.max_steps=2", "train.save_steps=1"), run)
    # a run cut after step 2: keep checkpoint-1 only and the metrics of steps 1-2, then resume to 4
    import shutil

    shutil.rmtree(run.adapter)
    cached = (run.data_dir / "reference_logps.json").read_text()
    resumed = train(pair_config(tiny_model_dir, toy_pairs, *extra), run, resume=True)
    assert (run.data_dir / "reference_logps.json").read_text() == cached  # reused, not recomputed
    a, b = load_file(str(straight / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert [m["loss"] for m in metrics(run)] == pytest.approx([m["loss"] for m in metrics(RunDir(tmp_path / "straight"))],
                                                               rel=1e-6)


def test_prefix_tuning_is_refused_for_preference_objectives(tmp_path, tiny_model_dir, toy_pairs):
    with pytest.raises(ConfigError, match="lora, qlora and full"):
        train(pair_config(tiny_model_dir, toy_pairs, "train.method=prefix"), RunDir(tmp_path / "r"))


def test_reference_pass_runs_each_pair_in_the_share_its_first_step_trains_it_in():
    from tunebench.train.preference import reference_shares
    from tunebench.train.sft import micro_batch_order

    order = micro_batch_order(7, 2, seed=3, count=12)  # 4 micro-batches an epoch, the last holds one pair
    shares = reference_shares(order, per_step=4, world=2, n_rows=7, batch_size=2)
    # step 1 of the run: rank 0 takes micro-batches 0 and 2, rank 1 takes 1 and 3: exactly these shares
    assert shares[:2] == [[order[0], order[2]], [order[1], order[3]]]
    assert sorted(i for share in shares for idx in share for i in idx) == list(range(7))
    # a run shorter than an epoch: the pairs it never reaches follow in plain batches of batch_size
    short = reference_shares(order[:2], per_step=2, world=1, n_rows=7, batch_size=2)
    assert short[0] == [order[0], order[1]]
    assert sorted(i for share in short for idx in share for i in idx) == list(range(7))
    assert all(len(share) == 1 and len(share[0]) <= 2 for share in short[1:])


def test_first_step_log_probs_equal_the_cached_reference_bit_for_bit(tmp_path, sft_run, toy_pairs, monkeypatch):
    """The policy starts as the reference, and the reference pass ran step 1's pairs joined exactly as
    step 1 joins them (in bf16 another composition moves a response's sum by ~0.1 nats): the rows
    are the same and the logged sums are the same floats, so DPO's first loss is exactly log 2."""
    from tunebench.train import preference

    seen = {"reference": [], "train": []}
    original = preference.sequence_logps

    def spy(model, batch, answer_only_logits):
        seen["train" if torch.is_grad_enabled() else "reference"].append(batch["input_ids"].tolist())
        return original(model, batch, answer_only_logits)

    monkeypatch.setattr(preference, "sequence_logps", spy)
    run = RunDir(tmp_path / "dpo")
    # step 1 joins all four pairs (two micro-batches of two, in the run's shuffled order) into one row
    train(pair_config(sft_run.root, toy_pairs, "train.max_steps=1", "train.step_tokens=1024"), run)
    assert len(seen["train"]) == 1 and seen["train"][0] in seen["reference"]
    first = metrics(run)[0]
    assert first["logps_chosen"] == first["ref_logps_chosen"]
    assert first["logps_rejected"] == first["ref_logps_rejected"]
    assert first["loss"] == float(-torch.nn.functional.logsigmoid(torch.zeros(())))  # log 2 in float32
