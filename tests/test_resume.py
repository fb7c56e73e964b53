"""Production behaviour with real processes and real signals: SIGKILL and resume in both stages, and publishing
that fails cleanly after everything is saved."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, run_recipe
from safetensors.torch import load_file

from sftmix_trl.confidence import ConfidenceTable

COMMON = [
    "--config", "configs/demo/sftmix_qlora.yaml", "--eval_split_size", "0", "--eval_strategy", "no",
    "--max_length", "512", "--lora_dropout", "0", "--logging_steps", "1",
]  # fmt: skip


def launch_in_background(recipe: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "recipes" / recipe), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip


def kill_when(process: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "timed out waiting for the kill point"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the training process alike
    process.wait()


@pytest.mark.slow
def test_stage2_killed_after_a_checkpoint_resumes_to_the_same_adapter(tiny_model, tmp_path):
    args = [*COMMON, "--model_name_or_path", str(tiny_model), "--max_train_examples", "24",
            "--per_device_train_batch_size", "4", "--reference_batch_size", "4", "--max_steps", "40",
            "--learning_rate", "1e-2", "--save_strategy", "steps", "--save_steps", "4"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_recipe("sftmix.py", *args, "--output_dir", str(full)).returncode == 0

    process = launch_in_background("sftmix.py", *args, "--output_dir", str(cut))
    checkpoint = cut / "checkpoint-8"
    kill_when(process, lambda: (checkpoint / "trainer_state.json").is_file() and (cut / "checkpoint-12").exists())
    assert not (cut / "adapter_model.safetensors").exists()  # really killed before the end
    resumed = run_recipe("sftmix.py", *args, "--output_dir", str(cut), "--resume_from_checkpoint", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = load_file(full / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    for name, tensor in expected.items():
        np.testing.assert_allclose(got[name].float().numpy(), tensor.float().numpy(), rtol=1e-4, atol=1e-6)
    history = json.loads((cut / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 41))  # the state carried over, no step twice


@pytest.mark.slow
def test_stage1_killed_during_scoring_skips_the_finished_snapshots(tiny_model, tmp_path):
    args = [*COMMON, "--model_name_or_path", str(tiny_model), "--max_train_examples", "96",
            "--per_device_train_batch_size", "4", "--reference_batch_size", "8", "--scoring_batch_size", "1",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    scores = tmp_path / "run" / "confidence" / "scores"
    process = launch_in_background("confidence.py", *args)
    kill_when(process, lambda: scores.is_dir() and len(list(scores.glob("*.parquet"))) == 1)
    assert not (tmp_path / "run" / "confidence" / "confidence.parquet").exists()
    finished = sorted(p.name for p in scores.glob("*.parquet"))

    rerun = run_recipe("confidence.py", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "snapshot 1/3" in log and "scores found, skipped" in log
    assert "scoring snapshot 1/3" not in log  # its progress bar never ran again
    table = ConfidenceTable.load(tmp_path / "run" / "confidence")
    assert np.isfinite(table.perplexities).all() and len(table.example_ids) == 96
    assert finished == [f"step-{table.metadata['snapshot_steps'][0]}.parquet"]


@pytest.mark.slow
def test_push_without_token_fails_in_one_line_after_saving(tiny_model, tmp_path):
    out = tmp_path / "out"
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = run_recipe("sft.py", "--config", "configs/demo/sft_qlora.yaml", "--model_name_or_path",
                        str(tiny_model), "--output_dir", str(out), "--max_train_examples", "8", "--eval_split_size",
                        "0", "--eval_strategy", "no", "--max_steps", "1", "--save_strategy", "no", "--push_to_hub",
                        "true", "--hub_model_id", "someone/demo-adapter", env=env)  # fmt: skip
    assert result.returncode != 0
    assert "error: push_to_hub: no Hugging Face token" in result.stdout + result.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


@pytest.mark.slow
def test_sft_killed_after_a_checkpoint_resumes_to_the_same_adapter(tiny_model, tmp_path):
    """A 4-bit base: TRL trains the adapter in bf16; resuming in float32 (PEFT's reload) would end elsewhere."""
    args = ["--config", "configs/demo/sft_qlora.yaml", "--model_name_or_path", str(tiny_model),
            "--max_train_examples", "16", "--eval_split_size", "0", "--eval_strategy", "no", "--max_length", "512",
            "--lora_dropout", "0", "--logging_steps", "1", "--per_device_train_batch_size", "4", "--max_steps",
            "24", "--learning_rate", "1e-2", "--save_strategy", "steps", "--save_steps", "4",
            "--save_total_limit", "10"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_recipe("sft.py", *args, "--output_dir", str(full)).returncode == 0

    process = launch_in_background("sft.py", *args, "--output_dir", str(cut))
    checkpoint = cut / "checkpoint-8"
    kill_when(process, lambda: (checkpoint / "trainer_state.json").is_file() and (cut / "checkpoint-12").exists())
    assert not (cut / "adapter_model.safetensors").exists()  # really killed before the end
    resumed = run_recipe("sft.py", *args, "--output_dir", str(cut), "--resume_from_checkpoint", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = load_file(full / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == torch.bfloat16, name
        np.testing.assert_allclose(got[name].float().numpy(), tensor.float().numpy(), rtol=1e-4, atol=1e-6)
    history = json.loads((cut / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 25))
