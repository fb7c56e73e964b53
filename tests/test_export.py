"""`sftmix-trl export`: the GGUF that llama.cpp's own converter writes loads back in transformers, carries the run's
chat template, and passes its check against the merged model; bad input is refused in one line before anything is
written.

The converter does not know the BPE pre-tokenizer of the tests' tiny tokenizer, so the tiny random Llama here uses
SmolLM2's tokenizer (from the demo model); the converter is llama.cpp's, fetched once from the package index. The
tests that run a whole export (merge, convert, read back, score twice) are marked slow: about a minute each."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, ROOT
from test_evaluation import make_adapter

from sftmix_trl.after_training.export import (
    ExportArguments,
    ExportError,
    export,
    gguf_metadata,
    held_out_data,
    stop_strings,
)
from sftmix_trl.after_training.llama_cpp import LlamaCppError, find_llama_cpp


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    try:
        return find_llama_cpp()
    except LlamaCppError as error:  # no package index reachable and no cached copy
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def smol_adapter(smol_tiny, tmp_path_factory) -> Path:
    return make_adapter(smol_tiny, tmp_path_factory.mktemp("smol-adapter"))


def exporting(adapter, out, **kwargs) -> ExportArguments:
    defaults = dict(eval_data=str(DEMO_DATA / "health_qa.json"), eval_limit=4, check_prompts=2, max_new_tokens=8)
    return ExportArguments(adapter_path=str(adapter), output_dir=str(out), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def q8_export(llama_cpp, smol_adapter, tmp_path_factory) -> Path:
    return export(exporting(smol_adapter, tmp_path_factory.mktemp("q8") / "gguf", gguf="q8_0", keep_merged=True))


@pytest.mark.slow
def test_q8_0_export_loads_back_with_the_run_template_and_passes_its_check(smol_tiny, q8_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = q8_export
    gguf_file = out / "gguf-q8_0.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gguf-q8_0.gguf", "README.md", "export_check.json", "Modelfile", "merged"]
    )
    assert not list(out.parent.glob(".gguf.partial-*"))
    template = AutoTokenizer.from_pretrained(smol_tiny).chat_template
    assert gguf_metadata(gguf_file, "tokenizer.chat_template") == template

    check = json.loads((out / "export_check.json").read_text())
    assert check["passed"] and check["template_renders_same"] and check["tokenizer_encodes_same"]
    assert abs(check["perplexity_increase"]) < 0.02 and check["examples"] == 4
    # the figures are those of the files on disk: the GGUF's logits are the merged model's up to 8-bit rounding
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(out / "merged")(["What helps a sore throat?"], return_tensors="pt")
    with torch.no_grad():
        a, b = merged(**ids).logits, loaded(**ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()

    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and "passed" in card and f"{check['perplexity_gguf']:.4f}" in card
    assert "0c1e57098bba" in card  # the llama.cpp it was converted with
    assert (out / "Modelfile").read_text() == 'FROM ./gguf-q8_0.gguf\nPARAMETER stop "<|im_end|>"\n'


@pytest.mark.slow
def test_f16_export_matches_the_merged_model_exactly_enough_and_drops_the_merged_folder(
    llama_cpp, smol_adapter, tmp_path
):
    out = export(exporting(smol_adapter, tmp_path / "f16", gguf="f16", max_perplexity_increase=0.001))
    assert not (out / "merged").exists()
    check = json.loads((out / "export_check.json").read_text())
    assert check["passed"] and abs(check["perplexity_increase"]) < 0.001
    assert check["greedy_identical"] == check["greedy_prompts"] == 2


@pytest.mark.slow
def test_a_check_that_fails_keeps_the_files_and_stops_in_one_line(llama_cpp, smol_adapter, tmp_path):
    args = exporting(smol_adapter, tmp_path / "strict", gguf="q8_0", max_perplexity_increase=-0.5)
    with pytest.raises(ExportError, match="did not pass its check"):
        export(args)
    assert "**FAILED**" in (tmp_path / "strict" / "README.md").read_text()


def test_an_architecture_the_converter_does_not_know_is_refused_before_anything_is_written(
    llama_cpp, smol_tiny, tmp_path
):
    import shutil

    foreign = tmp_path / "foreign-base"
    shutil.copytree(smol_tiny, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (foreign / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(smol_tiny, tmp_path / "adapter")
    out = tmp_path / "out"
    with pytest.raises(LlamaCppError, match="does not know the architecture MadeUpForCausalLM"):
        export(exporting(adapter, out, model_name_or_path=str(foreign)))
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_tokenizer_the_converter_does_not_know_is_refused_before_anything_is_written(
    llama_cpp, tiny_model, tmp_path
):
    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    with pytest.raises(LlamaCppError, match="does not know this tokenizer's pre-tokenizer"):
        export(exporting(adapter, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_run_without_a_chat_template_is_refused(smol_tiny, tmp_path):
    from transformers import AutoTokenizer

    adapter = make_adapter(smol_tiny, tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(smol_tiny)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(adapter)
    (adapter / "chat_template.jinja").unlink(missing_ok=True)
    base = tmp_path / "base"
    base.mkdir()
    for f in smol_tiny.iterdir():
        if f.name != "chat_template.jinja":
            (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="no chat template"):
        export(exporting(adapter, tmp_path / "out", model_name_or_path=str(base)))
    assert not (tmp_path / "out").exists()


def test_a_type_no_tool_writes_is_refused_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "sftmix_trl.cli", "export", "--adapter_path", str(tmp_path), "--output_dir",
           str(tmp_path / "out"), "--gguf", "q3_xyz"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "q3_xyz" in result.stderr and not (tmp_path / "out").exists()


def test_no_converter_and_no_network_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SFTMIX_LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(LlamaCppError, match="could not be fetched .*llama_cpp_dir"):
        find_llama_cpp(cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # no half-unpacked copy
    with pytest.raises(LlamaCppError, match="is no llama.cpp checkout"):
        find_llama_cpp(str(tmp_path))


def test_the_check_data_defaults_to_the_run_held_out_split(smol_tiny, tmp_path):
    from sftmix_trl.configs import ScriptArguments
    from sftmix_trl.data.load import load_datasets

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    run = {"dataset_name": str(DEMO_DATA / "health_qa.json"), "eval_split_size": 6, "dataset_seed": 3}
    (adapter / "sftmix_run.json").write_text(json.dumps({"recipe": "sft.py", "config": run}))
    held = held_out_data(ExportArguments(adapter_path=str(adapter), output_dir=str(tmp_path / "o"), eval_limit=4))
    _, expected = load_datasets(ScriptArguments(**run))
    assert held["example_id"] == expected["example_id"][:4]
    (adapter / "sftmix_run.json").write_text(json.dumps({"recipe": "sft.py", "config": {**run, "eval_split_size": 0}}))
    with pytest.raises(ExportError, match="no held-out split.*--eval_data"):
        held_out_data(ExportArguments(adapter_path=str(adapter), output_dir=str(tmp_path / "o")))


def test_stop_strings_are_the_end_of_turn_tokens_of_the_template(smol_tiny):
    from transformers import AutoTokenizer

    assert stop_strings(AutoTokenizer.from_pretrained(smol_tiny)) == ["<|im_end|>"]


def serving_snippets() -> list[str]:
    text = (ROOT / "docs" / "serving.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_transformers_snippets_of_the_serving_docs_run(q8_export, smol_tiny, smol_adapter, tmp_path, capsys):
    """docs/serving.md: the GGUF through transformers, and the adapter through PEFT, as written there."""
    import shutil

    from transformers import AutoTokenizer

    gguf_snippet, peft_snippet = serving_snippets()
    exec(gguf_snippet.replace("outputs/demo/gguf", str(q8_export)), {})
    adapter = shutil.copytree(smol_adapter, tmp_path / "adapter")
    AutoTokenizer.from_pretrained(smol_tiny).save_pretrained(adapter)
    exec(peft_snippet.replace("outputs/demo/sft_qlora", str(adapter)), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) >= 2  # each snippet printed its reply


@pytest.mark.slow
def test_the_demo_run_exports_loads_back_and_passes_its_check_on_its_held_out_split(llama_cpp, demo_model, tmp_path):
    """The demo NTP config on SmolLM2-135M-Instruct (a few steps), then `export` as a user runs it: the check scores
    the run's own held-out split (read from its sftmix_run.json)."""
    from conftest import run_recipe
    from test_recipes import ok

    adapter, out = tmp_path / "sft", tmp_path / "gguf"
    ok(
        run_recipe(
            "sft.py", "--config", "configs/demo/sft_qlora.yaml", "--model_name_or_path", str(demo_model),
            "--output_dir", str(adapter), "--max_train_examples", "8", "--max_steps", "2", "--eval_strategy", "no",
        )
    )  # fmt: skip
    cmd = [sys.executable, "-m", "sftmix_trl.cli", "export", "--adapter_path", str(adapter), "--output_dir", str(out),
           "--gguf", "q8_0", "--eval_limit", "8", "--check_prompts", "2", "--max_new_tokens", "16"]  # fmt: skip
    result = ok(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900))
    assert ": passed" in result.stdout
    check = json.loads((out / "export_check.json").read_text())
    assert check["passed"] and check["examples"] == 8 and check["template_renders_same"]
    assert "the run's held-out split" in (out / "README.md").read_text()


def test_the_adapter_alone_converts_to_a_gguf_lora_that_reads_back_as_trained(llama_cpp, smol_tiny, smol_adapter,
                                                                               tmp_path):  # fmt: skip
    """`--lora_only`'s file: llama.cpp's LoRA converter on the adapter, read back with the gguf package. (llama.cpp's
    runtime applying it to the base GGUF needs a compiled llama.cpp: benchmarks/gguf_export.py checks that.)"""
    from sftmix_trl.after_training.export_lora import check_lora_gguf, convert_lora

    lora_file = tmp_path / "lora.gguf"
    convert_lora(llama_cpp, smol_adapter, str(smol_tiny), lora_file)
    check = check_lora_gguf(lora_file, smol_adapter)
    assert check["passed"], check
    assert (check["general_type"], check["adapter_type"], check["alpha"], check["rank"]) == ("adapter", "lora", 8, 4)
    assert check["pairs"] == 2 * 7  # two layers, seven linears each ("all-linear" leaves out lm_head)
    adapter_config = json.loads((smol_adapter / "adapter_config.json").read_text())
    (tmp_path / "other").mkdir()
    for f in smol_adapter.iterdir():
        (tmp_path / "other" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({**adapter_config, "lora_alpha": 16}))
    assert not check_lora_gguf(lora_file, tmp_path / "other")["passed"]  # the file's alpha is the adapter's own


def test_lora_only_refuses_what_llama_cpp_does_not_apply(smol_tiny, tmp_path):
    from sftmix_trl.after_training.export_lora import LoraExportError, lora_settings

    adapter = make_adapter(smol_tiny, tmp_path / "rslora", use_rslora=True)
    with pytest.raises(LoraExportError, match="use_rslora.*without `--lora_only`"):
        lora_settings(adapter)
    with pytest.raises(ExportError, match="merges nothing"):
        exporting(adapter, tmp_path / "out", lora_only=True, keep_merged=True)


@pytest.mark.slow
def test_lora_only_export_writes_base_and_lora_ggufs_and_checks_both(llama_cpp, smol_adapter, tmp_path):
    out = export(exporting(smol_adapter, tmp_path / "lora", gguf="f16", lora_only=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["lora-base-f16.gguf", "lora-lora-f16.gguf", "README.md", "export_check.json"]
    )
    check = json.loads((out / "export_check.json").read_text())
    assert check["passed"] and check["lora"]["passed"] and abs(check["base"]["perplexity_increase"]) < 0.01
    assert "--lora lora-lora-f16.gguf" in (out / "README.md").read_text()


def test_a_lora_only_export_refuses_a_merge_target_it_does_not_ship(tmp_path):
    with pytest.raises(ExportError, match="`lora_only` ships the base's own weights"):
        ExportArguments(adapter_path=str(tmp_path), output_dir=str(tmp_path / "o"), lora_only=True,
                        merge_target="dequantized")  # fmt: skip
