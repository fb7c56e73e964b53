"""Settings that were accepted and then ignored, or failed only deep in a run: each is honoured, or refused in one
line before anything is written."""

import warnings

import pytest
from conftest import demo_argv, recipe_stop_message

from sftmix_trl import SFTMixError
from sftmix_trl.commands import sft as sft_recipe
from sftmix_trl.commands import sftmix as sftmix_recipe
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig, parse_args
from sftmix_trl.sftmix.config import SFTMixConfig


def config(tmp_path, **overrides) -> SFTMixConfig:
    return SFTMixConfig(output_dir=str(tmp_path / "out"), report_to="none", **overrides)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda p: config(p, mixup_lambda_per="batches"), r"`mixup_lambda_per` must be one of \['pair', 'batch'\], got 'batches' \(did you mean 'batch'\?\)"),
        (lambda p: config(p, truncation_mode="keep_begin"), r"`truncation_mode` must be one of .*got 'keep_begin'"),
        (lambda p: SFTConfig(output_dir=str(p), report_to="none", loss_type="nl"), r"`loss_type` must be one of"),
        (lambda p: ScriptArguments(dataset_name="x.json", dataset_format="alpacca"), r"did you mean 'alpaca'"),
        (lambda p: ScriptArguments(dataset_name="x.json", assistant_turns="every"), r"`assistant_turns` must be one"),
        (lambda p: ModelArguments(model_name_or_path="m", dtype="bf16"), r"`dtype` must be one of"),
        (lambda p: ModelArguments(model_name_or_path="m", bnb_4bit_quant_type="nf5"), r"`bnb_4bit_quant_type`"),
    ],
)  # fmt: skip
def test_a_value_outside_a_fields_choices_is_refused_in_python(tmp_path, build, message):
    with pytest.raises(SFTMixError, match=message):
        build(tmp_path)


def test_a_yaml_typo_in_a_choice_stops_the_parser_in_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset_name: x.json\noutput_dir: out\nmixup_lambda_per: batches\n")
    with pytest.raises(SystemExit, match=r"^error: `mixup_lambda_per` must be one of \['pair', 'batch'\]"):
        parse_args((ScriptArguments, SFTMixConfig, ModelArguments), ["--config", str(path)])


def test_the_paired_sampler_draws_from_data_seed_like_transformers_samplers(tiny_model, tmp_path):
    from test_sftmix_trainer import build, make_args

    from sftmix_trl.data.load import load_datasets

    dataset = load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=16))[0]
    orders = {}
    for name, seeds in {
        "data_seed 3": dict(seed=7, data_seed=3),
        "seed 3": dict(seed=3),
        "seed 7": dict(seed=7),
    }.items():
        trainer = build(tiny_model, dataset, make_args(tmp_path / name.replace(" ", "_"), **seeds))
        orders[name] = list(trainer._get_train_sampler())
    assert orders["data_seed 3"] == orders["seed 3"] != orders["seed 7"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(push_confidence_table=True), r"`push_confidence_table` uploads the table with the adapter: set `push_to_hub: true`"),
        (dict(push_confidence_table=True, push_to_hub=True, hub_model_id="me/x", confidence_dir="/elsewhere"), r"the table is in /elsewhere"),
        (dict(confidence_table="/no/such/table"), r"`confidence_table`: no confidence table in /no/such/table"),
        (dict(reference_gradient_accumulation_steps=0), r"`reference_gradient_accumulation_steps` must be >= 1"),
        (dict(reference_learning_rate=0.0), r"`reference_learning_rate` must be > 0"),
    ],
)  # fmt: skip
def test_stage_settings_that_would_be_ignored_or_fail_late_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_checkpointing_uses_the_current_name_without_a_deprecation_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = config(tmp_path)
        off = config(tmp_path, activation_checkpointing=False)
    assert default.activation_checkpointing is True and default.gradient_checkpointing is True  # TRL's default
    assert off.activation_checkpointing is False and off.gradient_checkpointing is False
    # the old name still works, and says which release removes it
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated and will be removed in v6"):
        old = config(tmp_path, gradient_checkpointing=False)
    assert old.activation_checkpointing is False


@pytest.mark.parametrize("recipe", [sft_recipe, sftmix_recipe])
def test_evaluation_without_held_out_data_stops_before_any_write(tiny_model, tmp_path, monkeypatch, recipe):
    """transformers refuses it only when the trainer is built: after the whole of stage 1 in an SFTMix run."""
    out = tmp_path / "out"
    name = recipe.__name__.rsplit(".", 1)[1]
    argv = demo_argv(name, tiny_model, out, "--max_train_examples", "16", "--eval_split_size", "0")
    text = recipe_stop_message(recipe.main, recipe.ARGUMENTS, [*argv, "--eval_strategy", "epoch"], monkeypatch)
    assert (
        text
        == "error: eval_strategy='epoch' needs held-out data: set `eval_split_size` (a fraction or a count), or `eval_strategy: no`"
    )
    assert not out.exists()


def test_shipped_configs_use_the_current_checkpointing_name():
    from conftest import ROOT

    for path in (ROOT / "configs").rglob("*.yaml"):
        assert "gradient_checkpointing" not in path.read_text(), path


def test_gpu_configs_ship_the_attention_measured_on_a_gpu():
    """sdpa until the GPU check (scripts/gpu_check.sh, attention parity) measures another equal and faster: compiled
    flex attention has public reports of per-length recompiles with a silent unfused fallback, backward failures on
    consumer cards and miscomputed sequence boundaries."""
    import yaml
    from conftest import ROOT

    configs = sorted((ROOT / "configs").glob("*/*/*_qlora.yaml"))
    assert len(configs) == 12
    for path in configs:
        assert yaml.safe_load(path.read_text())["attn_implementation"] == "sdpa", path
