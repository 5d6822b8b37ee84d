"""train.sharding: fsdp (FSDP2) on 2 CPU processes (gloo) against one process, same global batch, fp64.

Each two-process run starts three Python processes (launcher + 2 ranks), ~10 s on this machine."""

import json
import shutil

import pytest
import torch

from tests.train.multiprocess import adapter, assert_same_adapter, full_model, grad_norms, losses, write_config
from tunebench.cli import main
from tunebench.config import load_config
from tunebench.config_checks import config_problems
from tunebench.errors import ConfigError
from tunebench.runs import RunDir


def resume_copy(source, target, final):
    """A copy of run `source` as it was when its step-2 checkpoint was written."""
    shutil.copytree(source, target)
    shutil.rmtree(target / final)
    assert [p.name for p in RunDir(target).checkpoints.iterdir()] == ["checkpoint-2"]
    return target


def adapter_config(root):
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])  # peft writes a set, in hash order
    return config


def test_fsdp_lora_matches_one_process_and_resumes_its_checkpoint(tmp_path, tiny_model_dir, lora_reference, capfd):
    single, sharded = lora_reference, tmp_path / "sharded"
    capfd.readouterr()
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 1, sharding="fsdp")), "--run-dir", str(sharded),
                 "--gpus", "2"]) == 0
    err = capfd.readouterr().err
    assert "sharded over 2 processes" in err
    assert err.count("trainable of") == 1, "rank 1 logged at INFO level"

    assert losses(sharded) == pytest.approx(losses(single), rel=1e-9)
    assert grad_norms(sharded) == pytest.approx(grad_norms(single), rel=1e-9)  # clipped by the whole norm
    assert_same_adapter(adapter(single), adapter(sharded))
    # the adapter rank 0 gathered is the one a single process writes, and plain peft loads it
    assert adapter_config(sharded) == adapter_config(single)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
                                       str(sharded / "adapter"))
    loaded_lora = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    saved = adapter(sharded)
    assert loaded_lora.keys() == saved.keys()
    assert all(torch.equal(loaded_lora[k], v) for k, v in saved.items())  # lora_B would be zeros if not loaded

    # the single-process checkpoint of step 2, resumed sharded on 2 processes: the same final adapter
    resumed = resume_copy(single, tmp_path / "resumed", "adapter")
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 1, sharding="fsdp")), "--run-dir",
                 str(resumed), "--gpus", "2", "--resume"]) == 0
    assert_same_adapter(adapter(single), adapter(resumed))
    assert losses(resumed) == pytest.approx(losses(single), rel=1e-9)


def test_fsdp_full_fine_tuning_matches_one_process_and_its_checkpoint_resumes_on_one(tmp_path, tiny_model_dir):
    """Every weight sharded (tied embedding and output layer included), fp64: the same losses and model as
    one process, saved as one process saves it; its step-2 checkpoint resumes unsharded on one process."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 2, method="full")), "--run-dir",
                 str(single)]) == 0
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 1, method="full", sharding="fsdp")),
                 "--run-dir", str(sharded), "--gpus", "2"]) == 0
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-9)
    assert grad_norms(sharded) == pytest.approx(grad_norms(single), rel=1e-9)
    weights = full_model(single)
    assert_same_adapter(weights, full_model(sharded))
    assert (json.loads((sharded / "model" / "config.json").read_text())
            == json.loads((single / "model" / "config.json").read_text()))  # LlamaForCausalLM, not FSDP…

    resumed = resume_copy(sharded, tmp_path / "resumed", "model")
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 2, method="full")), "--run-dir",
                 str(resumed), "--resume"]) == 0
    assert_same_adapter(weights, full_model(resumed))
    assert losses(resumed) == pytest.approx(losses(single), rel=1e-9)


def test_fsdp_dpo_full_fine_tuning_matches_one_process(tmp_path, tiny_model_dir):
    """DPO's reference pass runs before the optimizer is built and leaves the root's weights gathered:
    an optimizer built over those copies trained nothing of the sharded model's embeddings, norm and
    output layer (a lower first-step gradient norm, then other losses)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"質問{i}です", "chosen": f"答え{i}です。", "rejected": f"いいえ{i}"},
                                        ensure_ascii=False) + "\n" for i in range(8)), encoding="utf-8")
    dpo = ["--set=train.objective=dpo", f"--set=data.sources=[{{path: '{pairs}'}}]"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 2, method="full")), "--run-dir",
                 str(single), *dpo]) == 0
    assert main(["train", str(write_config(tmp_path, tiny_model_dir, 1, method="full", sharding="fsdp")),
                 "--run-dir", str(sharded), "--gpus", "2", *dpo]) == 0
    assert grad_norms(sharded) == pytest.approx(grad_norms(single), rel=1e-9)
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-9)
    assert_same_adapter(full_model(single), full_model(sharded))


def test_fsdp_refusals_come_all_at_once(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load_config(None, ["train.method=prompt", "train.sharding=fsdp"])
    assert "'train.sharding' fsdp works with lora, qlora and full, not prompt" in str(refused.value)

    config = load_config(None, ["train.method=lora", "train.sharding=fsdp", "train.answer_only_logits=true",
                                "train.offload_frozen=true"])
    problems = config_problems(config, world_size=2)
    assert [p.split(":")[0] for p in problems] == ["'train.answer_only_logits'", "'train.offload_frozen'"]
    assert "train.sharding fsdp" in problems[0]
    assert config_problems(config, world_size=1) == []  # one process: nothing to shard, both levers work


def test_fsdp_with_one_process_trains_unsharded(tmp_path, tiny_model_dir, lora_reference, caplog):
    """No process group to shard over: the run is the plain single-process run, and says so."""
    import logging

    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["train", str(write_config(tmp_path, tiny_model_dir, 2, sharding="fsdp")), "--run-dir",
                     str(run)]) == 0
    assert "training unsharded" in caplog.text
    assert losses(run) == losses(lora_reference)


def test_qlora_sharded_stores_4bit_weights_in_the_compute_dtype():
    """FSDP shards floating-point tensors: sharded, bitsandbytes packs the 4-bit weights into bf16."""
    from transformers import BitsAndBytesConfig

    from tunebench.models.load import bnb_4bit_arguments

    sharded = BitsAndBytesConfig(**bnb_4bit_arguments(torch.bfloat16, sharded=True))
    assert sharded.bnb_4bit_quant_storage == torch.bfloat16 == sharded.bnb_4bit_compute_dtype
    assert sharded.bnb_4bit_quant_type == "nf4" and sharded.bnb_4bit_use_double_quant
    assert BitsAndBytesConfig(**bnb_4bit_arguments(torch.bfloat16)).bnb_4bit_quant_storage == torch.uint8


def test_a_sharded_model_computing_other_logits_is_refused():
    """The probe run before and after sharding: rounding passes, a changed weight or a NaN does not."""
    from tunebench.train.sharding import check_same_logits

    torch.manual_seed(0)
    logits = torch.randn(1, 16, 100)
    check_same_logits(logits, logits + 1e-6 * torch.randn_like(logits))
    corrupted = logits.clone()
    corrupted[0, 3] *= 1.5
    with pytest.raises(ConfigError, match="use train.sharding: none"):
        check_same_logits(logits, corrupted)
    corrupted[0, 3, 0] = float("nan")
    with pytest.raises(ConfigError, match="relative difference nan"):
        check_same_logits(logits, corrupted)
