"""`sftmix-trl merge`: the merged folder loads in plain transformers with the logits of base + adapter, ships the
base's own chat template and a card, and refuses what it cannot merge before writing anything."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_evaluation import make_adapter

from sftmix_trl.chat_templates import training_chat_template
from sftmix_trl.evaluation import EvalError
from sftmix_trl.merge import MergeArguments, MergeError, merge, serving_chat_template, strip_generation_markers


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapter"))


def logits(model, tokenizer, text="What helps a sore throat? Warm drinks."):
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_merged_model_loads_in_plain_transformers_with_the_logits_of_base_plus_adapter(tiny_model, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(MergeArguments(adapter_path=str(adapter), output_dir=str(tmp_path / "merged"), dtype="float32"))
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    merged = AutoModelForCausalLM.from_pretrained(out)  # no PEFT
    assert merged.dtype == torch.float32
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter)
    expected, plain = logits(tuned, tokenizer), logits(base, tokenizer)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-5, rtol=1e-5)

    card = (out / "README.md").read_text()
    assert str(tiny_model) in card and str(adapter) in card and "library_name: transformers" in card
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template


def test_dtype_is_the_one_asked_for(adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge(MergeArguments(adapter_path=str(adapter), output_dir=str(tmp_path / "bf16"), dtype="bfloat16"))
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_a_run_trained_with_generation_markers_ships_the_base_template(tiny_model, tmp_path):
    """assistant_only_loss saves a tokenizer whose template has {% generation %} markers: the merged model gets the
    base's own template back, and the card names the method the run recorded."""
    from transformers import AutoTokenizer

    adapter = make_adapter(tiny_model, tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base_template = tokenizer.chat_template
    tokenizer.chat_template = training_chat_template(tokenizer)
    assert "generation" in tokenizer.chat_template
    tokenizer.save_pretrained(adapter)
    (adapter / "sftmix_run.json").write_text(json.dumps({"recipe": "sftmix.py", "config": {}}))
    out = merge(MergeArguments(adapter_path=str(adapter), output_dir=str(tmp_path / "merged")))
    assert AutoTokenizer.from_pretrained(out).chat_template == base_template
    assert "**SFTMix**" in (out / "README.md").read_text()


def test_a_template_of_the_run_that_differs_from_the_base_keeps_its_text_without_markers(tiny_tokenizer_fast):
    marked = (
        "{% for m in messages %}{{ m['role'] }}: {% generation %}{{ m['content'] }}{% endgeneration %}\n{% endfor %}"
    )
    assert (
        strip_generation_markers(marked) == "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    base = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert serving_chat_template(tiny_tokenizer_fast, marked, base) == strip_generation_markers(marked)
    assert serving_chat_template(tiny_tokenizer_fast, None, base) == base


@pytest.fixture
def tiny_tokenizer_fast(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_adapter_of_another_base_is_refused_before_anything_is_written(tiny_model, tmp_path):
    from conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "other", hidden=32)
    foreign = make_adapter(other, tmp_path / "foreign")
    out = tmp_path / "merged"
    with pytest.raises(EvalError, match="does not match the base"):
        merge(MergeArguments(adapter_path=str(foreign), model_name_or_path=str(tiny_model), output_dir=str(out)))
    assert not out.exists()


def test_non_empty_output_dir_and_a_quantised_base_are_refused(tiny_model, adapter, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge(MergeArguments(adapter_path=str(adapter), output_dir=str(taken)))
    quantised = tmp_path / "quantised"
    quantised.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="bitsandbytes checkpoint: merge into the unquantised model"):
        merge(
            MergeArguments(
                adapter_path=str(adapter), model_name_or_path=str(quantised), output_dir=str(tmp_path / "o")
            )
        )
    assert not (tmp_path / "o").exists()


def test_merge_command_refuses_in_one_line(tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "sftmix_trl.cli", "merge", "--adapter_path", str(tmp_path), "--output_dir",
           str(tmp_path / "out"), "--model_name_or_path", str(tiny_model)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.stderr
    assert "not a saved PEFT adapter" in result.stderr


@pytest.mark.slow
def test_train_merge_evaluate_on_the_demo_config(tiny_model, tmp_path):
    """The three commands of docs/evaluation.md on the tiny model: the demo SFT config trains a QLoRA adapter, the
    merge command makes a folder that plain transformers loads with the logits of (unquantised) base + adapter, and
    the evaluate command scores that folder."""
    from conftest import DEMO_DATA, run_recipe
    from peft import PeftModel
    from test_recipes import TINY, ok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, merged = tmp_path / "sft", tmp_path / "merged"
    ok(
        run_recipe(
            "sft.py", "--config", "configs/demo/sft_qlora.yaml", "--model_name_or_path", str(tiny_model),
            "--output_dir", str(adapter), *TINY, "--max_steps", "2", "--learning_rate", "1e-2",
        )
    )  # fmt: skip
    ok(run_recipe("merge.py", "--adapter_path", str(adapter), "--output_dir", str(merged), "--dtype", "float32"))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    expected = logits(PeftModel.from_pretrained(base, adapter), tokenizer)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged), tokenizer), expected)
    assert "NTP" in (merged / "README.md").read_text()

    ok(
        run_recipe(
            "evaluate.py", "--model_name_or_path", str(merged), "--load_in_4bit", "false", "--tasks", "perplexity",
            "--perplexity_data", str(DEMO_DATA / "health_qa.json"), "--limit", "4", "--output_dir", str(tmp_path / "eval"),
        )
    )  # fmt: skip
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["results"]
    assert results["perplexity"]["n"] == 4 and results["perplexity"]["perplexity"] > 1
