"""train.compile: compiled decoder layers give eager's loss and LoRA gradients, a bounded number of
graphs over steps of varying length, bucket padding that changes no loss, and clear refusals.

The tests compile with backend "aot_eager": dynamo's tracing and AOT autograd's forward/backward
split (where checkpointing, peft and guards interact with compilation) run exactly as with
inductor, without inductor's C++ code generation, which takes ~90 s for these tiny layers on this
machine's shared cores (measured: inductor on CPU gives the same loss and gradients within 2e-6).
"""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from tunebench.config import TrainConfig, load_config
from tunebench.config_checks import config_problems
from tunebench.data.batches import join_examples, pad_batch
from tunebench.errors import ConfigError
from tunebench.runs import RunDir
from tunebench.train import compile as compile_module
from tunebench.train.compile import bucket_batch, compile_layers, compile_options, use_compile, use_graphs
from tunebench.train.loss import token_loss_sum
from tunebench.train.methods import make_trainable
from tunebench.train.preference import pair_micro_batches, sequence_logps
from tunebench.train.sft import train

BACKEND = "aot_eager"


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def lora_model(model_dir=None, kind="tiny", dora=False):
    """fp32 LoRA with gradient checkpointing; lora_B moved off zero so every LoRA gradient is non-zero."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":  # a small vocabulary: full logits are cheap
        model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    elif kind == "gemma3":  # alternating sliding-window and global layers: two layer graphs
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2,
            pad_token_id=0))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = make_trainable(model, TrainConfig(method="lora", lora_dropout=0.0, use_dora=dora))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    return model


def joined_batches(lengths, vocab=320, seed=1):
    """One joined row per length (examples of 10-60 tokens, prompt positions -100), padded as the loop pads it."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for total in lengths:
        rows, left = [], total
        while left > 0:
            k = min(left, int(torch.randint(10, 60, (1,), generator=gen)))
            ids = torch.randint(1, vocab, (k,), generator=gen).tolist()
            rows.append({"input_ids": ids, "labels": [-100] * min(3, k) + ids[3:]})
            left -= k
        out.append(pad_batch(join_examples(rows, 1 << 30), 0))
    return out


def losses_and_grads(model, batches, answer_only_logits=True):
    losses = []
    for batch in batches:
        loss = token_loss_sum(model, batch, answer_only_logits)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_layers_give_eager_loss_and_lora_gradients_with_checkpointing(tiny_model_dir):
    """fp32, gradient checkpointing on, the tiny Llama with Gemma's vocabulary. Tolerance: rtol 1e-5 on the
    loss and 1e-5 of the largest value on each gradient. aot_eager runs the same aten ops (equal here to the
    last bit); inductor fuses and reorders fp32 sums, which moves results by ~1e-6 relative (measured 2e-6);
    a real defect (a token attending across examples, a missed layer, wrong padding) moves them by 1e-3 or more."""
    batches = [bucket_batch(b, 0) for b in joined_batches([150, 300, 200], vocab=5000)]
    eager_losses, eager_grads = losses_and_grads(lora_model(tiny_model_dir), batches)
    model = lora_model(tiny_model_dir)
    assert compile_layers(model, backend=BACKEND) == 2
    losses, grads = losses_and_grads(model, batches)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # compiled, not eager
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=0)
    assert len(grads) == 2 * 7 * 2  # 2 layers × 7 linears × (A, B)
    for name, grad in grads.items():
        scale = float(eager_grads[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


LENGTHS = [150, 300, 200, 260, 90, 500, 420, 333, 47, 128]  # ten lengths, four buckets of 128


@pytest.mark.parametrize("kind, variants", [("llama", 1), ("gemma3", 2)])
def test_graphs_stay_bounded_over_steps_of_varying_length(kind, variants):
    """Ten steps of ten different joined lengths: the first length compiles static graphs, the first
    recompile makes the length symbolic (dynamo's automatic dynamic shapes), and every later length reuses
    it: at most two graphs per layer variant (Gemma 3 alternates sliding and global attention)."""
    model = lora_model(kind=kind)
    compile_layers(model, backend=BACKEND)
    batches = [bucket_batch(b, 0) for b in joined_batches(LENGTHS)]
    assert {b["input_ids"].shape[1] for b in batches} == {128, 256, 384, 512}
    losses_and_grads(model, batches, answer_only_logits=False)
    assert not counters["graph_break"]
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 * variants, dict(counters["stats"])


def test_buckets_bound_the_graphs_even_with_static_shapes():
    """With automatic dynamic shapes off (or a model whose code specialises on the length), the buckets are
    the bound: one graph per bucket (4), not one per length (10)."""
    model = lora_model(kind="llama")
    compile_layers(model, backend=BACKEND)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        losses_and_grads(model, [bucket_batch(b, 0) for b in joined_batches(LENGTHS)], answer_only_logits=False)
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])


def test_bucket_padding_changes_no_loss_or_response_logprob(tiny_model_dir):
    """The padding is one more example (position ids from 0, labels -100): the same SFT loss, and the same
    per-response log-probs of joined preference pairs (the padding segment carries none)."""
    model = lora_model(tiny_model_dir)
    for batch in joined_batches([150, 300], vocab=5000):
        padded = bucket_batch(batch, 0)
        assert padded["input_ids"].shape[1] % 128 == 0 and padded["input_ids"].shape[1] > batch["input_ids"].shape[1]
        with torch.no_grad():
            torch.testing.assert_close(token_loss_sum(model, padded), token_loss_sum(model, batch), rtol=1e-6, atol=0)
    gen = torch.Generator().manual_seed(5)

    def side(n):
        ids = torch.randint(1, 5000, (n,), generator=gen).tolist()
        return {"input_ids": ids, "labels": [-100] * 4 + ids[4:]}
    pairs = [{"chosen": side(20), "rejected": side(25)}, {"chosen": side(30), "rejected": side(12)}]
    (batch, _), = pair_micro_batches([pairs], 0, step_tokens=1000)
    batch["reference"] = torch.zeros(2, 2)
    padded = bucket_batch(batch, 0)
    assert torch.equal(padded["reference"], batch["reference"])  # no sequence axis: passed through
    with torch.no_grad():
        sums, counts = sequence_logps(model, batch, True)
        padded_sums, padded_counts = sequence_logps(model, padded, True)
    assert torch.equal(counts, padded_counts) and len(counts) == 4
    torch.testing.assert_close(padded_sums, sums, rtol=1e-6, atol=0)


def test_bucket_padding_of_padded_rows_masks_the_padding():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}], 0)
    padded = bucket_batch(batch, 0, multiple=16)
    assert padded["input_ids"].shape == (2, 16)
    assert padded["attention_mask"].sum(1).tolist() == [3, 1]
    assert (padded["labels"][:, 8:] == -100).all() and (padded["input_ids"][:, 8:] == 0).all()
    assert bucket_batch(padded, 0, multiple=16) is padded


def test_dora_layers_compiled_give_eager_loss(tiny_model_dir):
    """DoRA with train.compile: true: the loss and gradients stay eager's. peft's DoRA layer breaks dynamo's
    graph (a cache dict cleared inside the checkpointed forward), so the layer runs eagerly: no gain, which is
    why auto leaves compile off for DoRA; this checks it is never wrong."""
    batches = [bucket_batch(b, 0) for b in joined_batches([150, 200], vocab=5000)]
    eager_losses, eager_grads = losses_and_grads(lora_model(tiny_model_dir, dora=True), batches)
    model = lora_model(tiny_model_dir, dora=True)
    compile_layers(model, backend=BACKEND)
    losses, grads = losses_and_grads(model, batches)
    assert counters["graph_break"]  # if peft's DoRA becomes traceable, auto can turn compile on for it
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-5 * float(eager_grads[name].abs().max()))


def test_auto_is_on_for_cuda_only_and_yields_to_fsdp():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_compile("auto", cuda, sharded=False) is True  # offload or not: see test_offload.py
    assert use_compile("auto", cpu, sharded=False) is False  # CPU: launches are cheap
    assert use_compile(True, cpu, sharded=False) is True  # true on CPU works (inductor's C++)
    assert use_compile("auto", cuda, sharded=True) is False
    assert use_compile(False, cuda, sharded=False) is False
    assert use_compile("auto", cuda, sharded=False, dora=True) is False  # no gain: see below
    assert use_compile("auto", cuda, sharded=False, virtual_tokens=True) is False  # not measured
    assert use_compile(True, cuda, sharded=False, virtual_tokens=True) is True
    assert use_compile(True, cuda, sharded=False, dora=True) is True
    with pytest.raises(ConfigError, match="train.compile: it does not work with train.sharding fsdp"):
        use_compile(True, cuda, sharded=True)


def test_compile_true_on_cpu_without_a_cpp_compiler_says_what_to_install(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_module.shutil, "which", lambda _name: None)
    with pytest.raises(ConfigError, match="needs a C.. compiler for inductor"):
        use_compile(True, torch.device("cpu"), sharded=False)
    assert use_compile("auto", torch.device("cpu"), sharded=False) is False  # auto never needs one


def test_config_takes_compile_with_offload_refuses_it_with_fsdp_and_reads_auto():
    assert load_config(None, []).train.compile == "auto"  # measured on an H200: docs/PERFORMANCE.md
    assert load_config(None, ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="'train.compile'"):
        load_config(None, ["train.compile=sometimes"])
    both = load_config(None, ["train.compile=true", "train.offload_frozen=true"]).train  # test_offload.py: equal
    assert both.compile is True and both.offload_frozen is True
    fsdp = load_config(None, ["train.compile=true", "train.sharding=fsdp"])  # one process trains unsharded
    assert any("'train.compile'" in p and "fsdp" in p for p in config_problems(fsdp, 2))


def test_train_with_compile_true_on_cpu_matches_eager_and_logs_compile_time(tmp_path, tiny_model_dir, monkeypatch):
    """`tunebench train` with train.compile: true on CPU: the same losses as compile: false, compile time in
    metrics.jsonl (compile_s) and not in tokens/s."""
    monkeypatch.setattr(compile_module, "BACKEND", BACKEND)
    data = tmp_path / "memo.jsonl"
    rows = [{"instruction": "日本の首都はどこですか？", "input": "", "output": "東京です。"},
            {"instruction": "一足す一は？", "input": "", "output": "二です。"},
            {"instruction": "空の色は？", "input": "", "output": "青です。"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    curves, saved = {}, {}
    for setting in ("false", "true"):
        config = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.sources=[{{path: '{data}'}}]",
                                    "data.contamination_sets=[]", "train.per_device_train_batch_size=2",
                                    "train.gradient_accumulation_steps=1", "train.warmup_steps=0",
                                    "train.logging_steps=1", "train.lora_dropout=0.0", "train.max_steps=3", "train.method=lora",
                                    f"train.compile={setting}"])
        run = RunDir(tmp_path / f"run-{setting}")
        adapter = train(config, run)
        curves[setting] = [json.loads(line) for line in run.metrics.read_text().splitlines()]
        saved[setting] = load_file(adapter / "adapter_model.safetensors")
    eager, compiled = curves["false"], curves["true"]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-5)
    assert compiled[0]["compile_s"] > 0 and "compile_s" not in eager[0]
    assert all(r["tokens_per_s"] > 0 for r in compiled)
    # compiled in place: the adapter is saved under the same names (no _orig_mod), with eager's values
    assert saved["true"].keys() == saved["false"].keys()
    for name, tensor in saved["true"].items():
        torch.testing.assert_close(tensor, saved["false"][name], rtol=1e-4, atol=1e-6)


def broken_compiler(_graph, _inputs):
    raise RuntimeError("no compiler for this device")


def broken_backward_compiler():
    """A backend whose forward compiles and whose backward (compiled lazily, at the first backward) fails."""
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=lambda graph, _inputs: graph, bw_compiler=broken_compiler)


@pytest.mark.parametrize("fails_in", ["forward", "backward"])
def test_a_compile_failure_trains_on_eagerly_under_auto_and_stops_the_run_under_true(tmp_path, tiny_model_dir,
                                                                                     monkeypatch, caplog, fails_in):
    """train.compile auto is the default on CUDA: a GPU without Triton or a layer dynamo cannot handle must not
    stop a run that eager training would finish. `true` insists: the failure is raised."""
    import tunebench.train.setup as setup_module

    monkeypatch.setattr(setup_module, "use_compile", lambda setting, *a, **k: setting in ("auto", True))  # as on CUDA
    monkeypatch.setattr(compile_module, "BACKEND", broken_compiler if fails_in == "forward" else broken_backward_compiler())
    data = tmp_path / "memo.jsonl"
    rows = [{"instruction": "日本の首都はどこですか？", "input": "", "output": "東京です。"},
            {"instruction": "一足す一は？", "input": "", "output": "二です。"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    def config(setting):
        return load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.sources=[{{path: '{data}'}}]",
                                  "data.contamination_sets=[]", "train.per_device_train_batch_size=2",
                                  "train.gradient_accumulation_steps=1", "train.warmup_steps=0", "train.logging_steps=1",
                                  "train.lora_dropout=0.0", "train.max_steps=2", "train.method=lora",
                                  f"train.compile={setting}"])

    eager = RunDir(tmp_path / "eager")
    train(config("false"), eager)
    fallen = RunDir(tmp_path / "auto")
    with caplog.at_level("WARNING"):
        train(config("auto"), fallen)
    assert "train.compile auto: the compiled decoder layers failed" in caplog.text
    assert "no compiler for this device" in caplog.text
    losses = [[json.loads(line)["loss"] for line in run.metrics.read_text().splitlines()] for run in (eager, fallen)]
    assert len(losses[1]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-6)  # the failed step is not counted twice
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no compiler for this device"):
        train(config("true"), RunDir(tmp_path / "true"))


def test_a_checkpoint_around_the_compiled_layer_ends_its_recompute_early_without_a_fallback():
    """A checkpoint around a compiled layer's call (transformers 5.17 put one there, before compile_layer
    took the checkpointing inside): non-re-entrant checkpointing's early stop (an exception raised once the
    recompute has saved what the backward needs) passes through the layer. It is control flow, not a compile
    failure; taken for one, the run fell back to eager in the middle of a recompute and crashed."""
    from torch.utils.checkpoint import checkpoint

    from tunebench.train.compile import CompiledLayer, EagerFallback

    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    layer.load_state_dict(eager.state_dict())
    layer.compile(backend=BACKEND)
    fallback = EagerFallback()
    CompiledLayer(layer, fallback)
    x = torch.randn(4, 8, requires_grad=True)
    for module in (eager, layer):
        checkpoint(module, x, use_reentrant=False).pow(2).sum().backward()
    assert not fallback.failed
    for mine, theirs in zip(layer.parameters(), eager.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=1e-7)



def test_cuda_graphs_need_a_gpu_compiled_layers_no_checkpointing_and_no_offload():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_graphs("auto", cuda, True, checkpointing=False, offload=False, world=1, objective="sft") is True
    assert use_graphs(True, cuda, True, False, False, world=2, objective="dpo") is True  # true insists
    assert use_graphs("auto", cuda, True, False, False, world=2, objective="sft") is False  # not measured
    assert use_graphs("auto", cuda, True, False, False, world=1, objective="dpo") is False
    assert use_graphs(False, cuda, True, False, False, 1, "sft") is False
    for device, compiled, checkpointing, offload, why in [
            (cpu, True, False, False, "needs a CUDA GPU"), (cuda, False, False, False, "train.compile is off"),
            (cuda, True, True, False, "gradient checkpointing calls each layer again"),
            (cuda, True, False, True, "offload_frozen moves the layers' weights")]:
        assert use_graphs("auto", device, compiled, checkpointing, offload, 1, "sft") is False
        with pytest.raises(ConfigError, match=f"train.cuda_graphs: .*{why}"):
            use_graphs(True, device, compiled, checkpointing, offload, 1, "sft")
    with pytest.raises(ConfigError, match="'train.cuda_graphs': true needs"):
        load_config(None, ["train.cuda_graphs=true", "train.gradient_checkpointing=true"])
    assert load_config(None, ["train.cuda_graphs=true"]).train.cuda_graphs is True  # checkpointing auto


def test_compile_options_reach_every_layer(monkeypatch):
    """train.cuda_graphs becomes an inductor option of each layer's compile."""
    model = lora_model(kind="gemma3")
    seen, original = [], torch.nn.Module.compile

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("options"))
        original(self, backend=BACKEND)

    monkeypatch.setattr(torch.nn.Module, "compile", recording)
    compile_layers(model, backend="inductor", options=compile_options(graphs=True))
    assert seen == [{"triton.cudagraphs": True}] * 4
    assert compile_options() is None


def test_each_micro_batch_and_each_eval_tells_the_graphs_a_new_step_begins(tmp_path, tiny_model_dir, monkeypatch):
    """With train.cuda_graphs the loop marks every forward as a new step (inductor's graphs would otherwise
    take the last forward's outputs to be in use); without, it never does."""
    import tunebench.train.setup as setup_module

    monkeypatch.setattr(compile_module, "BACKEND", BACKEND)
    monkeypatch.setattr(compile_module, "compile_options", lambda *_a: None)  # aot_eager takes no options
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    data = tmp_path / "memo.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"問{i}", "input": "", "output": f"答{i}です。"},
                                       ensure_ascii=False) + "\n" for i in range(6)), encoding="utf-8")
    overrides = [f"model.name_or_path={tiny_model_dir}", f"data.sources=[{{path: '{data}'}}]",
                 "data.contamination_sets=[]", "data.eval_fraction=0.34", "train.per_device_train_batch_size=2",
                 "train.gradient_accumulation_steps=2", "train.step_tokens=null", "train.max_steps=2",
                 "train.method=lora", "train.compile=true"]
    resolve = setup_module.resolve_levers
    for graphs in (True, False):
        monkeypatch.setattr(setup_module, "resolve_levers",
                            lambda *a, graphs=graphs, **k: replace(resolve(*a, **k), cuda_graphs=graphs))
        marks.clear()
        train(load_config(None, overrides), RunDir(tmp_path / f"run-{graphs}"))
        assert len(marks) == (2 * 2 + 1 if graphs else 0)  # 2 steps × 2 micro-batches, one eval at the end

