"""train.compile_skip_guards: only a training micro-batch of a shape already trained in the process skips
dynamo's guard checks, with the losses and LoRA gradients of full checks; where auto turns it on; the loop
uses it. Compiled with backend "aot_eager" (see test_compile.py).
"""

import json

import pytest
import torch

import tunebench.train.sft as sft_module
from tunebench.config import load_config
from tunebench.config_checks import config_problems
from tunebench.errors import ConfigError
from tunebench.runs import RunDir
from tunebench.train import compile as compile_module
from tunebench.train.compile import bucket_batch, compile_layers, compiled_layer, decoder_layers
from tunebench.train.guard_skip import GuardSkip, use_skip_guards
from tunebench.train.loss import token_loss_sum
from tunebench.train.sft import train

from .test_compile import joined_batches, lora_model

BACKEND = "aot_eager"
CUDA, CPU = torch.device("cuda"), torch.device("cpu")

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def skipping_guards() -> bool:
    from torch._dynamo.eval_frame import _is_skip_guard_eval_unsafe_stance

    return _is_skip_guard_eval_unsafe_stance()


def compiled_lora_run(tmp_path, tiny_model_dir, answers: list[str], *settings: str) -> list[str]:
    """Overrides of a 3-step LoRA run of the tiny model with compiled layers, on one instruction row per answer
    (written to tmp_path/memo.jsonl), batch 2, plus `settings`."""
    data = tmp_path / "memo.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"問{i}", "input": "", "output": answer}, ensure_ascii=False)
                            + "\n" for i, answer in enumerate(answers)), encoding="utf-8")
    return [f"model.name_or_path={tiny_model_dir}", f"data.sources=[{{path: '{data}'}}]", "data.contamination_sets=[]",
            "train.per_device_train_batch_size=2", "train.step_tokens=null", "train.max_steps=3", "train.method=lora",
            "train.compile=true", *settings]


def train_micro_batches(model, batches, guard_skip):
    """Each batch's forward and backward as the loop runs them; returns the losses, the LoRA gradients
    summed over the batches, and per batch whether the compiled layers' calls skipped the guard checks."""
    stances = []
    for layer in decoder_layers(model):  # callbacks run eagerly at each compiled call and before its backward
        compiled_layer(layer).before.append(lambda: stances[-1].add(skipping_guards()))
    losses = []
    for batch in batches:
        stances.append(set())
        with guard_skip.around(batch):
            loss = token_loss_sum(model, batch, True)
            loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), grads, stances


def test_a_shape_trained_before_skips_the_guard_checks_with_the_same_losses_and_gradients():
    """Lengths padded to 256, 384, 256, 384, 512, 256: the first micro-batch of each shape checks every
    guard (and compiles what it needs), the later ones of that shape skip them; losses and gradients equal
    those of a run that checks every time (aot_eager: the same graphs, the same ops)."""
    batches = [bucket_batch(b, 0) for b in joined_batches([150, 300, 200, 290, 420, 170])]
    assert [b["input_ids"].shape[1] for b in batches] == [256, 384, 256, 384, 512, 256]
    results = {}
    for on in (False, True):
        model = lora_model(kind="llama")
        compile_layers(model, backend=BACKEND)
        results[on] = train_micro_batches(model, batches, GuardSkip(on))
        torch._dynamo.reset()
    checked_losses, checked_grads, checked_stances = results[False]
    losses, grads, stances = results[True]
    assert stances == [{False}, {False}, {True}, {True}, {False}, {True}]
    assert checked_stances == [{False}] * 6
    assert not skipping_guards()  # restored after each micro-batch
    torch.testing.assert_close(losses, checked_losses, rtol=0, atol=0)
    assert grads.keys() == checked_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, checked_grads[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_auto_is_on_where_it_was_measured_and_true_insists():
    assert use_skip_guards("auto", CUDA, compiled=True, graphs=False, world=1, objective="sft")
    assert not use_skip_guards("auto", CUDA, compiled=True, graphs=True, world=1, objective="sft")
    assert not use_skip_guards("auto", CUDA, compiled=True, graphs=False, world=1, objective="dpo")
    assert not use_skip_guards("auto", CUDA, compiled=True, graphs=False, world=2, objective="sft")
    assert not use_skip_guards("auto", CPU, compiled=True, graphs=False, world=1, objective="sft")
    assert not use_skip_guards("auto", CUDA, compiled=False, graphs=False, world=1, objective="sft")
    assert use_skip_guards(True, CPU, compiled=True, graphs=True, world=2, objective="dpo")
    assert not use_skip_guards(False, CUDA, compiled=True, graphs=False, world=1, objective="sft")
    with pytest.raises(ConfigError, match="train.compile is off"):
        use_skip_guards(True, CUDA, compiled=False, graphs=False, world=1, objective="sft")
    with pytest.raises(ConfigError, match="'train.compile_skip_guards': true applies to compiled layers, and "
                       "train.compile is false"):
        load_config(None, ["train.compile=false", "train.compile_skip_guards=true"])
    assert not config_problems(load_config(None, ["train.compile=false", "train.compile_skip_guards=auto"]))


def test_the_loop_skips_the_guards_for_a_shape_it_has_trained(tmp_path, tiny_model_dir, monkeypatch):
    """train() with compile_skip_guards: true hands the loop a GuardSkip that is on; three micro-batches of
    one padded shape: the first checks every guard, the other two run under the skipping stance."""
    monkeypatch.setattr(compile_module, "BACKEND", BACKEND)
    seen, fit = {}, sft_module.fit
    stances = []

    def recording_fit(state, objective):
        seen["guard_skip"] = state.guard_skip
        for layer in decoder_layers(state.model):
            compiled_layer(layer).before.append(lambda: stances.append(skipping_guards()))
        fit(state, objective)

    monkeypatch.setattr(sft_module, "fit", recording_fit)
    overrides = compiled_lora_run(tmp_path, tiny_model_dir, [f"答{i}です。" for i in range(6)],
                                  "train.gradient_accumulation_steps=1", "train.compile_skip_guards=true")
    train(load_config(None, overrides), RunDir(tmp_path / "run"))
    assert seen["guard_skip"].on and seen["guard_skip"].seen == {(2, 128)}  # three micro-batches of one shape
    calls = len(stances) // 3  # each micro-batch calls every layer the same number of times
    assert calls > 0 and stances == [False] * calls + [True] * (2 * calls)
    assert not skipping_guards()


def test_evaluations_between_steps_leave_the_skipping_steps_equal_to_checked_ones(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    """An evaluation after every step (no gradient, eval mode: graphs of their own, compiled with every guard
    checked) between micro-batches that skip the checks: the same training and evaluation losses as a run
    that checks every call, to the last bit (aot_eager on CPU)."""
    monkeypatch.setattr(compile_module, "BACKEND", BACKEND)
    answers = [f"答{i}です。" * (1 + i % 3) for i in range(9)]
    curves, skips, set_stance = {}, [], torch.compiler.set_stance

    def recording(stance="default", *, skip_guard_eval_unsafe=False, force_backend=None):
        skips.append(skip_guard_eval_unsafe)
        return set_stance(stance, skip_guard_eval_unsafe=skip_guard_eval_unsafe, force_backend=force_backend)

    monkeypatch.setattr(torch.compiler, "set_stance", recording)
    for setting in ("false", "true"):
        torch._dynamo.reset()
        skips.clear()
        overrides = compiled_lora_run(tmp_path, tiny_model_dir, answers, "data.eval_fraction=0.34",
                                      "train.eval_steps=1", "train.logging_steps=1", "train.gradient_accumulation_steps=2",
                                      "train.lora_dropout=0.0", f"train.compile_skip_guards={setting}")
        run = RunDir(tmp_path / f"run-{setting}")
        train(load_config(None, overrides), run)
        curves[setting] = [json.loads(line) for line in run.metrics.read_text().splitlines()]
        # 3 steps × 2 micro-batches of one shape: all but the first skip the checks
        assert skips == ([True] * 5 if setting == "true" else [])
    keys = ("loss", "eval_loss", "grad_norm")
    checked = [{k: r[k] for k in keys if k in r} for r in curves["false"]]
    assert [{k: r[k] for k in keys if k in r} for r in curves["true"]] == checked
    assert sum("eval_loss" in r for r in checked) == 3 and sum("loss" in r for r in checked) == 3
