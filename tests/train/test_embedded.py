from tunebench.models import embedded


def test_gguf_conversion_is_cached_and_reused(monkeypatch, gemma_dir):
    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "convert_gguf", must_not_convert)
    assert embedded.embedded_checkpoint() == gemma_dir
    assert (gemma_dir / "model.safetensors").stat().st_size > 100_000_000
    assert "a5fd3b62230aa5ec" in gemma_dir.name  # keyed by the GGUF's sha256
