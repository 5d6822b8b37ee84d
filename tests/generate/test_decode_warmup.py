"""The decode loop's Triton kernels warmed while the model loads (decode_warmup.py): for which models, that the
loop waits for it before its first step, and that a failing warm-up changes nothing. (The warm-up's kernels run
on a CUDA GPU: bench/generate_speed.py measures what it saves there.)"""

import json
import logging
import time

import torch

from tunebench.generate import decode_warmup, graph_decode
from tunebench.generate.graph_decode import DecodeSettings, GraphDecode

from .test_graph_decode import tiny_gemma

CUDA = torch.device("cuda")


def test_only_a_local_small_gemma_3_on_a_gpu_in_bf16_is_warmed(gemma_dir, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(decode_warmup, "warm", lambda config, dtype, device: started.append(config["model_type"]))
    assert decode_warmup.start(str(gemma_dir), torch.bfloat16, CUDA) is not None  # the embedded Gemma 3 270M
    decode_warmup.wait()
    assert started == ["gemma3_text"]
    assert decode_warmup.start(str(gemma_dir), torch.bfloat16, torch.device("cpu")) is None
    assert decode_warmup.start(str(gemma_dir), torch.float32, CUDA) is None  # the kernels take bf16/fp16
    assert decode_warmup.start("google/gemma-3-270m", torch.bfloat16, CUDA) is None  # a hub id: no local config
    config = json.loads((gemma_dir / "config.json").read_text(encoding="utf-8"))
    bigger = tmp_path / "gemma-1b"
    bigger.mkdir()
    (bigger / "config.json").write_text(json.dumps(config | {"hidden_size": 1152, "num_hidden_layers": 26,
                                                             "intermediate_size": 6912}))
    assert decode_warmup.start(str(bigger), torch.bfloat16, CUDA) is None  # ~1 B parameters: layers not fused
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    assert decode_warmup.start(str(llama), torch.bfloat16, CUDA) is None
    assert started == ["gemma3_text"] and decode_warmup.STARTED == []


def test_a_failing_warm_up_is_logged_and_changes_nothing(gemma_dir, monkeypatch, caplog):
    def broken(config, dtype, device):
        raise RuntimeError("no kernel today")
    monkeypatch.setattr(decode_warmup, "warm", broken)
    with caplog.at_level(logging.WARNING, logger="tunebench.generate.decode_warmup"):
        decode_warmup.start(str(gemma_dir), torch.bfloat16, CUDA)
        decode_warmup.wait()
    assert "no kernel today" in caplog.text and "load at first use" in caplog.text


def test_the_loop_waits_for_the_warm_up_before_its_first_step(gemma_dir, tokenizer, monkeypatch):
    order = []
    monkeypatch.setattr(decode_warmup, "warm",
                        lambda config, dtype, device: time.sleep(0.5) or order.append("warmed"))
    start = GraphDecode.start
    monkeypatch.setattr(graph_decode.GraphDecode, "start", lambda self: order.append("first step") or start(self))
    decode_warmup.start(str(gemma_dir), torch.bfloat16, CUDA)
    model = tiny_gemma(tokenizer)
    GraphDecode(model, [tokenizer.encode("今日は")], DecodeSettings(max_new_tokens=3, eos_ids=(-1,), pad_id=0),
                use_graph=False).run()
    assert order == ["warmed", "first step"]
