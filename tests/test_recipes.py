"""The recipes as users run them: `accelerate launch recipes/<stage>.py --config <yaml>` in a subprocess, on the
CPU, single-process, with the 2-process gloo config and through the Slurm script; and the bad inputs that must stop before any training."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_recipe, write_jsonl
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sftmix_trl.confidence import ConfidenceTable
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
from sftmix_trl.runs import launch
from sftmix_trl.sftmix.config import SFTMixConfig

TINY = [  # small sizes on top of the demo YAMLs; the model path and output_dir are added per test
    "--max_train_examples",
    "24",
    "--eval_split_size",
    "0",
    "--eval_strategy",
    "no",
    "--max_length",
    "512",  # no example loses its response to truncation: every run sees the same 24
    "--lora_dropout",
    "0",  # dropout masks depend on how a batch is split over processes
    "--per_device_train_batch_size",
    "4",
    "--save_strategy",
    "no",
    "--logging_steps",
    "1",
]


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def log_history(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def adapter_changes_outputs(base_path, adapter_dir) -> bool:
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    base = AutoModelForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, adapter_dir)(ids).logits
    return not torch.allclose(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [1, 2])
def test_sft_recipe_trains_and_saves_a_working_adapter(tiny_model, tmp_path, num_processes):
    out = tmp_path / "sft"
    ok(
        run_recipe(
            "sft.py",
            "--config",
            "configs/demo/sft_qlora.yaml",
            "--model_name_or_path",
            str(tiny_model),
            "--output_dir",
            str(out),
            *TINY,
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-2",
            num_processes=num_processes,
        )
    )
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickle in the published folder
    assert "library_name: peft" in (out / "README.md").read_text()
    assert len([h for h in log_history(out) if "loss" in h]) == 3
    assert adapter_changes_outputs(tiny_model, out)


def _table(directory):
    return ConfidenceTable.load(directory)


@pytest.mark.slow
def test_two_process_runs_match_one_process_on_the_same_global_batch(tiny_model, tmp_path):
    """Stage 1: the same table from 1 and 2 processes (uneven scoring shards). Stage 2: the same losses."""
    common = [
        "--config",
        "configs/demo/sftmix_qlora.yaml",
        "--model_name_or_path",
        str(tiny_model),
        *TINY,
        "--scoring_batch_size",
        "5",
        "--reference_learning_rate",
        "1e-2",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run_recipe("confidence.py", *common, "--output_dir", str(one), "--reference_batch_size", "8"))
    result = ok(
        run_recipe("confidence.py", *common, "--output_dir", str(two), "--reference_batch_size", "4", num_processes=2)
    )
    assert "scoring snapshot 3/3" in result.stderr
    table_one, table_two = _table(one / "confidence"), _table(two / "confidence")
    assert table_one.example_ids == table_two.example_ids and len(table_one.example_ids) == 24
    np.testing.assert_allclose(table_two.perplexities, table_one.perplexities, rtol=2e-3)
    assert table_two.split() == table_one.split()

    assert_stage2_two_processes_match_one(common, one, two)


def assert_stage2_two_processes_match_one(common: list[str], one, two) -> None:
    """Stage 2 on `one`'s table: 2 processes x 4 per device log the losses of 1 process x 8, step by step."""
    stage2 = [*common, "--confidence_table", str(one / "confidence"), "--max_steps", "3", "--learning_rate", "1e-2"]
    ok(run_recipe("sftmix.py", *stage2, "--output_dir", str(one / "train"), "--per_device_train_batch_size", "8"))
    ok(
        run_recipe(
            "sftmix.py",
            *stage2,
            "--output_dir",
            str(two / "train"),
            "--per_device_train_batch_size",
            "4",
            num_processes=2,
        )
    )
    logs_one = [h for h in log_history(one / "train") if "ntp_loss" in h]
    logs_two = [h for h in log_history(two / "train") if "ntp_loss" in h]
    assert len(logs_one) == len(logs_two) == 3
    for a, b in zip(logs_one, logs_two):
        for key in ("loss", "ntp_loss", "mixup_loss", "ntp_loss_confident", "ntp_loss_unconfident", "mixup_lambda"):
            assert b[key] == pytest.approx(a[key], rel=2e-3), key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Slurm's srun and scontrol on one host: the command once per "node", each with its SLURM_NODEID; every node is this one
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" > "$NODE_LOGS/node$node.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && tr ',' '\\n' <<< "$3"
"""


@pytest.mark.slow
def test_slurm_script_on_two_machines_matches_one_process(tiny_model, tmp_path):
    """scripts/slurm/sftmix_multinode.sbatch, run as Slurm would run it on two one-process "nodes" (this host twice,
    gloo on the CPU, a shared output_dir): its launch line (`--num_machines --machine_rank --main_process_ip`) gives
    the same confidence table and losses as one process with their batch, and an adapter."""
    common = [
        "--config",
        "configs/demo/sftmix_qlora.yaml",
        "--model_name_or_path",
        str(tiny_model),
        *TINY,
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-2",
        "--reference_learning_rate",
        "1e-2",
    ]
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    ok(run_recipe("sftmix.py", *common, "--output_dir", str(one), "--per_device_train_batch_size", "8"))
    fake_bin, logs = tmp_path / "bin", tmp_path / "logs"
    fake_bin.mkdir()
    logs.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(fake_bin), os.path.dirname(sys.executable), os.environ["PATH"]]),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1",
        "GPUS_PER_NODE": "1",
        "ACCELERATE_CONFIG": "accelerate_configs/cpu_2proc.yaml",
        "MAIN_PROCESS_PORT": str(_free_port()),
        "NODE_LOGS": str(logs),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    recipe = [*common, "--output_dir", str(nodes), "--per_device_train_batch_size", "4", "--reference_batch_size", "4"]
    job = subprocess.run(
        ["bash", "scripts/slurm/sftmix_multinode.sbatch", *recipe],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=900,
    )
    outputs = [(logs / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert job.returncode == 0, job.stderr[-2000:] + outputs[0][-4000:] + outputs[1][-4000:]
    assert "on 2 process(es)" in outputs[0]
    table_one, table_nodes = _table(one / "confidence"), _table(nodes / "confidence")
    assert table_nodes.example_ids == table_one.example_ids
    np.testing.assert_allclose(table_nodes.perplexities, table_one.perplexities, rtol=2e-3)
    assert table_nodes.split() == table_one.split()
    logs_one = [h for h in log_history(one) if "ntp_loss" in h]
    logs_nodes = [h for h in log_history(nodes) if "ntp_loss" in h]
    assert len(logs_one) == len(logs_nodes) == 3
    for a, b in zip(logs_one, logs_nodes):
        for key in ("loss", "ntp_loss", "mixup_loss", "mixup_lambda"):
            assert b[key] == pytest.approx(a[key], rel=2e-3), key
    assert adapter_changes_outputs(tiny_model, nodes)


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [1, 2])
def test_sftmix_recipe_end_to_end_in_4bit(tiny_model, tmp_path, num_processes):
    out = tmp_path / "sftmix"
    args = [
        "--config",
        "configs/demo/sftmix_qlora.yaml",
        "--model_name_or_path",
        str(tiny_model),
        "--output_dir",
        str(out),
        *TINY,
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-2",
        "--reference_batch_size",
        "4",
    ]
    ok(run_recipe("sftmix.py", *args, num_processes=num_processes))
    assert (out / "adapter_model.safetensors").is_file()
    for name in ("confidence.parquet", "metadata.json", "confidence.png"):
        assert (out / "confidence" / name).is_file()
    card = (out / "README.md").read_text()
    meta = json.loads((out / "confidence" / "metadata.json").read_text())
    assert f"{meta['num_confident']} / {meta['num_unconfident']}" in card and "mixup_weight" in card
    assert "![Confidence split](confidence/confidence.png)" in card
    assert adapter_changes_outputs(tiny_model, out)
    # A second run of stage 1 reuses the table instead of training a reference again.
    rerun = ok(run_recipe("confidence.py", *args, num_processes=num_processes))
    assert "reusing the confidence table" in rerun.stdout + rerun.stderr
    # The report command on that table, from as many processes: the reference's prompt fit (a pass not cached yet)
    report_args = ["--prompt_fit_model", "reference", "--report_top_k", "3"]
    ok(run_recipe("report.py", *args, *report_args, num_processes=num_processes))
    assert (out / "confidence" / "report.md").read_text().count("\n### ") == 3
    assert "prompt_fit-reference.parquet" in {p.name for p in (out / "confidence" / "scores").iterdir()}


@pytest.mark.slow
def test_demo_pipeline_on_smollm2(demo_model, tmp_path):
    out = tmp_path / "demo"
    ok(
        run_recipe(
            "sftmix.py",
            "--config",
            "configs/demo/sftmix_qlora.yaml",
            "--output_dir",
            str(out),
            "--model_name_or_path",
            str(demo_model),
            "--max_train_examples",
            "16",
            "--eval_split_size",
            "8",
            "--reference_batch_size",
            "4",
            "--max_steps",
            "2",
            "--max_length",
            "160",
            "--save_strategy",
            "no",
        )
    )
    history = log_history(out)
    assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)
    assert any("eval_loss" in h for h in history)
    table = _table(out / "confidence")
    assert np.isfinite(table.perplexities).all() and table.perplexities.min() > 1


# -- bad input: one readable line, before any training, and output_dir untouched ---------------------------------------


def _run_in_process(recipe: str, argv: list[str], monkeypatch) -> str:
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", ROOT / "recipes" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    types = (ScriptArguments, SFTMixConfig if recipe == "sftmix" else SFTConfig, ModelArguments)
    monkeypatch.setattr(sys, "argv", [f"{recipe}.py", *argv])
    with pytest.raises(SystemExit) as stop:
        launch(module.main, types)
    return str(stop.value)


@pytest.fixture
def bad_input_dir(tmp_path):
    write_jsonl(tmp_path / "missing_field.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    (tmp_path / "malformed.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "a", "completion": "  "}, {"prompt": "b", "completion": ""}])
    (tmp_path / "bad.yaml").write_text("learning_rat: 1.0e-4\n")
    return tmp_path


@pytest.mark.parametrize(
    "recipe, extra, message",
    [
        ("sft", ["--learning_rat", "1e-4"], r"learning_rat.*did you mean `learning_rate`"),
        ("sft", ["--dataset_name", "{d}/nope.jsonl"], r"data file not found: .*nope.jsonl"),
        ("sft", ["--dataset_name", "{d}/missing_field.jsonl"], r"missing_field.jsonl, line 2: missing field 'output'"),
        ("sft", ["--dataset_name", "{d}/malformed.jsonl"], r"malformed.jsonl, line 2: malformed JSON"),
        ("sft", ["--dataset_name", "{d}/empty.jsonl"], r"empty.jsonl: the dataset is empty"),
        ("sft", ["--dataset_name", "{d}/blank.jsonl"], r"no record can train: 2 every assistant reply is empty"),
        ("sft", ["--model_name_or_path", "/no/such/model"], r"model path does not exist: /no/such/model"),
        ("sftmix", ["--per_device_train_batch_size", "3"], r"must be even"),
        ("sftmix", ["--confidence_table", "{d}/none"], r"no confidence table in .*none"),
    ],
)
def test_bad_input_stops_with_one_readable_line(tiny_model, bad_input_dir, monkeypatch, recipe, extra, message):
    out = bad_input_dir / "out"
    argv = [
        "--config",
        f"configs/demo/{recipe}_qlora.yaml",
        "--model_name_or_path",
        str(tiny_model),
        "--output_dir",
        str(out),
        *[a.format(d=bad_input_dir) for a in extra],
    ]
    if "--dataset_name" in extra:
        argv += ["--dataset_mixture", "null"]
    text = _run_in_process(recipe, argv, monkeypatch)
    assert text.startswith("error:") and "\n" not in text
    assert __import__("re").search(message, text), text
    assert not out.exists()


def test_fsdp_with_uint8_4bit_storage_stops_before_any_write(tiny_model, bad_input_dir, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    out = bad_input_dir / "fsdp_out"
    argv = ["--config", "configs/demo/sftmix_qlora.yaml", "--model_name_or_path", str(tiny_model), "--output_dir"]
    text = _run_in_process("sftmix", [*argv, str(out)], monkeypatch)
    assert text == (
        "error: FSDP with a 4-bit base needs bnb_4bit_quant_storage equal to the compute dtype: set "
        "`bnb_4bit_quant_storage: float32` (it is uint8)"
    )
    assert not out.exists()


def test_unknown_yaml_key_names_the_file(bad_input_dir, monkeypatch):
    text = _run_in_process("sft", ["--config", str(bad_input_dir / "bad.yaml")], monkeypatch)
    assert "learning_rat" in text and "bad.yaml" in text and "learning_rate" in text


def test_another_runs_output_dir_is_refused(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("not ours")
    argv = [
        "--config",
        "configs/demo/sft_qlora.yaml",
        "--model_name_or_path",
        str(tiny_model),
        "--output_dir",
        str(out),
    ]
    text = _run_in_process("sft", argv, monkeypatch)
    assert "not empty" in text and "overwrite_output_dir" in text
    assert [p.name for p in out.iterdir()] == ["something.txt"]


def test_a_run_that_saved_no_adapter_stops_with_one_line_before_success(tiny_model, tmp_path, monkeypatch):
    from sftmix_trl.sft_trainer import NTPTrainer

    # What transformers' own save did under FSDP's SHARDED_STATE_DICT: return without writing the adapter
    monkeypatch.setattr(NTPTrainer, "save_model", lambda self, output_dir=None, _internal_call=False: None)
    out = tmp_path / "out"
    argv = ["--config", "configs/demo/sft_qlora.yaml", "--model_name_or_path", str(tiny_model), "--output_dir"]
    text = _run_in_process(
        "sft", [*argv, str(out), "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no"], monkeypatch
    )
    assert text == (
        f"error: sft.py finished but wrote no adapter_model.safetensors, adapter_config.json in {out}; "
        "nothing was published"
    )
