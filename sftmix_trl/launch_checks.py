"""Refusals known at launch: settings that would otherwise fail at model loading, or when stage 2 starts (after
the hours of stage 1), checked right after parsing, before anything is written. Each is one `SFTMixError` line.

- the 4-bit quantisation settings (`model.quantization_config`) and the attention of padding-free rows;
- FSDP2 with a 4-bit base (bitsandbytes issue #1945: FSDP2 silently corrupts about 0.1% of the packed 4-bit weights;
  accelerate issue #3983: loss 0 and NaN gradient norms), where FSDP1 is the known-good path;
- the LM head among the LoRA targets (TRL refuses it only when the trainer is built: after stage 1 in an SFTMix run)
  and, for SFTMix, a model that scales its logits (`mixup_head_problem`, which `SFTMixTrainer` applies too, for a
  trainer built in Python);
- for SFTMix: `tokens_per_micro_batch` with accelerate's `split_batches`.
"""

from __future__ import annotations

import logging
import os

from sftmix_trl.configs import ModelArguments
from sftmix_trl.errors import SFTMixError
from sftmix_trl.model import lora_config, meta_model, quantization_config
from sftmix_trl.sft_trainer import check_attention

logger = logging.getLogger(__name__)

# Every scaling of the logits TRL's fused head applies (`trl.trainer.utils.add_fused_lm_head`); the Mixup loss
# projects the mixed hidden states through the plain head and would not. `tests/test_private_apis.py` checks the list
# against TRL's source.
LOGIT_SCALING_FIELDS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "logits_scaling",
    "lm_head_multiplier",
)
FSDP1_CONFIG = "accelerate_configs/fsdp_qlora.yaml"


class LaunchError(SFTMixError):
    """A setting this run cannot honour, found before anything runs."""


def logit_scaling_problem(config) -> str | None:
    """Why the Mixup loss cannot train a model with this (text) config, or None: it scales its logits."""
    for name in LOGIT_SCALING_FIELDS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"the model ({config.model_type}) scales its logits ({name}); the Mixup loss does not, so SFTMix cannot train it"
    return None


def lora_head_problem(causal_lm) -> str | None:
    """Why the LM head of this `*ForCausalLM` cannot train as configured, or None: a LoRA adapter on it would never
    train (TRL's loss multiplies the hidden states by the head's weight directly; TRL refuses it when the trainer is
    built) and the Mixup loss would project through the head without it."""
    if hasattr(causal_lm.get_output_embeddings(), "base_layer"):
        return (
            "the LM head cannot carry a LoRA adapter (TRL's loss and the Mixup loss read its weight directly, so the "
            "adapter would never train): drop `lm_head` from lora_target_modules"
        )
    return None


def mixup_head_problem(causal_lm) -> str | None:
    """Why SFTMix cannot train this `*ForCausalLM` (with its adapter, if any), or None: the Mixup loss projects the
    mixed hidden states through the plain LM head, so the head must be frozen or fully trained, not LoRA-adapted,
    and must not scale its logits."""
    return lora_head_problem(causal_lm) or logit_scaling_problem(causal_lm.config.get_text_config())


def fsdp_version(training_args) -> int | None:
    """The FSDP version this run will train with, or None without FSDP: the trainer's own `fsdp` setting (which
    transformers turns into FSDP2 unless `fsdp_config` says `version: 1`), else `accelerate launch`'s environment
    (`ACCELERATE_USE_FSDP`, and `FSDP_VERSION`, which accelerate reads as 1 when unset)."""
    plugin = getattr(training_args, "fsdp_plugin_args", None)
    if plugin is not None:
        return int(plugin.get("fsdp_version", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def check_fsdp_quantization(model_args, training_args) -> None:
    if model_args.load_in_4bit and fsdp_version(training_args) == 2:
        raise LaunchError(
            "FSDP2 with a 4-bit base can silently corrupt the packed weights (bitsandbytes #1945, accelerate #3983): "
            f"launch with FSDP1 (`--config_file {FSDP1_CONFIG}`, `fsdp_version: 1`), or set `load_in_4bit: false`"
        )


def _meta_model(model_args, trust_remote_code: bool):
    """The model, with its adapter when LoRA is on, built on the meta device: module names and config only, no
    weights, about a second for an 8B."""
    from peft import get_peft_model

    model = meta_model(model_args, trust_remote_code)[1]
    peft_config = lora_config(model_args)
    return model if peft_config is None else get_peft_model(model, peft_config).get_base_model()


def check_lm_head(model_args, trust_remote_code: bool = False, mixup: bool = False) -> None:
    """`lora_head_problem` (and with `mixup`, `mixup_head_problem`) on the model as the trainer will build it."""
    model = _meta_model(model_args, trust_remote_code)
    problem = mixup_head_problem(model) if mixup else lora_head_problem(model)
    if problem:
        raise LaunchError(problem)


def check_token_budget(training_args) -> None:
    split = training_args.accelerator_config.split_batches
    if getattr(training_args, "tokens_per_micro_batch", None) is not None and split:
        raise LaunchError("`tokens_per_micro_batch` hands whole micro-batches to processes: turn off split_batches")


def _is_sftmix(training_args) -> bool:
    """An `SFTMixConfig` (stage 1 or 2), told by its Mixup field: this check runs before any stage is imported."""
    return hasattr(training_args, "mixup_weight")


def check_before_writing(parsed: tuple) -> None:
    """Every refusal that the parsed arguments of a recipe already decide; raises `SFTMixError`."""
    from transformers import TrainingArguments

    training = next((args for args in parsed if isinstance(args, TrainingArguments)), None)
    for model_args in (args for args in parsed if isinstance(args, ModelArguments)):
        quantization_config(model_args)
        if training is None:
            continue
        if training.padding_free:
            check_attention(model_args.attn_implementation)
        check_fsdp_quantization(model_args, training)
        mixup = _is_sftmix(training)  # stage 1 too: its table is for stage 2
        if model_args.use_peft or mixup:
            check_lm_head(model_args, training.trust_remote_code, mixup)
    if _is_sftmix(training):
        check_token_budget(training)
