import pytest

from tunebench.config import TrainConfig
from tunebench.errors import ConfigError
from tunebench.train.methods import make_trainable


def test_unknown_target_module_is_one_line_naming_the_key_and_the_models_modules(tiny_model_dir):
    """target_modules=[no_such_module] was a peft traceback; now the key and the model's linear modules."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    train = TrainConfig(method="lora", target_modules=["q_proj", "no_such_module"], gradient_checkpointing=False)
    with pytest.raises(ConfigError) as caught:
        make_trainable(model, train)
    assert str(caught.value) == ("train.target_modules: this model has no module named 'no_such_module' (its linear "
                                 "modules: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj; "
                                 "or all-linear)")
    with pytest.raises(ConfigError, match="no module named 'nothing.*'"):
        make_trainable(model, TrainConfig(method="lora", target_modules="nothing.*", gradient_checkpointing=False))
    wrapped = make_trainable(model, TrainConfig(method="lora", target_modules=["q_proj", "v_proj"],
                                                gradient_checkpointing=False))
    assert {n.split(".")[-4] for n, p in wrapped.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
