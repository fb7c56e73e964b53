"""The commands chained as a user runs them on a shipped config: train -> report -> merge -> generate -> evaluate ->
export, each one a separate process reading what the one before wrote.

The run trains with the Alpaca template the shipped Llama-3.1 and Mistral configs use
(`configs/templates/alpaca.jinja`) on a base that has a chat template of its own (SmolLM2's ChatML): every later
command must render prompts the way the run trained, from the folder it was handed, and say so in what it writes.
The base is a 2-layer random Llama with SmolLM2's tokenizer, which llama.cpp's converter knows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_recipe

TEMPLATE = ROOT / "configs" / "templates" / "alpaca.jinja"
DATA = "data/demo/health_qa.json"
HELD_OUT = "8"
PROMPT = "What are the symptoms of anaemia?"


def sftmix_trl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`sftmix-trl COMMAND ...` as a user types it, in a fresh process."""
    cmd = [sys.executable, "-m", "sftmix_trl.cli", *args]
    env_note = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env_note}
    )
    assert result.returncode == 0, f"{' '.join(args[:1])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def base(smol_tiny) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and its own ChatML template."""
    return smol_tiny


@pytest.fixture(scope="module")
def run_args(base, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("chain") / "sftmix"
    return [
        "--config", "configs/demo/sftmix_qlora.yaml", "--model_name_or_path", str(base), "--output_dir", str(out),
        "--chat_template_path", str(TEMPLATE), "--dataset_name", DATA, "--dataset_mixture", "null",
        "--max_train_examples", "32", "--eval_split_size", HELD_OUT, "--max_length", "256",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(run_args) -> Path:
    """Stage 1 + stage 2 through `accelerate launch recipes/sftmix.py`, as the README's launch line."""
    result = run_recipe("sftmix.py", *run_args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Path(run_args[run_args.index("--output_dir") + 1])


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Q1?"},
    {"role": "assistant", "content": "A1."},
    {"role": "user", "content": PROMPT},
]


def rendering(template: str, tokenizer_folder: Path) -> str:
    """The prompt a template makes of a conversation (a merged or exported model ships the template without its
    `{% generation %}` markers, which render nothing)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    tokenizer.chat_template = template
    return tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_train_report_merge_generate_evaluate_export_on_a_shipped_config(base, run_args, run, tmp_path):
    from transformers import AutoTokenizer

    # train: the adapter, its tokenizer with the run's template (not the base's), the card, the table
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "sftmix_run.json"):
        assert (run / name).is_file(), name
    assert (run / "confidence" / "confidence.parquet").is_file()
    trained = rendering(TEMPLATE.read_text(), base)
    assert trained.startswith("Be brief.\n\n### Instruction:\nQ1?")
    assert rendering(AutoTokenizer.from_pretrained(run).chat_template, base) == trained
    assert rendering(AutoTokenizer.from_pretrained(base).chat_template, base) != trained

    # report: reuses the run's table (same data preparation), writes the report over every scored example
    report = sftmix_trl("report", *run_args)
    assert "data report:" in report.stdout
    import pyarrow.parquet as pq

    table_ids = sorted(pq.read_table(run / "confidence" / "confidence.parquet")["example_id"].to_pylist())
    assert sorted(pq.read_table(run / "confidence" / "report.parquet")["example_id"].to_pylist()) == table_ids

    # merge into the weights the adapter saw: measured on the run's held-out split, the run's template shipped
    merged = tmp_path / "merged"
    sftmix_trl("merge", "--adapter_path", str(run), "--output_dir", str(merged), "--target", "dequantized")
    record = json.loads((merged / "sftmix_merge.json").read_text())
    figures = record["figures"]
    assert abs(figures["merged_perplexity"] - figures["trained_perplexity"]) <= 1e-3 * figures["trained_perplexity"]
    assert rendering(AutoTokenizer.from_pretrained(merged).chat_template, base) == trained
    card = (merged / "README.md").read_text()
    assert "What this merge ships" in card and f"{figures['merged_perplexity']:.4f}" in card

    # generate from the adapter folder: answers through the run's tokenizer
    replies = tmp_path / "replies.jsonl"
    sftmix_trl("generate", "--adapter_path", str(run), "--prompt", PROMPT, "--max_new_tokens", "6",
               "--output_file", str(replies))  # fmt: skip
    assert [json.loads(line)["prompt"] for line in replies.read_text().splitlines()] == [PROMPT]

    # evaluate base + adapter (the held-out split its run records) and the merged folder (the same split, named):
    # same template, same perplexity
    results = {}
    held_out = ["--perplexity_data", DATA, "--perplexity_held_out", HELD_OUT]
    for name, model in (("adapter", ["--adapter_path", str(run)]), ("merged", ["--model_name_or_path", str(merged),
                                                                            "--load_in_4bit", "false", *held_out])):  # fmt: skip
        out = tmp_path / f"eval-{name}"
        sftmix_trl("evaluate", *model, "--tasks", "perplexity", "--output_dir", str(out))
        results[name] = json.loads((out / "eval_results.json").read_text())
    for payload in results.values():
        assert rendering(payload["model"]["chat_template"], base) == trained
    ppl = {name: payload["results"]["perplexity"]["perplexity"] for name, payload in results.items()}
    assert abs(ppl["adapter"] - ppl["merged"]) <= 1e-3 * ppl["adapter"], ppl
    assert abs(ppl["adapter"] - figures["trained_perplexity"]) <= 1e-3 * ppl["adapter"], (ppl, figures)

    # export: the dequantised merge in GGUF, the run's template embedded, checked against the merged model
    gguf = tmp_path / "gguf"
    sftmix_trl("export", "--adapter_path", str(run), "--output_dir", str(gguf), "--gguf", "f16",
               "--merge_target", "dequantized", "--eval_limit", "4", "--check_prompts", "1",
               "--max_new_tokens", "4")  # fmt: skip
    check = json.loads((gguf / "export_check.json").read_text())
    assert check["passed"] and check["template_renders_same"]
    from sftmix_trl.after_training.export import gguf_metadata

    assert rendering(gguf_metadata(next(gguf.glob("*.gguf")), "tokenizer.chat_template"), base) == trained
