"""`sftmix-trl merge`: the merged folder loads in plain transformers with the logits of base + adapter, ships the
base's own chat template and a card, and refuses what it cannot merge before writing anything. Of the two targets,
'dequantized' is the model the run trained (4-bit base + adapter) and 'original' differs from it by the quantisation
error; the held-out perplexity of both sides goes into the card."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import DEMO_DATA, ROOT
from test_evaluation import make_adapter

from sftmix_trl.adapter import load_with_adapter
from sftmix_trl.after_training.merge import (
    MergeArguments,
    MergedModel,
    MergeError,
    merge,
    serving_chat_template,
    strip_generation_markers,
)
from sftmix_trl.chat_templates import training_chat_template
from sftmix_trl.evaluation import EvalError
from sftmix_trl.run_record import run_compute_dtype, trained_model_arguments


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

    out = merge(
        MergeArguments(adapter_path=str(adapter), output_dir=str(tmp_path / "merged"), dtype="float32", measure=False)
    )
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

    args = MergeArguments(
        adapter_path=str(adapter), output_dir=str(tmp_path / "bf16"), dtype="bfloat16", measure=False
    )
    out = merge(args)
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
    out = merge(MergeArguments(adapter_path=str(adapter), output_dir=str(tmp_path / "merged"), measure=False))
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
    merge command makes a folder that plain transformers loads with the logits of (unquantised) base + adapter and
    measures it on a file (the run held nothing out), and the evaluate command scores that folder."""
    from conftest import run_recipe
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
    ok(
        run_recipe(
            "merge.py", "--adapter_path", str(adapter), "--output_dir", str(merged), "--dtype", "float32",
            "--eval_file", str(DEMO_DATA / "health_qa.json"), "--eval_limit", "4",
        )
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    expected = logits(PeftModel.from_pretrained(base, adapter), tokenizer)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged), tokenizer), expected)
    card = (merged / "README.md").read_text()
    assert "NTP" in card and "`health_qa.json` (4 examples)" in card and "| original (float32) |" in card

    ok(
        run_recipe(
            "evaluate.py", "--model_name_or_path", str(merged), "--load_in_4bit", "false", "--tasks", "perplexity",
            "--perplexity_data", str(DEMO_DATA / "health_qa.json"), "--limit", "4", "--output_dir", str(tmp_path / "eval"),
        )
    )  # fmt: skip
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["results"]
    assert results["perplexity"]["n"] == 4 and results["perplexity"]["perplexity"] > 1


# ----------------------------------------------------------------------------------------------------------------------
# The two targets, and what the merge measures


def record_run(adapter, **config):
    """The sftmix_run.json of a CPU QLoRA run (nf4, double quantisation, float32) on the demo health file."""
    run = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "use_bnb_nested_quant": True,
        "dtype": "auto",
        "use_cpu": True,
        "dataset_name": str(DEMO_DATA / "health_qa.json"),
        "eval_split_size": 6,
        "dataset_seed": 42,
        "max_length": 256,
        "per_device_eval_batch_size": 4,
    }
    (adapter / "sftmix_run.json").write_text(json.dumps({"recipe": "sft.py", "config": {**run, **config}}))
    return adapter


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tmp_path_factory):
    return record_run(make_adapter(tiny_model, tmp_path_factory.mktemp("qlora-run")))


@pytest.fixture(scope="module")
def both_targets(qlora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("targets")
    return {
        target: merge(MergeArguments(adapter_path=str(qlora_run), output_dir=str(out / target), target=target))
        for target in ("original", "dequantized")
    }


def test_dequantized_target_is_the_trained_model_and_original_is_off_by_the_quantisation_error(
    tiny_model, qlora_run, both_targets
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    trained_as, recorded = trained_model_arguments(str(qlora_run), str(tiny_model))
    assert recorded and trained_as.load_in_4bit and trained_as.dtype == "float32"
    trained = logits(load_with_adapter(trained_as, str(qlora_run)), tokenizer)  # 4-bit base + adapter, as trained
    dequantized = AutoModelForCausalLM.from_pretrained(both_targets["dequantized"])
    original = AutoModelForCausalLM.from_pretrained(both_targets["original"])
    assert dequantized.dtype == torch.float32 and not dequantized.config.to_dict().get("quantization_config")
    torch.testing.assert_close(logits(dequantized, tokenizer), trained, atol=1e-4, rtol=1e-4)
    gap = (logits(original, tokenizer) - trained).abs().max().item()
    assert gap > 1e-2, gap  # the 4-bit rounding of the base, which the adapter never saw


def test_the_card_holds_what_each_target_ships_and_its_held_out_perplexity(tiny_model, qlora_run, both_targets):
    records = {target: MergedModel.load(folder) for target, folder in both_targets.items()}
    for target, record in records.items():
        figures = record.figures
        assert record.target == target and record.trained_as == "4-bit nf4 (double quantisation), float32"
        assert figures.examples == 6 and figures.tokens > 0 and "held-out split (6 examples" in figures.data
        card = (both_targets[target] / "README.md").read_text()
        assert "## What this merge ships" in card and f"{figures.merged_perplexity:.4f}" in card
        assert f"{figures.trained_perplexity:.4f}" in card and f"{figures.difference:+.4f}" in card
    # the same trained model on the same examples: one reference figure for both targets
    assert records["original"].figures.trained_perplexity == pytest.approx(
        records["dequantized"].figures.trained_perplexity
    )
    assert abs(records["dequantized"].figures.difference) < 1e-3 * records["dequantized"].figures.trained_perplexity
    assert abs(records["original"].figures.difference) > 1e-3 * records["original"].figures.trained_perplexity
    assert "This is the trained model" in (both_targets["dequantized"] / "README.md").read_text()
    assert "differs from the trained one by the quantisation" in (both_targets["original"] / "README.md").read_text()


def test_an_eval_file_is_measured_instead_of_the_held_out_split(tiny_model, qlora_run, tmp_path):
    out = merge(
        MergeArguments(
            adapter_path=str(qlora_run),
            output_dir=str(tmp_path / "merged"),
            eval_file=str(DEMO_DATA / "instruct_alpaca.jsonl"),
            eval_limit=3,
        )
    )
    figures = MergedModel.load(out).figures
    assert figures.examples == 3 and "instruct_alpaca.jsonl" in figures.data


def test_what_cannot_be_measured_or_merged_as_asked_is_refused_before_anything_is_written(tiny_model, tmp_path):
    out = tmp_path / "merged"
    no_held_out = record_run(make_adapter(tiny_model, tmp_path / "a"), eval_split_size=0)
    with pytest.raises(MergeError, match="held no data out .* `--eval_file`"):
        merge(MergeArguments(adapter_path=str(no_held_out), output_dir=str(out)))
    moved = record_run(make_adapter(tiny_model, tmp_path / "b"), dataset_name="data/elsewhere/gone.json")
    with pytest.raises(MergeError, match="cannot be re-read from here .* `--eval_file`"):
        merge(MergeArguments(adapter_path=str(moved), output_dir=str(out)))
    unquantised = record_run(make_adapter(tiny_model, tmp_path / "c"), load_in_4bit=False)
    with pytest.raises(MergeError, match="target 'dequantized' needs a run trained on a quantised base"):
        merge(MergeArguments(adapter_path=str(unquantised), output_dir=str(out), target="dequantized"))
    assert not out.exists()


def test_the_trained_model_is_built_from_the_run_record_and_flags_that_contradict_it_warn(
    tiny_model, tmp_path, caplog
):
    adapter = record_run(tmp_path, use_cpu=False, bf16=True, use_bnb_nested_quant=False)
    args, recorded = trained_model_arguments(str(adapter), str(tiny_model))
    assert recorded and args.dtype == "bfloat16" and not args.use_bnb_nested_quant
    assert run_compute_dtype({"dtype": "auto", "use_cpu": False, "bf16": False}) == "float16"
    assert run_compute_dtype({"dtype": "float16", "use_cpu": True}) == "float16"
    with caplog.at_level("WARNING"):
        args, _ = trained_model_arguments(str(adapter), str(tiny_model), {"bnb_4bit_quant_type": "fp4"})
    assert args.bnb_4bit_quant_type == "fp4" and "overrides the run's recorded bnb_4bit_quant_type=nf4" in caplog.text


def test_a_merge_that_wrote_no_card_stops_in_one_line_before_publishing(adapter, tmp_path, monkeypatch):
    """What merge promises (weights, config, tokenizer, card, record) is checked before it reports or pushes."""
    from sftmix_trl.after_training import merge as merge_module
    from sftmix_trl.errors import SFTMixError

    monkeypatch.setattr(merge_module, "write_merged_card", lambda *a, **k: None)
    monkeypatch.setattr(merge_module, "push_folder", lambda *a, **k: pytest.fail("pushed an incomplete folder"))
    args = MergeArguments(
        adapter_path=str(adapter), output_dir=str(tmp_path / "m"), measure=False, push_to_hub=True, hub_model_id="o/m"
    )
    with pytest.raises(SFTMixError, match=r"^merge finished but wrote no README.md in .*m; nothing was published$"):
        merge(args)
