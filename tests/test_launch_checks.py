"""Refusals known at launch stop the recipe in one line before anything is written, not when stage 2 starts (after
the whole of stage 1) or deep in a library's traceback."""

import json
import shutil

import pytest
from conftest import demo_argv, recipe_stop_message

from sftmix_trl import SFTMixError
from sftmix_trl.commands import confidence as confidence_recipe
from sftmix_trl.commands import sft as sft_recipe
from sftmix_trl.commands import sftmix as sftmix_recipe
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig, parse_args
from sftmix_trl.launch_checks import check_before_writing, fsdp_version
from sftmix_trl.runs import check_output_dir, resolve_resume
from sftmix_trl.sftmix.config import SFTMixConfig

SFT_TYPES = (ScriptArguments, SFTConfig, ModelArguments)
SFTMIX_TYPES = (ScriptArguments, SFTMixConfig, ModelArguments)


@pytest.mark.parametrize("recipe", [sftmix_recipe, confidence_recipe, sft_recipe])
def test_lora_on_the_lm_head_is_refused_before_stage_1(tiny_model, tmp_path, monkeypatch, recipe):
    """TRL refuses it when its trainer is built: in an SFTMix run, after the data preparation (and stage 1)."""
    out = tmp_path / "out"
    name = recipe.__name__.rsplit(".", 1)[1].replace("confidence", "sftmix")
    argv = demo_argv(name, tiny_model, out, "--lora_target_modules", "q_proj", "lm_head")
    text = recipe_stop_message(recipe.main, recipe.ARGUMENTS, argv, monkeypatch)
    assert text == (
        "error: the LM head cannot carry a LoRA adapter (TRL's loss and the Mixup loss read its weight directly, so "
        "the adapter would never train): drop `lm_head` from lora_target_modules"
    )
    assert not out.exists()


def test_all_linear_leaves_the_lm_head_alone(tiny_model, tmp_path):
    """peft's `all-linear` excludes the output layer: the shipped configs pass the check."""
    argv = demo_argv("sftmix", tiny_model, tmp_path / "out")
    check_before_writing(parse_args(SFTMIX_TYPES, argv))


def test_the_head_check_builds_no_deepspeed_model_under_zero3(tiny_model, tmp_path, monkeypatch):
    """Under ZeRO-3 transformers' `from_config` partitions a model with `deepspeed.zero.Init`; the check's meta model
    must not (here deepspeed is absent: `from_config` would fail to import it)."""
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "is_deepspeed_zero3_enabled", lambda: True)
    argv = demo_argv("sftmix", tiny_model, tmp_path / "out", "--lora_target_modules", "q_proj", "lm_head")
    with pytest.raises(SFTMixError, match="the LM head cannot carry a LoRA adapter"):
        check_before_writing(parse_args(SFTMIX_TYPES, argv))


@pytest.mark.parametrize("field, value", [("output_multiplier", 2.0), ("final_logit_softcapping", 30.0)])
def test_a_model_scaling_its_logits_is_refused_before_stage_1(tiny_model, tmp_path, monkeypatch, field, value):
    scaled = tmp_path / "scaled"
    shutil.copytree(tiny_model, scaled)
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, field: value}))
    out = tmp_path / "out"
    argv = demo_argv("sftmix", scaled, out)
    text = recipe_stop_message(sftmix_recipe.main, sftmix_recipe.ARGUMENTS, argv, monkeypatch)
    assert (
        text
        == f"error: the model (llama) scales its logits ({field}); the Mixup loss does not, so SFTMix cannot train it"
    )
    assert not out.exists()


def test_fsdp_version_follows_the_trainers_setting_then_accelerates_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    plain = SFTConfig(output_dir=str(tmp_path), report_to="none")
    assert fsdp_version(plain) is None
    assert fsdp_version(SFTConfig(output_dir=str(tmp_path), report_to="none", fsdp="full_shard")) == 2  # its default
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch` with an FSDP config
    assert fsdp_version(plain) == 1  # accelerate's default when the config names no version
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_version(plain) == 2


def test_fsdp2_with_a_4bit_base_is_refused_before_any_write(tiny_model, tmp_path, monkeypatch):
    """bitsandbytes #1945 (FSDP2 silently corrupts packed 4-bit weights), accelerate #3983 (loss 0, NaN gradients)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "out"
    argv = demo_argv("sft", tiny_model, out, "--bnb_4bit_quant_storage", "float32")
    text = recipe_stop_message(sft_recipe.main, sft_recipe.ARGUMENTS, argv, monkeypatch)
    assert text.startswith("error: FSDP2 with a 4-bit base can silently corrupt the packed weights")
    assert "--config_file accelerate_configs/fsdp_qlora.yaml" in text and "\n" not in text
    assert not out.exists()
    monkeypatch.setenv("FSDP_VERSION", "1")  # the known-good path passes the check
    check_before_writing(parse_args(SFT_TYPES, argv))
    monkeypatch.setenv("FSDP_VERSION", "2")  # and a 16-bit base under FSDP2 too
    check_before_writing(parse_args(SFT_TYPES, [*argv, "--load_in_4bit", "false"]))


def test_a_token_budget_with_split_batches_is_refused_before_stage_1(tiny_model, tmp_path):
    argv = demo_argv("sftmix", tiny_model, tmp_path / "out", "--tokens_per_micro_batch", "512")
    check_before_writing(parse_args(SFTMIX_TYPES, argv))
    split = [*argv, "--accelerator_config", json.dumps({"split_batches": True})]
    with pytest.raises(SFTMixError, match="`tokens_per_micro_batch` hands whole micro-batches"):
        check_before_writing(parse_args(SFTMIX_TYPES, split))


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text(f"model_name_or_path: {tiny_model}\nlearning_rate: [2e-4\nlora_r: 8\n")
    text = recipe_stop_message(sft_recipe.main, sft_recipe.ARGUMENTS, ["--config", str(path)], monkeypatch)
    assert text == (
        f"error: YAML syntax error in {path}, line 3, column 7: expected ',' or ']', but got ':' (while parsing a "
        "flow sequence from line 2, column 16)"
    )


def test_a_yaml_syntax_error_in_a_mixture_file_is_one_line(tmp_path):
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text("datasets:\n  - path: a.jsonl\n   fraction: 0.5\n")
    args = ["--dataset_mixture", str(mixture), "--output_dir", str(tmp_path)]
    with pytest.raises(
        SystemExit, match=rf"^error: YAML syntax error in {mixture}, line 3, column 4: expected <block end>"
    ):
        parse_args(SFT_TYPES, args)


def test_run_folder_refusals_are_sftmix_errors(tmp_path):
    """`launch` turns them into one line; a caller of the library catches one type."""
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", resume_from_checkpoint="true")
    with pytest.raises(SFTMixError, match="resume_from_checkpoint is set but .* has no checkpoint"):
        resolve_resume(args)
    args.resume_from_checkpoint = str(tmp_path / "missing")
    with pytest.raises(SFTMixError, match="checkpoint folder not found"):
        resolve_resume(args)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "other.txt").write_text("another run's file")
    with pytest.raises(SFTMixError, match="is not empty and holds another run"):
        check_output_dir(args, {"learning_rate": 1}, resume=None)
