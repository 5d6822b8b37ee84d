"""tunebench's decode loop (generate.cuda_graphs) gives transformers' generate's greedy answers, token
for token: a Llama (llm-jp-3's architecture) and a Gemma 3 whose sliding window is shorter than the
answers, left padding, repetition penalty, EOS, stop strings. On CPU the step runs without a graph;
on a GPU the same step is captured (bench/generate_speed.py measures it there)."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from tunebench.config import GenerateConfig
from tunebench.generate.engine import Generator, compiles_decode, uses_graph_decode
from tunebench.generate.graph_decode import DecodeSettings, GraphDecode, penalize_repeats, sample
from tunebench.models.trained import load_for_inference

QUESTIONS = ["日本の首都は？", "春の詩を書いてください。長めにお願いします。", "1+1は？", "こんにちは、元気ですか？",
             "おすすめの本を三冊教えてください。"]


def conversations():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def tiny_gemma(tokenizer, sliding_window=6):
    """Gemma 3 with sliding-window layers of `sliding_window` tokens: answers run past the window."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=sliding_window,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, initializer_range=0.3)
    return Gemma3ForCausalLM(config).to(torch.float64).eval()


def answers(generator):
    return [(a.text, a.new_tokens, a.stopped) for a in generator.generate(conversations())]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_the_loop_gives_transformers_greedy_answers_on_llama(tiny_model_dir, penalty):
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    settings = dict(max_new_tokens=20, batch_size=3, repetition_penalty=penalty, stop=[])
    hf = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=False, **settings))
    ours = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=True, **settings))
    calls = []
    real = tiny.model.generate
    tiny.model.generate = lambda **kw: calls.append(1) or real(**kw)
    expected = answers(hf)
    assert len(calls) == 2  # two batches through transformers
    got = answers(ours)
    assert len(calls) == 2  # and none for the loop
    assert got == expected and len({t for t, _, _ in got}) == len(QUESTIONS)


def test_the_loop_follows_a_sliding_window_shorter_than_the_answer(tokenizer):
    model = tiny_gemma(tokenizer)
    prompts = [tokenizer.encode("今日は", add_special_tokens=True), tokenizer.encode("日本の首都はどこですか", add_special_tokens=True)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(p)] for p in prompts])).long()
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                  repetition_penalty=1.2, pad_token_id=0, eos_token_id=[-1])[:, width:]
    settings = DecodeSettings(max_new_tokens=24, eos_ids=(-1,), pad_id=0, repetition_penalty=1.2)
    assert GraphDecode(model, prompts, settings).run() == expected.tolist()
    # the window matters: a model without it answers otherwise
    wide = tiny_gemma(tokenizer, sliding_window=512)
    assert GraphDecode(wide, prompts, settings).run() != expected.tolist()


def test_a_row_that_ends_gets_pad_while_the_others_go_on(tiny_model_dir):
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    prompts = [tiny.tokenizer.encode(q) for q in ("春の詩", "秋の詩を書いて")]
    free = GraphDecode(tiny.model, prompts, DecodeSettings(12, eos_ids=(-1,), pad_id=0)).run()
    eos = (free[0][4], free[1][6])  # the rows end by their fifth and seventh tokens at the latest
    ends = [next(i for i, t in enumerate(row) if t in eos) + 1 for row in free]
    ended = GraphDecode(tiny.model, prompts, DecodeSettings(12, eos_ids=eos, pad_id=0), check_every=4).run()
    for row, end in zip(range(2), ends):
        assert ended[row][:end] == free[row][:end] and set(ended[row][end:]) <= {0}
    assert len(ended[0]) == 8  # the host saw every row done at its check after 8 tokens and stopped


def test_stop_strings_end_rows_at_the_host_check(tiny_model_dir):
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    free = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=False, max_new_tokens=24,
                                                                          stop=[], repetition_penalty=1.0))
    texts = [a.text for a in free.generate(conversations())]
    stops = [t[len(t) // 2] for t in texts[:3] if t.strip()]
    config = dict(max_new_tokens=24, batch_size=5, stop=stops, repetition_penalty=1.0)
    hf = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=False, **config), stop_check_every=None)
    ours = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=True, **config), stop_check_every=5)
    a, b = answers(hf), answers(ours)
    assert a == b and sum(stopped and n < 24 for _, n, stopped in a) >= 3


def test_repetition_penalty_and_sampling_follow_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(1)
    logits = torch.randn(3, 50, dtype=torch.float64)
    ids = torch.randint(0, 50, (3, 7))
    ids[:, -2:] = ids[:, :2]  # a row holds a token more than once (penalised once, as in transformers)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(penalize_repeats(logits.clone(), ids, 1.3), expected, rtol=0, atol=0)
    assert not torch.equal(expected, logits)
    s = DecodeSettings(1, eos_ids=(0,), pad_id=0, do_sample=True, temperature=0.7, top_k=5, top_p=0.6)
    expected = TopPLogitsWarper(0.6)(ids, TopKLogitsWarper(5)(ids, logits / 0.7))
    allowed = expected.isfinite()
    draws = torch.stack([sample(logits, s) for _ in range(400)])  # (draws, rows)
    for row in range(3):
        picked = set(draws[:, row].tolist())
        assert picked <= set(allowed[row].nonzero().flatten().tolist())
        likely = set((expected[row].softmax(-1) > 0.05).nonzero().flatten().tolist())
        assert likely <= picked  # every token of 5% or more came up in 400 draws
        top = expected[row].argmax().item()
        share = (draws[:, row] == top).float().mean().item()
        assert abs(share - expected[row].softmax(-1)[top].item()) < 0.1  # drawn in proportion
    greedy = DecodeSettings(1, eos_ids=(0,), pad_id=0, do_sample=True, top_k=1)
    assert sample(logits, greedy).tolist() == logits.argmax(-1).tolist()


def test_auto_captures_and_compiles_on_a_gpu_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_graph_decode("auto", cuda) and not uses_graph_decode("auto", cpu)
    assert uses_graph_decode(True, cpu) and not uses_graph_decode(False, cuda)
    long_job = 6000
    assert compiles_decode("auto", cuda, 270_000_000, long_job) and not compiles_decode("auto", cpu, 270_000_000, long_job)
    assert not compiles_decode("auto", cuda, 270_000_000, 2000)  # the compile costs more than it saves
    assert not compiles_decode("auto", cuda, 13_000_000_000, long_job)  # memory-bound: compiling only costs
    assert compiles_decode(True, cpu, 13_000_000_000) and not compiles_decode(False, cuda, 270_000_000, long_job)
    # a model whose layers the loop runs through its own Triton kernels: its uncompiled step is the faster one
    assert not compiles_decode("auto", cuda, 270_000_000, long_job, fused_kernels=True)
    assert compiles_decode(True, cuda, 270_000_000, 1, fused_kernels=True)


def test_only_a_small_gemma_on_a_gpu_with_triton_counts_as_fused(tokenizer, tiny_model_dir, monkeypatch):
    from tunebench.generate import decode_attention_kernels, decode_fused_layers
    from tunebench.generate.decode_fused_layers import fused_kernels

    gemma, cuda = tiny_gemma(tokenizer).to(torch.bfloat16), torch.device("cuda")
    gemma.config._attn_implementation = "sdpa"
    monkeypatch.setattr(decode_attention_kernels, "triton_kernels", lambda: ("kernels",))
    assert fused_kernels(gemma, cuda) and not fused_kernels(gemma, torch.device("cpu"))
    assert not fused_kernels(gemma.float(), cuda)  # the kernels take bf16/fp16: fp32 runs torch operations
    gemma.to(torch.bfloat16).config._attn_implementation = "eager"  # attention the loop does not switch
    assert not fused_kernels(gemma, cuda)
    gemma.config._attn_implementation = "sdpa"
    llama = load_for_inference(str(tiny_model_dir)).model
    assert not fused_kernels(llama, cuda)  # no fused layers for its architecture
    monkeypatch.setattr(decode_fused_layers, "FUSE_BELOW_PARAMETERS", 1000)
    assert not fused_kernels(gemma, cuda)
    monkeypatch.setattr(decode_fused_layers, "FUSE_BELOW_PARAMETERS", 600_000_000)
    gemma.config.head_dim = 24  # tl.arange needs a power of two
    assert not fused_kernels(gemma, cuda)
    gemma.config.head_dim = 16
    assert fused_kernels(gemma, cuda)
    monkeypatch.setattr(decode_attention_kernels, "triton_kernels", lambda: None)
    assert not fused_kernels(gemma, cuda)  # without Triton the fused layers run torch operations


def test_generate_decides_compiling_by_the_whole_job_not_each_batch(tiny_model_dir, monkeypatch):
    from tunebench.generate import engine

    seen = []
    monkeypatch.setattr(engine, "compiles_decode",
                        lambda setting, device, parameters, prompts=1, fused=False: seen.append(prompts) or False)
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    config = GenerateConfig(cuda_graphs=True, max_new_tokens=4, batch_size=2, stop=[])
    generator = Generator(tiny.model, tiny.tokenizer, "course", config)
    generator.generate(conversations())
    assert len(seen) >= 3 and set(seen) == {len(QUESTIONS)}  # three batches, each told the job's five prompts
    seen.clear()
    generator.generate_batch([tiny.tokenizer.encode(QUESTIONS[0])])  # serve's one request: a job of one
    assert seen == [1]


def test_whether_the_kernels_run_is_decided_once_per_generator(tiny_model_dir, monkeypatch):
    """generate.compile auto asks whether the loop runs the model's layers through its Triton kernels (a walk
    over the model's modules and parameters): once per generator, not for every batch."""
    from tunebench.generate import engine

    asked = []
    monkeypatch.setattr(engine, "fused_kernels", lambda model, device: asked.append(device) or False)
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    generator = Generator(tiny.model, tiny.tokenizer, "course",
                          GenerateConfig(cuda_graphs=True, compile="auto", max_new_tokens=4, batch_size=2, stop=[]))
    generator.generate(conversations())  # three batches
    generator.generate_batch([tiny.tokenizer.encode(QUESTIONS[0])])
    assert asked == [torch.device("cpu")]


def test_a_failing_capture_falls_back_under_auto_and_is_raised_under_true(tiny_model_dir, monkeypatch, caplog):
    from tunebench.generate import engine

    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    settings = dict(max_new_tokens=6, batch_size=2, compile=False)
    expected = answers(Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=False, **settings)))
    monkeypatch.setattr(engine, "uses_graph_decode", lambda setting, device: setting is not False)  # as on a GPU
    calls = []

    def capture_fails(self):
        calls.append(1)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nlong traceback")

    monkeypatch.setattr(GraphDecode, "run", capture_fails)
    auto = Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs="auto", **settings))
    assert answers(auto) == expected and calls == [1]  # tried once, then transformers' generate
    assert "generate.cuda_graphs: the captured decode step failed (RuntimeError: CUDA error" in caplog.text
    auto.with_settings(max_new_tokens=4).generate(conversations())  # a per-request copy (serve, the judge)
    assert calls == [1] and caplog.text.count("the captured decode step failed") == 1  # not tried again
    with pytest.raises(RuntimeError, match="stream is capturing"):
        Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=True, **settings)).generate(conversations())


def test_compiled_decode_layers_give_the_same_answers_and_a_failing_compile_decodes_uncompiled(
        tiny_model_dir, monkeypatch, caplog):
    from tunebench.generate import decode_compile
    from tunebench.generate.decode_compile import DecodeStepLayer
    from tunebench.train.compile import decoder_layers

    monkeypatch.setattr(decode_compile, "BACKEND", "aot_eager")  # dynamo's tracing without code generation
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    prompts = [tiny.tokenizer.encode(q) for q in QUESTIONS[:3]]
    settings = DecodeSettings(12, eos_ids=(-1,), pad_id=0, repetition_penalty=1.2)
    expected = GraphDecode(tiny.model, prompts, settings).run()
    assert GraphDecode(tiny.model, prompts, settings, compile=True).run() == expected
    steps = [layer._tunebench_decode_step for layer in decoder_layers(tiny.model)]
    assert all(isinstance(s, DecodeStepLayer) and s.compiled_calls == 11 for s in steps)  # the decode steps only
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(tiny.model))  # eager again after
    # a compile that fails under generate.compile: auto: warned once, the loop runs uncompiled
    config = GenerateConfig(cuda_graphs=True, compile="auto", max_new_tokens=12, batch_size=3, stop=[])
    reference = answers(Generator(tiny.model, tiny.tokenizer, "course", config))

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no working C compiler")

    for step in steps:
        monkeypatch.setattr(step, "compiled", broken)
    from tunebench.generate import engine

    monkeypatch.setattr(engine, "compiles_decode",
                        lambda setting, device, parameters, prompts=1, fused=False: setting is not False)  # a GPU, a long job
    generator = Generator(tiny.model, tiny.tokenizer, "course", config)
    assert answers(generator) == reference
    assert generator.fallbacks.compile_failed and not generator.fallbacks.graphs_failed
    assert caplog.text.count("generate.compile: the compiled decode step failed (RuntimeError: InductorError") == 1


def test_min_new_tokens_holds_the_end_back_as_transformers_does(tiny_model_dir):
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    prompt = tiny.tokenizer.encode("春の詩")
    free = GraphDecode(tiny.model, [prompt], DecodeSettings(10, eos_ids=(-1,), pad_id=0, repetition_penalty=1.2)).run()[0]
    eos = free[1]  # without holding back, the answer ends at its second token
    unheld = GraphDecode(tiny.model, [prompt], DecodeSettings(10, eos_ids=(eos,), pad_id=0, repetition_penalty=1.2),
                         check_every=1).run()[0]
    assert unheld == free[:2]
    with torch.no_grad():
        expected = tiny.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=6,
                                       do_sample=False, repetition_penalty=1.2, pad_token_id=0, eos_token_id=eos)
    settings = DecodeSettings(10, eos_ids=(eos,), pad_id=0, repetition_penalty=1.2, min_new_tokens=6)
    got = GraphDecode(tiny.model, [prompt], settings, check_every=1).run()[0]
    assert got == expected[0, len(prompt):].tolist()[: len(got)] and len(got) >= 6 and eos not in got[:6]


def test_grouped_decode_attention_equals_sdpa_over_repeated_heads(tiny_model_dir):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tunebench.generate.decode_attention import NAME, decode_attention, grouped_decode_attention

    torch.manual_seed(0)
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.is_causal = 3, True
    query = torch.randn(4, 6, 1, 8, dtype=torch.float64)
    key, value = torch.randn(4, 2, 10, 8, dtype=torch.float64), torch.randn(4, 2, 10, 8, dtype=torch.float64)
    mask = torch.rand(4, 1, 1, 10) > 0.3
    mask[:, :, :, 0] = True  # every row sees at least one position
    got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(got, expected)
    bias = torch.zeros(4, 1, 1, 10, dtype=torch.float64).masked_fill(~mask, float("-inf"))  # an additive mask
    torch.testing.assert_close(grouped_decode_attention(module, query, key, value, bias, scaling=0.3)[0], expected)
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    with decode_attention(tiny.model):
        assert tiny.model.config._attn_implementation == NAME
    assert tiny.model.config._attn_implementation == "sdpa"  # switched back after the loop


def test_dropping_finished_rows_changes_no_answer(tiny_model_dir):
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    prompts = [tiny.tokenizer.encode(q) for q in QUESTIONS]
    free = GraphDecode(tiny.model, prompts, DecodeSettings(16, eos_ids=(-1,), pad_id=0, repetition_penalty=1.2)).run()
    # rows 0-3 end within their first three tokens, row 4 (which holds none of those ends) runs on
    eos = tuple(next(t for t in row[:3] if t not in free[4]) for row in free[:4])
    settings = DecodeSettings(16, eos_ids=eos, pad_id=0, repetition_penalty=1.2)
    whole = GraphDecode(tiny.model, prompts, settings, check_every=4, compact_below=0.0)
    compacted = GraphDecode(tiny.model, prompts, settings, check_every=4, compact_below=0.25, compact_min_rows=2)
    expected, got = whole.run(), compacted.run()
    assert got == expected and whole.compactions == 0 and compacted.compactions == 1
    assert compacted.generated.shape[0] == 1 and len(got[4]) == 16 and all(set(row[3:]) == {0} for row in got[:4])


def test_the_compiled_layers_share_their_graphs_whatever_the_number_of_layers(monkeypatch):
    """The cache update takes each layer's index: compiled with it, every layer would be a graph of its
    own (and past dynamo's recompile limit, eager). Kept out, 2 and 4 layers compile the same graphs."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunebench.generate import decode_compile

    monkeypatch.setattr(decode_compile, "BACKEND", "aot_eager")
    graphs = {}
    for layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
        settings = DecodeSettings(6, eos_ids=(-1,), pad_id=0, repetition_penalty=1.2)
        prompts = [[1, 5, 6], [1, 7], [1, 9, 9, 9]]  # 3 rows: no size that dynamo could tie to the 2 heads
        assert GraphDecode(model, prompts, settings, compile=True).run() == GraphDecode(model, prompts, settings).run()
        graphs[layers] = counters["stats"]["unique_graphs"]
        GraphDecode(model, [[1, 8, 9, 10, 4], [1, 11], [1, 12], [1, 5], [1, 6]], settings, compile=True).run()
        assert counters["stats"]["unique_graphs"] == graphs[layers]  # another batch reuses them
    assert graphs[2] == graphs[4] > 0


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prefix_and_prompt_tuned_models_answer_through_transformers(tiny_model_dir, monkeypatch, kind):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    config = (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(task_type="CAUSAL_LM", num_virtual_tokens=4)
    torch.manual_seed(0)
    model = get_peft_model(tiny.model, config).eval()
    settings = dict(max_new_tokens=6, batch_size=5, stop=[])
    expected = answers(Generator(model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=False, **settings)))
    monkeypatch.setattr(GraphDecode, "run", lambda self: pytest.fail("the loop has no room for virtual tokens"))
    assert answers(Generator(model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=True, **settings))) == expected


def test_a_model_whose_generation_config_the_loop_cannot_follow_answers_through_transformers(tiny_model_dir, monkeypatch):
    from tunebench.generate.engine import loop_unsupported

    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float64)
    assert loop_unsupported(tiny.model) == []
    settings = dict(max_new_tokens=6, batch_size=5, stop=[])
    plain = answers(Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=False, **settings)))
    tiny.model.generation_config.suppress_tokens = [tiny.tokenizer.encode(plain[0][0], add_special_tokens=False)[0]]
    assert loop_unsupported(tiny.model) == ["suppress_tokens"]
    expected = answers(Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=False, **settings)))
    assert expected != plain  # the suppressed token changes the first answer
    monkeypatch.setattr(GraphDecode, "run", lambda self: pytest.fail("the loop does not suppress tokens"))
    assert answers(Generator(tiny.model, tiny.tokenizer, "course", GenerateConfig(cuda_graphs=True, **settings))) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (bench/generate_speed.py)")
def test_captured_steps_and_a_recapture_after_dropping_rows_equal_the_eager_loop(tiny_model_dir):
    tiny = load_for_inference(str(tiny_model_dir), dtype=torch.float32)
    model = tiny.model.cuda()
    prompts = [tiny.tokenizer.encode(q) for q in QUESTIONS]
    free = GraphDecode(model, prompts, DecodeSettings(24, eos_ids=(-1,), pad_id=0), use_graph=False).run()
    eos = tuple(next(t for t in row[:3] if t not in free[4]) for row in free[:4])
    settings = DecodeSettings(24, eos_ids=eos, pad_id=0, repetition_penalty=1.2)
    eager = GraphDecode(model, prompts, settings, check_every=4, compact_min_rows=2, use_graph=False)
    captured = GraphDecode(model, prompts, settings, check_every=4, compact_min_rows=2, use_graph=True)
    assert captured.run() == eager.run() and captured.compactions == eager.compactions == 1
