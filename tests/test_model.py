"""Model and tokenizer loading on the CPU: 4-bit (QLoRA) and 16/32-bit bases, padding, errors, the repack guard."""

import contextlib
import re

import bitsandbytes
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import get_peft_model

from sftmix_trl.configs import ModelArguments
from sftmix_trl.model import ModelLoadError, load_model, load_tokenizer, lora_config, quantization_config

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
TINY_LAYERS = 2


@pytest.fixture
def model_args(tiny_model):
    def make(**kwargs) -> ModelArguments:
        return ModelArguments(model_name_or_path=str(tiny_model), lora_r=4, lora_alpha=8, **kwargs)

    return make


@pytest.fixture
def batch(model_args):
    tokenizer = load_tokenizer(model_args())
    encoded = tokenizer(
        ["Explain what a blockchain is in simple terms.", "What is the tallest mountain?"],
        return_tensors="pt",
        padding=True,
    )
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    assert (encoded["labels"] == -100).any()  # the batch really holds padding
    return encoded


def linear4bit_layers(model) -> list[Linear4bit]:
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def test_4bit_load_with_lora_trains_only_the_adapter(model_args, batch):
    args = model_args()
    model = load_model(args)
    assert len(linear4bit_layers(model)) == TINY_LAYERS * LINEARS_PER_LAYER
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert model.model.layers[0].mlp.down_proj.weight.quant_state is not None
    assert not isinstance(model.lm_head, Linear4bit)

    peft_model = get_peft_model(model, lora_config(args))
    peft_model.train()
    loss = peft_model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    with_grad = {name for name, p in peft_model.named_parameters() if p.grad is not None}
    lora = {name for name, p in peft_model.named_parameters() if "lora_" in name}
    assert len(lora) == 2 * TINY_LAYERS * LINEARS_PER_LAYER  # A and B of every linear layer ("all-linear")
    assert with_grad == lora
    assert any(peft_model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == lora


@pytest.mark.parametrize(("dtype", "expected"), [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_16_32_bit_load(model_args, batch, dtype, expected):
    kwargs = {"dtype": dtype} if dtype else {}
    model = load_model(model_args(load_in_4bit=False, **kwargs))
    assert not linear4bit_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert model.dtype == expected  # "auto" is float32 on a CPU
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_tokenizer_pad_token_is_not_the_end_of_turn(model_args):
    tokenizer = load_tokenizer(model_args())
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token not in (tokenizer.eos_token, "<|im_end|>", "<|im_start|>")
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert tokenizer.padding_side == "right"
    padded = tokenizer(["a", "a longer text"], padding=True)["input_ids"][0]
    assert padded[-1] == tokenizer.pad_token_id


def test_tokenizer_pad_token_override(model_args):
    tokenizer = load_tokenizer(model_args(tokenizer_pad_token="<|im_start|>"))
    assert tokenizer.pad_token == "<|im_start|>"
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ModelLoadError, match=r"'<my_pad>' is not in the tokenizer's vocabulary"):
        load_tokenizer(model_args(tokenizer_pad_token="<my_pad>"))


def test_missing_model_path(tmp_path):
    path = tmp_path / "no-such-model"
    args = ModelArguments(model_name_or_path=str(path))
    with pytest.raises(ModelLoadError, match=f"model path does not exist: {re.escape(str(path))}"):
        load_model(args)
    with pytest.raises(ModelLoadError, match=f"model path does not exist: {re.escape(str(path))}"):
        load_tokenizer(args)


def test_4bit_where_bitsandbytes_cannot_run(model_args, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", broken)
    with pytest.raises(ModelLoadError, match=r"load_in_4bit=True but bitsandbytes cannot run here") as error:
        load_model(model_args())
    assert "no 4-bit kernel for this device" in str(error.value)
    assert "load_in_4bit: false" in str(error.value)
    assert not linear4bit_layers(load_model(model_args(load_in_4bit=False)))  # the way out works


def test_bnb_cpu_repack_guard(model_args, batch, monkeypatch):
    """bitsandbytes 0.50.2 repacks 4-bit weights on an AVX512-BF16 CPU in eval/no-grad mode, and `state_dict()`
    then corrupts them. Pretend this CPU has AVX512-BF16 so that the guard, not the hardware, keeps the repack off."""
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = load_model(model_args())
    layers = linear4bit_layers(model)
    assert len(layers) == TINY_LAYERS * LINEARS_PER_LAYER
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)

    def loss() -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).loss

    model.train()  # the path that never repacks
    reference = loss()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    assert torch.equal(loss(), reference)
    state_after = model.state_dict()
    assert torch.equal(loss(), reference)
    model.train()
    assert torch.equal(loss(), reference)
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)


def test_quantization_config_on_cpu(model_args):
    config = quantization_config(model_args())
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_compute_dtype == torch.float32
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_quant_storage == torch.uint8
    stored = quantization_config(model_args(bnb_4bit_quant_storage="bfloat16"))
    assert stored.bnb_4bit_quant_storage == torch.bfloat16
    assert stored.bnb_4bit_compute_dtype == torch.float32
    assert quantization_config(model_args(load_in_4bit=False)) is None


def test_quantization_config_compute_dtype_follows_the_device(model_args, monkeypatch):
    """The default `dtype` resolves at run time: bf16 on a bf16-capable GPU, not TRL's float32 default."""
    import sftmix_trl.model as model_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_module, "bf16_supported", lambda: True)
    assert quantization_config(model_args()).bnb_4bit_compute_dtype == torch.bfloat16
    monkeypatch.setattr(model_module, "bf16_supported", lambda: False)
    assert quantization_config(model_args()).bnb_4bit_compute_dtype == torch.float16
    assert quantization_config(model_args(dtype="float32")).bnb_4bit_compute_dtype == torch.float32


# -- FSDP: no whole base on a GPU --------------------------------------------------------------------------------------


def test_fsdp_4bit_base_loads_into_cpu_memory_and_quantises_weight_by_weight(model_args, monkeypatch):
    """What `accelerate launch` with fsdp_qlora.yaml sets: the base goes to the CPU (FSDP moves one unit at a time to
    the GPU), quantised on the GPU weight by weight; without FSDP each process puts its whole copy on its GPU."""
    from transformers.integrations import bitsandbytes as hf_bnb

    import sftmix_trl.model as model_module

    class Weight:  # a weight as the hook sees it: moved to the GPU, quantised (here: kept), moved back
        device = torch.device("cpu")

        def to(self, device):
            return self

    monkeypatch.setattr(hf_bnb.Bnb4bitQuantize, "convert", lambda self, input_dict, *args, **kwargs: dict(input_dict))
    original_convert = hf_bnb.Bnb4bitQuantize.convert
    seen = []

    def fake_from_pretrained(path, **kwargs):
        hooked = hf_bnb.Bnb4bitQuantize.convert is not original_convert
        seen.append((kwargs.get("device_map"), hooked))
        if hooked:
            hf_bnb.Bnb4bitQuantize.convert(None, {"layer.weight": Weight()})
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(model_module.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(model_module, "check_4bit_available", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the loader can tell
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(model_module, "PartialState", lambda: type("State", (), {"local_process_index": 3})())
    monkeypatch.setattr(model_module, "bf16_supported", lambda: True)
    four_bit = model_args(load_in_4bit=True, bnb_4bit_quant_storage="bfloat16")
    load_model(four_bit)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    load_model(four_bit)
    load_model(model_args(load_in_4bit=False))  # 16-bit: transformers' own FSDP loading, no device_map
    assert seen == [({"": 3}, False), ({"": "cpu"}, True), (None, False)]
    assert hf_bnb.Bnb4bitQuantize.convert is original_convert  # the patch ends with the load


def test_quantising_elsewhere_gives_the_same_base(model_args, batch, monkeypatch):
    """The weight-by-weight quantisation hook (here on the CPU: the mechanism, not the GPU) leaves the loaded model
    identical, every 4-bit weight went through it, and the result stays where the device map put it."""
    from sftmix_trl.model import quantize_on

    args = model_args(load_in_4bit=True)
    plain = load_model(args)
    with quantize_on(torch.device("cpu")) as quantised:
        hooked = load_model(args)
    assert sum(quantised) == len(linear4bit_layers(hooked)) == LINEARS_PER_LAYER * TINY_LAYERS
    assert all(p.device.type == "cpu" for p in hooked.parameters())
    for (name, a), b in zip(plain.state_dict().items(), hooked.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert plain(**batch).loss.item() == hooked(**batch).loss.item()


def test_quantising_elsewhere_stops_when_no_weight_went_through_the_hook(model_args):
    """A transformers that loads 4-bit weights without `Bnb4bitQuantize.convert` would quantise a whole base on the
    CPU under FSDP, unnoticed: the hook stops the run instead (here: a load that quantises nothing)."""
    from sftmix_trl.model import quantize_on

    with pytest.raises(ModelLoadError, match=r"^no weight was quantised on cpu: transformers .* does not quantise"):
        with quantize_on(torch.device("cpu")):
            load_model(model_args(load_in_4bit=False))


def test_quantising_elsewhere_stops_when_transformers_has_no_quantising_operation(model_args, monkeypatch):
    from transformers.integrations import bitsandbytes as hf_bnb

    from sftmix_trl.model import quantize_on

    monkeypatch.delattr(hf_bnb, "Bnb4bitQuantize")
    with pytest.raises(ModelLoadError, match=r"does not quantise 4-bit weights through `Bnb4bitQuantize.convert`"):
        with quantize_on(torch.device("cpu")):
            pass


def test_a_checkpoint_saved_quantised_is_not_quantised_again_under_fsdp(model_args, tmp_path, monkeypatch):
    """Its 4-bit weights are only unpacked (no weight goes through the quantising hook): no hook, no stop."""
    import sftmix_trl.model as model_module

    saved = tmp_path / "saved-4bit"
    load_model(model_args(load_in_4bit=True)).save_pretrained(saved)
    load_tokenizer(model_args()).save_pretrained(saved)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_module, "check_4bit_available", lambda: None)
    monkeypatch.setattr(model_module, "compute_dtype", lambda: torch.float32)
    monkeypatch.setattr(model_module, "quantized_device_map", lambda: {"": "cpu"})
    used = []
    monkeypatch.setattr(model_module, "quantize_on", lambda device: used.append(device) or contextlib.nullcontext())
    prequantized = ModelArguments(model_name_or_path=str(saved), bnb_4bit_quant_storage="float32")
    assert len(linear4bit_layers(load_model(prequantized))) == LINEARS_PER_LAYER * TINY_LAYERS
    assert used == [None]


def test_a_gpu_config_with_flex_attention_loads_with_sdpa_on_a_cpu(model_args):
    """flex_attention has no backward on a CPU: a config opting into it trains there with sdpa (examples apart too)."""
    model = load_model(model_args(load_in_4bit=False, attn_implementation="flex_attention"))
    assert model.config._attn_implementation == ("flex_attention" if torch.cuda.is_available() else "sdpa")
