from tunebench.models import embedded


def test_gguf_conversion_is_cached_and_reused(monkeypatch, gemma_dir):
    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "convert_gguf", must_not_convert)
    assert embedded.embedded_checkpoint() == gemma_dir
    assert (gemma_dir / "model.safetensors").stat().st_size > 100_000_000
    assert "a5fd3b62230aa5ec" in gemma_dir.name  # keyed by the GGUF's sha256


def test_converted_tokenizer_puts_bos_first(tokenizer):
    """Gemma without BOS is another model; the cached tokenizer starts every text with it."""
    assert tokenizer("### 指示\n日本の首都は？")["input_ids"][0] == tokenizer.bos_token_id


def test_ensure_bos_restores_a_missing_bos_rule(gemma_dir):
    """transformers 5.17 reads the GGUF tokenizer without its BOS rule; ensure_bos puts it back."""
    from transformers import AutoTokenizer

    broken = AutoTokenizer.from_pretrained(str(gemma_dir))
    broken.add_bos_token = False
    broken.update_post_processor()
    assert broken("a")["input_ids"][0] != broken.bos_token_id  # the 5.17 state
    embedded.ensure_bos(broken, "gemma3_text")
    assert broken("a")["input_ids"][0] == broken.bos_token_id
    untouched = AutoTokenizer.from_pretrained(str(gemma_dir))
    untouched.add_bos_token = False
    untouched.update_post_processor()
    embedded.ensure_bos(untouched, "llama")  # other families keep their own rule
    assert untouched("a")["input_ids"][0] != untouched.bos_token_id
