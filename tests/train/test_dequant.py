"""train.compile_dequant: 4-bit weights dequantized by torch ops are bitsandbytes' weights, bit for bit, and a
4-bit linear through them gives bitsandbytes' output and input gradient, eagerly and compiled (no graph break)."""

import pytest
import torch
from torch._dynamo.utils import counters

from tunebench.config import load_config
from tunebench.errors import ConfigError
from tunebench.train.dequant import dequantize_4bit, parts, use_compile_dequant, use_torch_dequant

bnb = pytest.importorskip("bitsandbytes")
functional = pytest.importorskip("bitsandbytes.functional")


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(64, 256), (192, 128), (7, 64)])
def test_weights_equal_bitsandbytes_dequantize_4bit(quant_type, nested, shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(torch.bfloat16) * 0.05
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    assert torch.equal(dequantize_4bit(packed, *parts(state)), functional.dequantize_4bit(packed, state))


def test_blocks_run_over_the_flattened_weight_where_rows_are_not_whole_blocks():
    """160 columns: blocks of 64 cross rows, as in bitsandbytes' CUDA kernel and its generic implementation
    (its CPU kernel blocks each row apart there, and reads back other weights than it stored)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    weight = torch.randn(96, 160, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 0.05
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    generic = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, _get_4bit_code("nf4", packed.device), 64,
                                       state.shape, torch.bfloat16)
    ours = dequantize_4bit(packed, *parts(state))
    assert torch.equal(ours, generic)
    assert (ours.float() - weight.float()).abs().max() < 0.04  # within NF4's step at this scale


def test_packed_bytes_stored_as_bf16_read_the_same():
    """Sharded QLoRA stores the packed bytes in bf16 (bnb_4bit_quant_storage): the same weights."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16) * 0.05
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(dequantize_4bit(packed.flatten().view(torch.bfloat16), *parts(state)),
                       dequantize_4bit(packed, *parts(state)))


def linear_4bit(bias: bool):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 192, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(192, 128) * 0.05, requires_grad=False, quant_type="nf4")
    if layer.weight.quant_state is None:
        layer.weight = layer.weight._quantize("cpu")
    if bias:
        torch.nn.init.normal_(layer.bias, std=0.1)
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_a_4bit_linear_gives_bitsandbytes_output_and_gradient_eagerly_and_compiled(bias):
    layer = linear_4bit(bias)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3), requires_grad=True)
    reference = layer(x)
    (grad_reference,) = torch.autograd.grad(reference.square().sum(), x)
    holder = torch.nn.Sequential(layer)
    assert use_torch_dequant(holder) == 1
    for run in ("eager", "compiled"):
        if run == "compiled":
            holder.compile(backend="aot_eager")
        out = holder(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(grad, grad_reference, rtol=0, atol=1e-5)
    assert not counters["graph_break"]  # traced whole: the dequantisation is in the layer's graph


def test_weights_moved_to_new_memory_are_read_there():
    """Offload points the packed weight and its quantisation state at other copies between calls."""
    layer = linear_4bit(False)
    holder = torch.nn.Sequential(layer)
    use_torch_dequant(holder)
    holder.compile(backend="aot_eager")
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    before = holder(x)
    state = layer.weight.quant_state
    layer.weight.data = layer.weight.data.clone()
    state.absmax = state.absmax.clone()
    state.state2.absmax = state.state2.absmax.clone()
    torch.testing.assert_close(holder(x), before, rtol=0, atol=0)
    state.absmax.zero_()  # a read of the new copy, not the old one
    assert not torch.equal(holder(x), before)


def test_refusals_name_the_setting():
    with pytest.raises(ConfigError, match="no 4-bit linear layers"):
        use_torch_dequant(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="'train.compile_dequant' applies to qlora.*set it to auto or false"):
        load_config(None, ["train.compile_dequant=true", "train.method=lora"])
    assert load_config(None, ["train.compile_dequant=true"]).train.compile_dequant is True  # qlora, the default
    assert load_config(None, ["train.method=lora"]).train.compile_dequant == "auto"  # auto passes any method


def test_auto_is_on_for_4bit_weights_in_compiled_layers_only():
    assert use_compile_dequant("auto", quantized=True, compiled=True) is True
    assert use_compile_dequant("auto", quantized=True, compiled=True, graphs=True) is False  # no host time to save
    assert use_compile_dequant("auto", quantized=True, compiled=False) is False  # bitsandbytes' kernel is faster
    assert use_compile_dequant("auto", quantized=False, compiled=True) is False
    assert use_compile_dequant(True, quantized=True, compiled=False) is True
    assert use_compile_dequant(False, quantized=True, compiled=True) is False
