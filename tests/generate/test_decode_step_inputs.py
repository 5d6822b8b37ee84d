"""What the decode loop hands the model in place of transformers' own per-step work: masks built from
its bookkeeping (decode_masks.py), cos/sin from a table (decode_rotary.py), the KV cache written at its
slot (GraphDecode.slot_writes). Each step's logits are held bit for bit against the same loop with
transformers building the masks and writing the cache (fp64, CPU); test_graph_decode.py holds whole
answers against transformers' generate."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig

from tunebench.generate import decode_masks, graph_decode
from tunebench.generate.decode_masks import mask_kind
from tunebench.generate.decode_rotary import rotary_tables
from tunebench.generate.graph_decode import DecodeSettings, GraphDecode

from .test_graph_decode import tiny_gemma

SETTINGS = DecodeSettings(max_new_tokens=14, eos_ids=(-1,), pad_id=0, repetition_penalty=1.2)


def step_logits(model, prompts, monkeypatch, masks=True, window_shift=0):
    """Every step's logits and the answers of one loop run (no graph, CPU)."""
    seen = []
    decode = GraphDecode(model, prompts, SETTINGS, use_graph=False)
    choose = decode.choose
    decode.choose = lambda logits: seen.append(logits.clone()) or choose(logits)
    with monkeypatch.context() as patch:
        if not masks:
            patch.setattr(graph_decode, "mask_kind", lambda model: None)
        if window_shift:
            real = decode_masks.StepMasks.__init__

            def shifted(self, *args, **kwargs):
                real(self, *args, **kwargs)
                self.window += window_shift
            patch.setattr(decode_masks.StepMasks, "__init__", shifted)
        answers = decode.run()
    return torch.stack(seen), answers, decode


def prompts_of(tokenizer):
    return [tokenizer.encode("今日は", add_special_tokens=True), tokenizer.encode("日本の首都はどこですか", add_special_tokens=True)]


def test_the_loop_masks_and_cache_writes_give_transformers_logits_on_gemma(tokenizer, monkeypatch):
    model = tiny_gemma(tokenizer)  # sliding window of 6 tokens, answers of 14: the window moves every step
    prompts = prompts_of(tokenizer)
    ours, answers, decode = step_logits(model, prompts, monkeypatch)
    assert decode.masks is not None and decode.masks.kind == "dict"
    theirs, their_answers, plain = step_logits(model, prompts, monkeypatch, masks=False)
    assert plain.masks is None
    assert torch.equal(ours, theirs) and answers == their_answers
    # the comparison sees the window: one slot more or less changes the logits
    for shift in (1, -1):
        wrong, _, _ = step_logits(model, prompts, monkeypatch, window_shift=shift)
        assert not torch.equal(wrong, theirs)


def test_the_loop_masks_and_cache_writes_give_transformers_logits_on_llama(tokenizer, monkeypatch):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3, pad_token_id=0)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    prompts = prompts_of(tokenizer)
    ours, answers, decode = step_logits(model, prompts, monkeypatch)
    assert decode.masks.kind == "tensor"
    theirs, their_answers, _ = step_logits(model, prompts, monkeypatch, masks=False)
    assert torch.equal(ours, theirs) and answers == their_answers


def test_masks_are_left_to_transformers_where_the_loop_does_not_know_the_model(tokenizer):
    mistral = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    from transformers import MistralForCausalLM

    model = MistralForCausalLM(mistral)
    assert mask_kind(model) is None  # a sliding window the dict of masks cannot carry to it
    mistral.sliding_window = None
    assert mask_kind(model) == "tensor"
    gemma = tiny_gemma(tokenizer)
    assert mask_kind(gemma) == "dict"
    gemma.config.use_bidirectional_attention = True
    assert mask_kind(gemma) is None
    from transformers import FalconConfig, FalconForCausalLM  # its ALiBi reads the 2-D padding mask

    falcon = FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            alibi=True))
    assert mask_kind(falcon) is None


@pytest.mark.parametrize("kind", ["gemma", "llama", "llama-dynamic"])
def test_rotary_tables_give_the_module_own_cos_and_sin(tokenizer, kind):
    if kind == "gemma":
        model = tiny_gemma(tokenizer)
    else:
        rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0} if kind == "llama-dynamic" else None
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             **({"rope_parameters": rope} if rope else {}))
        model = LlamaForCausalLM(config).to(torch.float64)
    rotary = model.model.rotary_emb
    layer_types = sorted(set(getattr(model.config, "layer_types", None) or [])) or [None]
    positions = torch.tensor([[3, 4, 5], [0, 17, 39]])
    x = torch.empty(0, dtype=torch.float64)
    extra = lambda t: [t] if t is not None else []  # noqa: E731
    expected = {t: rotary(x, positions, *extra(t)) for t in layer_types}
    with rotary_tables(model, 40, torch.float64) as switched:
        got = {t: rotary(x, positions, *extra(t)) for t in layer_types}
        assert "forward" in vars(rotary) or kind == "llama-dynamic"
    assert switched == (0 if kind == "llama-dynamic" else 1)  # dynamic scaling depends on the length: not tabled
    for t in layer_types:
        assert torch.equal(got[t][0], expected[t][0]) and torch.equal(got[t][1], expected[t][1])
    assert "forward" not in vars(rotary) and "rotary_table" not in vars(rotary)


def test_fused_gemma_layers_give_the_layers_own_logits(tokenizer, monkeypatch):
    from contextlib import nullcontext

    from tunebench.generate import decode_fused_layers

    model = tiny_gemma(tokenizer)
    prompts = prompts_of(tokenizer)
    calls = []
    real = decode_fused_layers.one_token_attention
    monkeypatch.setattr(decode_fused_layers, "one_token_attention",
                        lambda self, *a, **k: calls.append((a or [k.get("hidden_states")])[0].shape[1])
                        or real(self, *a, **k))
    fused, answers, _ = step_logits(model, prompts, monkeypatch)
    assert calls.count(1) == 2 * (SETTINGS.max_new_tokens - 1)  # both layers, every decode step
    monkeypatch.setattr(graph_decode, "fused_layers", lambda model: nullcontext())
    unfused, their_answers, _ = step_logits(model, prompts, monkeypatch)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-12)
    assert answers == their_answers
    # the comparison sees the rotary embedding: sin with the wrong half negated changes the logits
    monkeypatch.undo()
    monkeypatch.setattr(decode_fused_layers.SignedSin, "__call__", lambda self, sin: sin * -self.sign)
    wrong, _, _ = step_logits(model, prompts, monkeypatch)
    assert (wrong - unfused).abs().max() > 1e-6


def test_large_models_and_other_projections_keep_their_layers(tokenizer, monkeypatch):
    from tunebench.generate import decode_fused_layers
    from tunebench.generate.decode_fused_layers import fused_layers

    model = tiny_gemma(tokenizer)
    with fused_layers(model) as switched:
        assert switched == 6  # two layers, each with its attention and MLP
    assert not any("forward" in vars(m) or "fused_weight" in vars(m) for m in model.modules())
    monkeypatch.setattr(decode_fused_layers, "FUSE_BELOW_PARAMETERS", 1000)
    with fused_layers(model) as switched:
        assert switched == 0
    monkeypatch.undo()
    model.model.layers[0].self_attn.q_proj = type("Wrapped", (torch.nn.Linear,), {})(32, 32)  # not plain: left alone
    with fused_layers(model) as switched:
        assert switched == 4  # layer 0 keeps its layer and attention forwards; its MLP and layer 1 are switched


def test_a_finished_batch_is_freed_at_once(tokenizer):
    """Nothing of a finished batch (its cache: tens of GB for a 13B model) waits for the cycle collector:
    the next batch allocates its own cache right after."""
    import gc
    import weakref

    model = tiny_gemma(tokenizer)
    decode = GraphDecode(model, prompts_of(tokenizer), SETTINGS)
    decode.run()
    assert decode.masks is not None  # the loop's own masks and cache writes were in use
    alive, cache = weakref.ref(decode), weakref.ref(decode.cache)
    gc.disable()
    try:
        del decode
        assert alive() is None and cache() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_add_norm_rounds_where_the_gemma_layer_does(tokenizer, dtype):
    """decode_kernels.reference (what the Triton kernel computes) against the layer's own norm modules and
    adds, bit for bit, in the model's dtype."""
    from tunebench.generate.decode_kernels import norm_add_norm, reference

    layer = tiny_gemma(tokenizer).model.layers[0].to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for norm in (layer.post_attention_layernorm, layer.pre_feedforward_layernorm):
            norm.weight.normal_()
        x, residual = torch.randn(3, 1, 32, dtype=dtype) * 4, torch.randn(3, 1, 32, dtype=dtype)
        post, pre = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
        summed_expected = residual + post(x)
        normed_expected = pre(summed_expected)
        scale = lambda norm: 1.0 + norm.weight.float()  # noqa: E731
        summed, normed = reference(x, scale(post), post.eps, residual, scale(pre))
        assert torch.equal(summed, summed_expected) and torch.equal(normed, normed_expected)
        alone, none = norm_add_norm(x, scale(post), post.eps)  # on CPU: the reference
        assert torch.equal(alone, post(x)) and none is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on a CUDA GPU (bench/decode_profile.py)")
def test_the_triton_kernel_equals_its_reference():
    from tunebench.generate.decode_kernels import reference, triton_norm_add_norm

    torch.manual_seed(0)
    x, residual = (torch.randn(100, 1, 640, device="cuda", dtype=torch.bfloat16) * s for s in (3, 10))
    s1, s2 = (1 + torch.randn(640, device="cuda") * 0.5 for _ in range(2))
    for args in ((x, s1, 1e-6), (x, s1, 1e-6, residual), (x, s1, 1e-6, residual, s2)):
        for got, expected in zip(triton_norm_add_norm(*args), reference(*args)):
            if expected is not None:
                torch.testing.assert_close(got, expected, rtol=2 ** -7, atol=0)  # within one bf16 rounding
