"""Model and tokenizer loading: a 4-bit (QLoRA) or 16/32-bit base, a LoRA config, a safe padding token.

Device-dependent choices (compute dtype, device map) are made here at run time, so one YAML runs on a CPU and on a
GPU unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import PartialState
from peft import LoraConfig
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl import get_peft_config

from sftmix_trl.chat_templates import training_chat_template
from sftmix_trl.configs import ModelArguments, bf16_supported
from sftmix_trl.errors import SFTMixError
from sftmix_trl.sft_trainer import trainable_attention

logger = logging.getLogger(__name__)


class ModelLoadError(SFTMixError):
    """The model cannot be loaded as configured; the message says why and what to change."""


def compute_dtype() -> torch.dtype:
    """bf16 where CUDA supports it, fp16 on older GPUs, float32 on CPU (where bf16 matmuls are slow)."""
    if torch.cuda.is_available():
        return torch.bfloat16 if bf16_supported() else torch.float16
    return torch.float32


def _resolve_dtype(model_args: ModelArguments) -> torch.dtype:
    if model_args.dtype in (None, "auto"):
        return compute_dtype()
    return getattr(torch, model_args.dtype)


def check_4bit_available() -> None:
    """Fail before anything is written if bitsandbytes cannot quantise on this machine."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import quantize_4bit

        device = "cuda" if torch.cuda.is_available() else "cpu"
        quantize_4bit(torch.ones(64, 64, device=device, dtype=compute_dtype()), quant_type="nf4")
        del bnb
    except Exception as error:
        raise ModelLoadError(
            f"load_in_4bit=True but bitsandbytes cannot run here ({type(error).__name__}: {error}). "
            "Install a bitsandbytes build for this device, or set `load_in_4bit: false` to train a 16/32-bit base."
        ) from None


def quantization_config(model_args: ModelArguments) -> BitsAndBytesConfig | None:
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not model_args.load_in_4bit:
        return None
    dtype = _resolve_dtype(model_args)
    storage = model_args.bnb_4bit_quant_storage or "uint8"
    # FSDP flattens the packed 4-bit weights with the bf16/fp32 tensors around them: with uint8 storage it fails
    # deep inside the wrapper, after the model is loaded; say so before
    if fsdp_launch() and getattr(torch, storage, None) != dtype:
        raise ModelLoadError(
            f"FSDP with a 4-bit base needs bnb_4bit_quant_storage equal to the compute dtype: set "
            f"`bnb_4bit_quant_storage: {str(dtype).removeprefix('torch.')}` (it is {storage})"
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=dtype,
        # FSDP shards the packed 4-bit weights as ordinary tensors: their storage dtype must match the compute dtype
        bnb_4bit_quant_storage=getattr(torch, storage) if storage != "uint8" else torch.uint8,
    )


def disable_bnb_cpu_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes from repacking 4-bit weights into its AVX512-BF16 CPU layout.

    bitsandbytes 0.50.2 repacks a `Linear4bit` weight the first time it runs in eval mode without gradients, and a
    later `state_dict()` (every checkpoint save) unpacks it wrongly: the base silently degrades. Scoring, evaluation
    and generation all run that path, so the repack is turned off for every 4-bit layer. Returns how many were set.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _check_model_path(path: str | None) -> str:
    """The model path with `~` expanded; an error if it is meant to be local and does not exist."""
    if not path:
        raise ModelLoadError("`model_name_or_path` is not set")
    # A Hub id is "name" or "org/name"; anything else must be a local folder
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        hint = " (run `sftmix-trl-demo-model` to build the demo model)" if "sftmix-trl" in path else ""
        raise ModelLoadError(f"model path does not exist: {path}{hint}")
    return os.path.expanduser(path)


def saved_tokenizer_folder(adapter_path: str | None) -> Path | None:
    """The adapter folder of a run when it holds a saved tokenizer (every training recipe saves the one it trained
    with beside the adapter), else None."""
    if not adapter_path:
        return None
    folder = Path(os.path.expanduser(adapter_path))
    return folder if (folder / "tokenizer_config.json").is_file() else None


def load_tokenizer(
    model_args: ModelArguments,
    trust_remote_code: bool = False,
    chat_template_path: str | None = None,
    assistant_only_loss: bool = False,
    adapter_path: str | None = None,
) -> PreTrainedTokenizerBase:
    """The tokenizer of a run, right-padded, with a padding token distinct from the end-of-turn token.

    It is the one saved in `adapter_path` when that folder holds one (the chat template, special tokens and padding
    token the run trained with), else the base's. `chat_template_path` (a .jinja file) overrides the chat template
    either way: it gives a base without one a template to train and generate with. `assistant_only_loss`
    (multi-turn conversations) swaps in a copy of the template with `{% generation %}` markers around the assistant
    replies (`chat_templates.training_chat_template`); it renders the same text.
    """
    saved = saved_tokenizer_folder(adapter_path)
    path = str(saved) if saved else _check_model_path(model_args.model_name_or_path)
    source = f"the adapter folder {adapter_path}" if saved else model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=None if saved else model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise ModelLoadError(f"could not load the tokenizer of {source}: {error}") from None
    if saved:
        logger.info("tokenizer and chat template of the run, from %s", saved)
    if chat_template_path is not None:
        template_file = os.path.expanduser(chat_template_path)
        if not template_file.endswith(".jinja") or not os.path.isfile(template_file):
            raise ModelLoadError(f"`chat_template_path` must be an existing .jinja file, got {chat_template_path}")
        tokenizer.chat_template = Path(template_file).read_text()
    if tokenizer.chat_template is None:
        raise ModelLoadError(
            f"{source} has no chat template; use an instruct/chat tokenizer or set `chat_template_path`"
        )
    if assistant_only_loss:
        tokenizer.chat_template = training_chat_template(tokenizer)  # ChatTemplateError says what to do
    tokenizer.padding_side = "right"
    set_pad_token(tokenizer, model_args.tokenizer_pad_token)
    return tokenizer


def set_pad_token(tokenizer: PreTrainedTokenizerBase, pad_token: str | None = None) -> None:
    """Choose a padding token that is not the end-of-turn/EOS token.

    With pad == EOS, anything that masks padding by token id (attention masks rebuilt from ids, generation, some
    collators) also masks the real end of turn, and the model never learns to stop.
    """
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():  # a new token would need a resized embedding matrix
            raise ModelLoadError(f"`tokenizer_pad_token` {pad_token!r} is not in the tokenizer's vocabulary")
        tokenizer.pad_token = pad_token
        return
    reserved = {tokenizer.eos_token, tokenizer.bos_token, "<|im_start|>", "<|im_end|>", "<|eot_id|>"}
    if tokenizer.pad_token is not None and tokenizer.pad_token not in reserved:
        return
    preferred = ["<|finetune_right_pad_id|>", "<pad>", "<|pad|>", tokenizer.unk_token, "<|endoftext|>"]
    vocabulary = tokenizer.get_vocab()
    for candidate in preferred + list(tokenizer.all_special_tokens):
        if candidate and candidate not in reserved and candidate in vocabulary:
            tokenizer.pad_token = candidate
            logger.info("padding token set to %r (distinct from the end-of-turn token)", candidate)
            return
    raise ModelLoadError(
        "the tokenizer has no padding token distinct from its end-of-turn token; set `pad_token` to an unused token"
    )


def fsdp_launch() -> bool:
    """Whether `accelerate launch` set this process up for FSDP (its environment, read before any wrapper exists)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def quantized_device_map() -> dict[str, int | str]:
    """Where a quantised base is materialised: this process's GPU, or the CPU under FSDP.

    Without FSDP (one GPU, DDP) every process trains a whole copy, on its own GPU. Under FSDP the GPU must hold only
    this process's shard: transformers 5.24 materialises every weight on every process at the `device_map` device
    (`core_model_loading.py`, `param_device = get_device(device_map, ...)`; its rank-0-only loading, keyed on
    `FSDP_CPU_RAM_EFFICIENT_LOADING`, skips quantised models: `modeling_utils.py`, `not is_quantized`), and a 4-bit
    base with no `device_map` goes whole onto the current GPU (`quantizer_bnb_4bit.update_device_map`). So the base
    is quantised into CPU memory, and FSDP1 (given `device_id`, as accelerate does) moves each wrapped unit to the
    GPU as it wraps and shards it: a GPU holds its shards plus one unit at a time. See docs/gpu.md.
    """
    if fsdp_launch() or not torch.cuda.is_available():
        return {"": "cpu"}
    return {"": PartialState().local_process_index}  # one whole copy per DDP process, on its own GPU


@contextmanager
def quantize_on(device: torch.device | str | None) -> Iterator[list[int]]:
    """Inside the block, transformers' bitsandbytes 4-bit loader quantises each weight on `device` and keeps the
    result where the `device_map` put it (None: unchanged). Yields a list that counts the weights so quantised.

    Under FSDP the base is loaded into CPU memory (`quantized_device_map`), and bitsandbytes quantises on a CPU at
    about 10 M parameters/s per 2 cores (docs/gpu.md): tens of minutes for a 70B base. One weight at a time on the
    GPU, then back to the CPU, is what transformers 4.x did for FSDP; 5.24 has no such branch, so it is put back here
    around its one quantising operation (`integrations.bitsandbytes.Bnb4bitQuantize.convert`, a private API that
    `tests/test_private_apis.py` pins). A load that sent no weight through it stops with a `ModelLoadError`: a
    transformers that quantises another way would otherwise quantise the whole base on the CPU, silently.
    """
    quantised: list[int] = []
    if device is None:
        yield quantised
        return
    import transformers
    from transformers.integrations import bitsandbytes as hf_bnb

    unsupported = (
        f"transformers {transformers.__version__} does not quantise 4-bit weights through "
        "`Bnb4bitQuantize.convert`, so the base would be quantised on the CPU (tens of minutes for a 70B); install "
        "a transformers version within sftmix-trl's pins"
    )
    if not hasattr(getattr(hf_bnb, "Bnb4bitQuantize", None), "convert"):
        raise ModelLoadError(unsupported)
    original = hf_bnb.Bnb4bitQuantize.convert

    def convert(self, input_dict, *args, **kwargs):
        moved = {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in input_dict.items()}
        result = original(self, moved, *args, **kwargs)
        quantised.append(len(result))
        home = next(iter(input_dict.values()))
        home = (home[0] if isinstance(home, list) else home).device
        return {name: param.to(home) for name, param in result.items()}  # Params4bit.to moves its quant state too

    hf_bnb.Bnb4bitQuantize.convert = convert
    try:
        yield quantised
    finally:
        hf_bnb.Bnb4bitQuantize.convert = original
    if not sum(quantised):  # the block ended normally and quantised nothing on `device`
        raise ModelLoadError(f"no weight was quantised on {device}: {unsupported}")


def _prequantized(model_args: ModelArguments, trust_remote_code: bool = False) -> bool:
    """Whether the checkpoint holds weights saved already quantised (its config records how)."""
    path = _check_model_path(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(path, revision=model_args.model_revision, trust_remote_code=trust_remote_code)
    return getattr(config, "quantization_config", None) is not None


def load_model(model_args: ModelArguments, trust_remote_code: bool = False) -> PreTrainedModel:
    """The frozen base model, quantised to 4 bits when asked, on this process's device."""
    path = _check_model_path(model_args.model_name_or_path)
    if trust_remote_code:
        logger.warning("trust_remote_code=True: code from %s will run on this machine", model_args.model_name_or_path)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        check_4bit_available()
    quantization = quantization_config(model_args)
    kwargs = {}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = quantized_device_map()
    # Under FSDP a 4-bit base lands in CPU memory; quantising there is slow, so the GPU does it weight by weight (a
    # checkpoint saved already quantised is only unpacked)
    on_gpu = model_args.load_in_4bit and fsdp_launch() and torch.cuda.is_available()
    on_gpu = on_gpu and not _prequantized(model_args, trust_remote_code)
    try:
        with quantize_on(torch.device("cuda", torch.cuda.current_device()) if on_gpu else None):
            model = AutoModelForCausalLM.from_pretrained(
                path,
                revision=model_args.model_revision,
                dtype=_resolve_dtype(model_args),
                attn_implementation=trainable_attention(model_args.attn_implementation),
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                **kwargs,
            )
    except OSError as error:
        raise ModelLoadError(f"could not load model {model_args.model_name_or_path}: {error}") from None
    disable_bnb_cpu_repack(model)
    return model


def lora_config(model_args: ModelArguments) -> LoraConfig | None:
    return get_peft_config(model_args)


def meta_model(
    model_args: ModelArguments, trust_remote_code: bool = False
) -> tuple[PretrainedConfig, torch.nn.Module]:
    """The base's config and an empty (meta-device) copy of it: module names and shapes without loading weights,
    about a second for an 8B."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    path = _check_model_path(model_args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise ModelLoadError(f"could not read the config of {model_args.model_name_or_path}: {error}") from None
    with torch.device("meta"):
        if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            # The class itself: `from_config` would partition the model with `deepspeed.zero.Init` under ZeRO-3
            model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
        else:  # a model of remote code
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config, model
