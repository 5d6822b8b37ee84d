"""decode_norms.py: each known RMSNorm class, run through F.rms_norm, gives what its own forward gives
(the classes are transformers'; a version that changes their arithmetic fails here), and the loop
switches them only while it runs. Answers through the loop are held against transformers' generate
in test_graph_decode.py, which now runs with the fused norms."""

import contextlib
import importlib

import pytest
import torch

from tunebench.generate.decode_norms import NORMS, fused_norms

from .test_graph_decode import tiny_gemma

MODULES = {"GemmaRMSNorm": "gemma", "Gemma2RMSNorm": "gemma2", "Gemma3RMSNorm": "gemma3", "LlamaRMSNorm": "llama",
           "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3"}


def norm_class(name: str):
    return getattr(importlib.import_module(f"transformers.models.{MODULES[name]}.modeling_{MODULES[name]}"), name)


def test_every_known_norm_is_listed_with_its_module():
    assert set(NORMS) == set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_fused_forward_gives_the_class_own_output(name, dtype):
    torch.manual_seed(0)
    norm = norm_class(name)(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    x = (torch.randn(3, 5, 48) * 3).to(dtype)
    expected = norm(x)
    with fused_norms(norm) as switched:
        got = norm(x)
    assert switched == 1
    assert got.dtype == expected.dtype == dtype
    # on CPU F.rms_norm runs the same float32 operations: bit for bit (a GPU's fused kernel may sum in
    # another order: the last bit of a float32 sum, measured as answers in bench/generate_speed.py)
    assert torch.equal(got, expected)
    assert "forward" not in vars(norm) and not hasattr(norm, "fused_scale")  # restored


def test_a_gemma_model_runs_every_norm_fused_inside_the_block_only(tokenizer):
    model = tiny_gemma(tokenizer)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        with pytest.MonkeyPatch.context() as patch:
            calls = counting_rms_norm(patch)
            with fused_norms(model) as switched:
                got = model(ids).logits
            assert switched == 2 * 6 + 1  # six per layer (q and k norms included) and the final norm
            assert len(calls) == switched
            model(ids)
            assert len(calls) == switched  # as written again after the block
    assert torch.equal(got, expected)


def counting_rms_norm(patch) -> list:
    calls, original = [], torch.nn.functional.rms_norm

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    patch.setattr(torch.nn.functional, "rms_norm", counted)
    return calls


def test_the_decode_loop_runs_the_norms_fused_and_restores_them_even_when_it_fails(tokenizer, monkeypatch):
    from tunebench.generate import graph_decode
    from tunebench.generate.graph_decode import DecodeSettings, GraphDecode

    model = tiny_gemma(tokenizer)
    prompts = [tokenizer.encode("日本の首都は？"), tokenizer.encode("こんにちは")]
    settings = DecodeSettings(6, eos_ids=(-1,), pad_id=tokenizer.pad_token_id)
    with monkeypatch.context() as patch:
        patch.setattr(graph_decode, "fused_norms", lambda model: contextlib.nullcontext())
        expected = GraphDecode(model, prompts, settings).run()  # the norms as written
    calls = counting_rms_norm(monkeypatch)
    assert GraphDecode(model, prompts, settings).run() == expected
    # the prompts' pass: 13 norms; each of 5 decode steps: 11 (decode_fused_layers.py normalises each layer's
    # queries and keys in one call)
    assert len(calls) == 13 + 5 * 11
    calls.clear()

    def failing_step(self):
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(graph_decode.GraphDecode, "forward_newest", failing_step)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        GraphDecode(model, prompts, settings).run()
    assert not [m for m in model.modules() if "forward" in vars(m) or hasattr(m, "fused_scale")]


def test_a_norm_class_of_remote_code_with_a_known_name_is_left_alone():
    class LlamaRMSNorm(torch.nn.Module):  # someone's own, computing otherwise
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * 2

    norm = LlamaRMSNorm()
    with fused_norms(norm) as switched:
        assert switched == 0
        assert torch.equal(norm(torch.ones(8)), torch.full((8,), 2.0))


def test_a_norm_with_its_own_forward_already_is_left_alone():
    norm = norm_class("LlamaRMSNorm")(8)
    norm.forward = lambda x: x * 0  # someone's patch: not ours to replace
    with fused_norms(norm) as switched:
        assert switched == 0
        assert torch.equal(norm(torch.ones(8)), torch.zeros(8))
