"""The strict YAML + command-line parser, and every shipped config parsed with its recipe's dataclasses."""

import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig, parse_args
from sftmix_trl.data.load import LOCAL_SUFFIXES, sources_from_args

SFT_TYPES = (ScriptArguments, SFTConfig, ModelArguments)
MIXTURE = {"datasets": [{"path": "data/demo/health_qa.json", "fraction": 0.5}, {"path": "a.jsonl"}], "seed": 3}


@pytest.fixture
def config(tmp_path):
    def write(values: dict) -> str:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **values}))
        return str(path)

    return write


def test_yaml_with_command_line_override(config):
    path = config({"dataset_name": "data/demo/health_qa.json", "learning_rate": 1.0e-4, "lora_r": 8})
    script_args, training_args, model_args = parse_args(SFT_TYPES, ["--config", path, "--learning_rate", "3e-4"])
    assert training_args.learning_rate == 3e-4  # the command line wins
    assert model_args.lora_r == 8  # the YAML beats the default (16)
    assert script_args.dataset_name == "data/demo/health_qa.json"
    assert training_args.output_dir.endswith("out")


def test_unknown_yaml_key_names_it_and_suggests(config):
    path = config({"dataset_name": "x.jsonl", "learning_rat": 1.0e-4})
    with pytest.raises(SystemExit, match=r"learning_rat \(did you mean `learning_rate`\?\) in .*config\.yaml"):
        parse_args(SFT_TYPES, ["--config", path])


@pytest.mark.parametrize("flag", [["--learning_rat", "1e-4"], ["--learning_rat=1e-4"]])
def test_unknown_command_line_flag_names_it_and_suggests(config, flag):
    path = config({"dataset_name": "x.jsonl"})
    with pytest.raises(SystemExit, match=r"--learning_rat \(did you mean `learning_rate`\?\) on the command line"):
        parse_args(SFT_TYPES, ["--config", path, *flag])


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_fields(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(SFT_TYPES, [flag])
    assert stop.value.code == 0
    assert "--learning_rate" in capsys.readouterr().out


def test_negated_boolean_flag(config):
    path = config({"dataset_name": "x.jsonl", "load_in_4bit": True})
    assert parse_args(SFT_TYPES, ["--config", path])[2].load_in_4bit is True
    assert parse_args(SFT_TYPES, ["--config", path, "--no_load_in_4bit"])[2].load_in_4bit is False
    assert parse_args(SFT_TYPES, ["--config", path, "--load_in_4bit", "false"])[2].load_in_4bit is False


def test_dataset_mixture_as_yaml_mapping(config):
    script_args = parse_args(SFT_TYPES, ["--config", config({"dataset_mixture": MIXTURE})])[0]
    assert script_args.dataset_mixture == MIXTURE
    assert script_args.dataset_name is None
    assert [(s.path, s.fraction) for s in sources_from_args(script_args)] == [
        ("data/demo/health_qa.json", 0.5),
        ("a.jsonl", 1.0),
    ]


def test_dataset_mixture_as_json_on_the_command_line(tmp_path):
    args = ["--dataset_mixture", json.dumps(MIXTURE), "--output_dir", str(tmp_path)]
    assert parse_args(SFT_TYPES, args)[0].dataset_mixture == MIXTURE


def test_dataset_name_and_mixture_together_is_an_error(tmp_path):
    args = ["--dataset_name", "x.jsonl", "--dataset_mixture", json.dumps(MIXTURE), "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"Set one of `dataset_name` and `dataset_mixture`"):
        parse_args(SFT_TYPES, args)


def test_dataset_mixture_as_a_file_on_the_command_line(tmp_path):
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(yaml.safe_dump(MIXTURE))
    args = ["--dataset_mixture", str(mixture), "--output_dir", str(tmp_path)]
    assert parse_args(SFT_TYPES, args)[0].dataset_mixture == MIXTURE


def test_dataset_mixture_neither_json_nor_a_file_names_both_forms(tmp_path):
    args = ["--dataset_mixture", str(tmp_path / "missing.yaml"), "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"must be a JSON mapping .* or the path of a YAML/JSON file"):
        parse_args(SFT_TYPES, args)


def test_command_line_dataset_replaces_the_config_files_mixture(config):
    path = config({"dataset_mixture": MIXTURE})
    with pytest.raises(SystemExit, match=r"--dataset_mixture null"):
        parse_args(SFT_TYPES, ["--config", path, "--dataset_name", "x.jsonl"])
    args = ["--config", path, "--dataset_name", "x.jsonl", "--dataset_mixture", "null"]
    script_args = parse_args(SFT_TYPES, args)[0]
    assert script_args.dataset_name == "x.jsonl" and script_args.dataset_mixture is None


def test_bf16_follows_the_device_when_unset(config):
    training_args = parse_args(SFT_TYPES, ["--config", config({"dataset_name": "x.jsonl"})])[1]
    expected = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert training_args.bf16 is expected
    if not torch.cuda.is_available():
        assert training_args.bf16 is False  # TRL's own default would turn bf16 on, even on a CPU


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit, match=r"config file not found: .*nope\.yaml"):
        parse_args(SFT_TYPES, ["--config", str(path)])


# ----------------------------------------------------------------------------------------------------------------------
# Every shipped config parses with the dataclasses of its recipe


CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py"))


def recipe_dataclasses(config_path: Path) -> tuple[type, ...]:
    """The dataclasses of the recipe a config is named after (`sftmix_qlora.yaml` -> recipes/sftmix.py, whose main
    and `ARGUMENTS` live in `sftmix_trl.commands.sftmix`)."""
    matches = [name for name in RECIPES if config_path.stem == name or config_path.stem.startswith(name + "_")]
    assert matches, f"{config_path}: name it after its recipe (<recipe>_*.yaml, one of {RECIPES})"
    return importlib.import_module(f"sftmix_trl.commands.{max(matches, key=len)}").ARGUMENTS


def test_known_recipe_dataclasses():
    from sftmix_trl.sftmix.config import SFTMixConfig

    assert recipe_dataclasses(Path("configs/demo/sft_qlora.yaml")) == SFT_TYPES
    assert recipe_dataclasses(Path("configs/demo/sftmix_qlora.yaml")) == (
        ScriptArguments,
        SFTMixConfig,
        ModelArguments,
    )


def test_configs_exist():
    assert Path("configs/demo/sft_qlora.yaml") in CONFIGS
    assert Path("configs/demo/sftmix_qlora.yaml") in CONFIGS


@pytest.mark.parametrize("config_path", CONFIGS, ids=str)
def test_shipped_config_parses(config_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    dataclass_types = recipe_dataclasses(config_path)
    parsed = parse_args(dataclass_types, ["--config", str(config_path)])
    assert [type(p) for p in parsed] == list(dataclass_types)
    script_args, training_args, model_args = parsed
    values = yaml.safe_load(config_path.read_text())
    for key, value in values.items():  # every key has a home; numbers and booleans arrive unchanged
        holders = [p for p in parsed if hasattr(p, key)]
        assert holders, key
        if isinstance(value, (bool, int, float)):
            assert getattr(holders[0], key) == value, key
    assert script_args.dataset_mixture == values.get("dataset_mixture")
    assert model_args.model_name_or_path
    if not torch.cuda.is_available():
        assert training_args.bf16 is False
    for source in sources_from_args(script_args):  # local data files referenced by the config exist
        if source.path.endswith(LOCAL_SUFFIXES):
            assert (ROOT / source.path).is_file(), source.path


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"
    if "fsdp" in path.name:
        assert config.distributed_type.value == "FSDP" and config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    if "deepspeed" in path.name:
        assert config.deepspeed_config["zero_stage"] == 3
    if path.name.startswith("cpu"):
        assert config.use_cpu
