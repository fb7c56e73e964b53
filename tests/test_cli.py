"""The `sftmix-trl` command of an installed package."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT


def test_console_script_is_declared_and_points_at_the_cli():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    entry = re.search(r'^sftmix-trl = "(.+)"$', scripts, re.MULTILINE).group(1)
    module, _, function = entry.partition(":")
    assert (module, function) == ("sftmix_trl.cli", "main")
    assert callable(getattr(__import__(module, fromlist=[function]), function))


@pytest.mark.parametrize(
    "argv, code, text", [([], 2, "usage: sftmix-trl"), (["train"], None, "unknown command 'train'")]
)
def test_cli_usage_and_unknown_command(argv, code, text, capsys):
    from sftmix_trl.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = capsys.readouterr().out + (stop.value.code if isinstance(stop.value.code, str) else "")
    assert text in message and (code is None or stop.value.code == code)


def test_cli_under_accelerate_runs_the_demo_config(tiny_model, tmp_path):
    out = tmp_path / "out"
    config = ROOT / "accelerate_configs" / "cpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "sftmix_trl.cli",
           "sft", "--config", "configs/demo/sft_qlora.yaml", "--model_name_or_path", str(tiny_model),
           "--output_dir", str(out), "--max_train_examples", "8", "--eval_split_size", "0", "--eval_strategy", "no",
           "--max_steps", "1", "--save_strategy", "no"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert (
        f"accelerate launch --config_file {config} -m sftmix_trl.cli sft --config configs/demo/sft_qlora.yaml" in card
    )
    assert "gemm_4bit_forward" not in result.stdout + result.stderr  # item 7, in a real 4-bit run
