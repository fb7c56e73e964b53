"""Every private API of TRL, transformers, PEFT, accelerate, bitsandbytes, torch and lm-eval that sftmix_trl relies
on, named once here, with the signature or attribute the package uses: an upgrade that moves one fails this test in
CI, not a user's run hours in. pyproject.toml pins each library below its next release line; raise a pin only with
this test passing on the new release. A new private use in the package belongs in this list."""

import inspect

import pytest


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def source(obj) -> str:
    return inspect.getsource(obj)


def check_tokenize():  # data.checks: a prompt's length as TRL tokenises it
    from trl.data_utils import _tokenize

    assert parameters(_tokenize)[:2] == ["processing_class", "input"]


def check_prepare_dataset():  # data.checks.prepare_like_trl, sft_trainer.TruncatingSFTTrainer
    from trl import SFTTrainer

    assert parameters(SFTTrainer._prepare_dataset) == [
        "self",
        "dataset",
        "processing_class",
        "args",
        "packing",
        "formatting_func",
        "dataset_name",
    ]
    # prepare_like_trl runs it on an instance whose __init__ never ran, setting only these attributes
    import re

    read = set(re.findall(r"self\.(\w+)", source(SFTTrainer._prepare_dataset)))
    assert read <= {"_tokenizer", "chat_template", "completion_only_loss"}, read


def check_sft_trainer_attributes():  # TruncatingSFTTrainer, SFTMixTrainer
    from trl import SFTTrainer

    init = source(SFTTrainer.__init__)
    for attribute in ("self._skip_prepare_dataset", "self._metrics", "self.padding_free"):
        assert attribute in init, attribute


def check_set_signature_columns():  # SFTMixTrainer keeps its row column
    from transformers import Trainer
    from trl import SFTTrainer

    assert parameters(SFTTrainer._set_signature_columns_if_needed) == ["self"]
    assert "self._signature_columns" in source(Trainer._set_signature_columns_if_needed)


def check_get_train_sampler():  # SFTMixTrainer: the paired sampler
    from transformers import Trainer

    assert parameters(Trainer._get_train_sampler) == ["self", "train_dataset"]


def check_remove_unused_columns():  # SFTMixTrainer.get_train_dataloader with a token budget
    from transformers import Trainer

    assert parameters(Trainer._remove_unused_columns)[:3] == ["self", "dataset", "description"]


def check_run_epoch():  # SFTMixTrainer: the paired sampler learns the epoch
    from transformers import Trainer

    assert parameters(Trainer._run_epoch)[:3] == ["self", "model", "epoch"]


def check_get_num_items_in_batch():  # SFTMixTrainer: the Mixup normaliser
    from transformers import Trainer

    assert parameters(Trainer._get_num_items_in_batch) == ["self", "batch_samples", "device"]


def check_load_from_checkpoint():  # NTPTrainer: resume in the run's dtypes
    from transformers import Trainer

    assert parameters(Trainer._load_from_checkpoint) == ["self", "resume_from_checkpoint", "model"]


def check_checkpoint_save_order():  # NTPTrainer.save_model: a checkpoint's adapter lands before a push or rotation
    from transformers import Trainer

    assert parameters(Trainer.save_model) == ["self", "output_dir", "_internal_call"]
    text = source(Trainer._save_checkpoint)
    saved = text.index("self.save_model(output_dir, _internal_call=True)")
    assert saved < text.index("self._push_from_checkpoint(") and saved < text.index("rotate_checkpoints(")


def check_fsdp_resume_loads_from_checkpoint():  # NTPTrainer._load_from_checkpoint: the adapter under FSDP
    from transformers import Trainer

    text = source(Trainer._prepare_for_training)
    assert "self._load_from_checkpoint(resume_from_checkpoint, self.model_wrapped)" in text
    assert "self.is_fsdp_enabled" in text


def check_bnb_4bit_quantize_convert():  # model.quantize_on
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize

    assert parameters(Bnb4bitQuantize.convert)[:2] == ["self", "input_dict"]


def check_attn_implementation():  # sft_trainer.check_attention reads the loaded model's attention
    from transformers import PretrainedConfig

    assert isinstance(inspect.getattr_static(PretrainedConfig, "_attn_implementation"), property)


def check_is_flash_attention_requested():  # sft_trainer.check_attention
    from transformers.utils.generic import is_flash_attention_requested

    assert "requested_attention_implementation" in parameters(is_flash_attention_requested)


def check_render_jinja_template():  # chat_templates: the marked training template
    from transformers.utils.chat_template_utils import render_jinja_template

    assert {"conversations", "chat_template"} <= set(parameters(render_jinja_template))


def check_deepspeed_init():  # confidence.reference: scoring under ZeRO-3 without training
    from transformers.integrations.deepspeed import deepspeed_init

    assert parameters(deepspeed_init) == ["trainer", "num_training_steps", "inference"]


def check_fused_lm_head_outputs():  # SFTMixTrainer: metrics from TRL's fused head
    from trl.trainer.utils import FusedCausalLMOutput

    assert {"log_probs", "label_mask"} <= set(FusedCausalLMOutput.__dataclass_fields__)


def check_fused_lm_head_scalings():  # launch_checks.LOGIT_SCALING_FIELDS covers every scaling TRL applies
    import re

    from trl.trainer.utils import add_fused_lm_head

    from sftmix_trl.launch_checks import LOGIT_SCALING_FIELDS

    read = set(re.findall(r"getattr\(text_config, \"(\w+)\"", source(add_fused_lm_head)))
    router = {"output_router_logits", "router_aux_loss_coef"}  # a mixture of experts' auxiliary loss, not the logits
    assert read and read - router <= set(LOGIT_SCALING_FIELDS), read - router - set(LOGIT_SCALING_FIELDS)


def check_maybe_gather_lm_head_ctx():  # sharded.lm_head
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    assert parameters(maybe_gather_lm_head_ctx) == ["params"]


def check_remove_adapter_name_from_key():  # sharded: adapter keys as PEFT saves them
    from peft.tuners.lora import LoraModel

    assert parameters(LoraModel._remove_adapter_name_from_key) == ["key", "adapter_name"]
    assert LoraModel._remove_adapter_name_from_key("a.lora_A.default.weight", "default") == "a.lora_A.weight"


def check_accelerator_models():  # confidence.reference: was the model prepared in this process
    from accelerate import Accelerator

    assert "self._models = []" in source(Accelerator.__init__)


def check_accelerate_fsdp_environment():  # launch_checks.fsdp_version, model.fsdp_launch
    from accelerate.utils import launch

    text = source(launch)
    assert '"ACCELERATE_USE_FSDP"' in text and '"FSDP_VERSION"' in text


def check_linear4bit_cpu_repack_flag():  # model.disable_bnb_cpu_repack
    from bitsandbytes.nn import Linear4bit

    assert "support_avx512bf16_for_cpu" in source(Linear4bit)


def check_fsdp1_internals():  # sharded._fsdp1_adapter_units
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_WRAPPED_MODULE
    from torch.distributed.fsdp import _flat_param, fully_sharded_data_parallel
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE
    from torch.distributed.fsdp._runtime_utils import _lazy_init

    from sftmix_trl.sharded import _WRAPPER_PREFIXES

    assert parameters(_lazy_init) == ["state", "root_module"]
    assert _WRAPPER_PREFIXES == (f"{FSDP_WRAPPED_MODULE}.", f"{_CHECKPOINT_WRAPPED_MODULE}.")
    assert "self._fqns" in source(_flat_param.FlatParameter)
    assert "._handle" in source(fully_sharded_data_parallel)


def check_lm_eval_yaml_loader():  # evaluation.harness: the project's task files
    from lm_eval.tasks._yaml_loader import load_yaml

    assert parameters(load_yaml)[0] == "path"


def check_lm_eval_task_functions():  # evaluation/tasks/*.yaml: lm-eval's own tasks' functions, by module path
    import importlib
    import re

    from sftmix_trl.evaluation.harness import TASKS_DIR

    named = {
        m for path in TASKS_DIR.glob("*.yaml") for m in re.findall(r"!function (lm_eval\.[\w.]+)", path.read_text())
    }
    assert {
        "lm_eval.tasks.pubmedqa.preprocess_pubmedqa.doc_to_text",
        "lm_eval.tasks.medmcqa.utils_medmcqa.doc_to_text",
    } <= named
    for qualified in named:
        module, _, function = qualified.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function)), qualified


def check_lm_eval_hflm_attributes():  # evaluation.harness: rank, world size and length of a model built here
    from lm_eval.models.huggingface import HFLM

    text = source(HFLM)
    for attribute in ("self._rank", "self._world_size", "self._max_length"):
        assert attribute in text, attribute


PRIVATE_APIS = {
    "trl.data_utils._tokenize": check_tokenize,
    "trl.SFTTrainer._prepare_dataset": check_prepare_dataset,
    "trl.SFTTrainer._skip_prepare_dataset/_metrics/padding_free": check_sft_trainer_attributes,
    "trl.SFTTrainer._set_signature_columns_if_needed": check_set_signature_columns,
    "trl.trainer.utils.FusedCausalLMOutput.log_probs/label_mask": check_fused_lm_head_outputs,
    "trl.trainer.utils.add_fused_lm_head (logit scalings)": check_fused_lm_head_scalings,
    "trl.trainer.utils.maybe_gather_lm_head_ctx": check_maybe_gather_lm_head_ctx,
    "transformers.Trainer._get_train_sampler": check_get_train_sampler,
    "transformers.Trainer._remove_unused_columns": check_remove_unused_columns,
    "transformers.Trainer._run_epoch": check_run_epoch,
    "transformers.Trainer._get_num_items_in_batch": check_get_num_items_in_batch,
    "transformers.Trainer._load_from_checkpoint": check_load_from_checkpoint,
    "transformers.Trainer.save_model(_internal_call) first in _save_checkpoint": check_checkpoint_save_order,
    "transformers.Trainer._prepare_for_training: FSDP resume through _load_from_checkpoint": (
        check_fsdp_resume_loads_from_checkpoint
    ),
    "transformers.integrations.bitsandbytes.Bnb4bitQuantize.convert": check_bnb_4bit_quantize_convert,
    "transformers.PretrainedConfig._attn_implementation": check_attn_implementation,
    "transformers.utils.generic.is_flash_attention_requested": check_is_flash_attention_requested,
    "transformers.utils.chat_template_utils.render_jinja_template": check_render_jinja_template,
    "transformers.integrations.deepspeed.deepspeed_init": check_deepspeed_init,
    "peft.LoraModel._remove_adapter_name_from_key": check_remove_adapter_name_from_key,
    "accelerate.Accelerator._models": check_accelerator_models,
    "accelerate launch: ACCELERATE_USE_FSDP, FSDP_VERSION": check_accelerate_fsdp_environment,
    "bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu": check_linear4bit_cpu_repack_flag,
    "torch FSDP1: _lazy_init, _handle, FlatParameter._fqns, wrapper prefixes": check_fsdp1_internals,
    "lm_eval.tasks._yaml_loader.load_yaml": check_lm_eval_yaml_loader,
    "lm_eval HFLM._rank/_world_size/_max_length": check_lm_eval_hflm_attributes,
    "lm_eval.tasks.<task>.<module> functions of the project's task YAMLs": check_lm_eval_task_functions,
}


@pytest.mark.parametrize("check", PRIVATE_APIS.values(), ids=PRIVATE_APIS.keys())
def test_private_api_still_has_the_shape_sftmix_trl_uses(check):
    check()
