"""`data_checks`: data that cannot train as configured stops in one line, before the first write."""

import re

import pytest
from conftest import demo_argv, recipe_stop_message, write_jsonl

from sftmix_trl.commands import sft as sft_recipe
from sftmix_trl.commands import sftmix as sftmix_recipe
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
from sftmix_trl.data.checks import TRAINING, prepare_like_trl, prepare_split
from sftmix_trl.data.drops import DropLog
from sftmix_trl.data.load import load_datasets
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.sft_trainer import NTPTrainer


@pytest.fixture
def long_prompts(tmp_path):
    """12 examples whose prompts alone (about 200 tokens with the tiny tokenizer) fill max_length=64."""
    records = [
        {"instruction": f"question {i}: " + "describe the symptoms in detail " * 20, "output": "ok"} for i in range(12)
    ]
    return write_jsonl(tmp_path / "long_prompts.jsonl", records)


@pytest.mark.parametrize("recipe", [sft_recipe, sftmix_recipe])
def test_truncation_that_empties_every_response_stops_before_any_write(
    tiny_model, tmp_path, long_prompts, monkeypatch, recipe
):
    out = tmp_path / "out"
    name = recipe.__name__.rsplit(".", 1)[1]
    argv = demo_argv(name, tiny_model, out, "--dataset_name", str(long_prompts), "--dataset_mixture", "null")
    argv += ["--max_length", "64", "--eval_split_size", "0", "--eval_strategy", "no"]
    text = recipe_stop_message(recipe.main, recipe.ARGUMENTS, argv, monkeypatch)
    assert re.fullmatch(
        r"error: 12 of the 12 training examples lose their whole response to truncation at max_length=64 "
        r"\(truncation_mode=keep_start\), leaving 0; .* needs at least \d\. Raise `max_length` above \d+ .*",
        text,
    ), text
    assert not out.exists()  # before: sftmix.py wrote confidence/run.json and confidence/reference/, then crashed


@pytest.mark.parametrize(
    "extra, message",
    [
        # 10 examples split 5 / 5: fewer than the 8 pairs of a micro-batch of 16
        (
            ["--per_device_train_batch_size", "16", "--reference_batch_size", "2"],
            r"gives 5 confident and 5 unconfident, fewer than the 8 pairs",
        ),
        # 10 examples in batches of 8: a 2-step reference run cannot give 3 snapshots
        (["--reference_batch_size", "8"], r"reference run has 2 optimizer step\(s\) on 10 examples, fewer than"),
    ],
)
def test_too_few_examples_for_sftmix_stops_before_any_write(tiny_model, tmp_path, monkeypatch, extra, message):
    out = tmp_path / "out"
    argv = demo_argv("sftmix", tiny_model, out, "--max_train_examples", "10", "--eval_split_size", "0")
    argv += ["--eval_strategy", "no", "--max_length", "512", *extra]
    text = recipe_stop_message(sftmix_recipe.main, sftmix_recipe.ARGUMENTS, argv, monkeypatch)
    assert text.startswith("error: ") and "\n" not in text and re.search(message, text), text
    assert not out.exists()


def test_the_check_prepares_the_data_exactly_as_the_trainer_does(tiny_model, tmp_path, long_prompts):
    """The check runs TRL's own preparation: same rows, tokens and labels as the trainer, truncation drops included."""
    short = load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=6))[0]
    long = load_datasets(ScriptArguments(dataset_name=str(long_prompts), max_train_examples=2))[0]
    from datasets import concatenate_datasets

    dataset = concatenate_datasets([short, long])
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_length=64, report_to="none", activation_checkpointing=False)
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    tokenizer = load_tokenizer(model_args)
    checked = prepare_split(dataset, tokenizer, args, NTPTrainer, "train", DropLog(), TRAINING)
    trainer = NTPTrainer(
        model=load_model(model_args),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    assert len(checked) == len(trainer.train_dataset) == len(short)  # the 2 long prompts lost their response
    for column in ("example_id", "input_ids", "labels"):
        assert checked[column] == trainer.train_dataset[column]
    assert len(prepare_like_trl(long, tokenizer, args)) == 0


def _tokenizing_passes(monkeypatch) -> list[str]:
    """The descriptions of TRL's tokenising maps run from now on (each is one pass over a dataset)."""
    import datasets

    passes, original = [], datasets.Dataset.map

    def counting(self, *args, **kwargs):
        if (kwargs.get("desc") or "").startswith("Tokenizing"):
            passes.append(kwargs["desc"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counting)
    return passes


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [sft_recipe, sftmix_recipe])
def test_each_recipe_tokenises_the_data_once(tiny_model, tmp_path, monkeypatch, recipe):
    """Data check, stage-1 reference and stage-2 trainer share one preparation of the train and held-out sets."""
    passes = _tokenizing_passes(monkeypatch)
    name = recipe.__name__.rsplit(".", 1)[1]
    argv = demo_argv(name, tiny_model, tmp_path / "out", "--max_train_examples", "16", "--eval_split_size", "8")
    argv += ["--max_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size", "4", "--reference_epochs"]
    argv = argv[:-1] if name == "sft" else argv + ["1", "--reference_batch_size", "4"]
    monkeypatch.setattr("sys.argv", [f"{name}.py", *argv])
    from sftmix_trl.runs import launch

    launch(recipe.main, recipe.ARGUMENTS)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert passes == ["Tokenizing train dataset", "Tokenizing eval dataset"]


def test_a_trainer_given_prepared_data_trains_on_it_unchanged(tiny_model, tmp_path):
    """The prepared set skips TRL's preparation and is what the trainer trains on; raw data is still prepared."""
    dataset = load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=6))[0]
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_length=64, report_to="none", activation_checkpointing=False)
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    tokenizer = load_tokenizer(model_args)
    prepared = prepare_split(dataset, tokenizer, args, NTPTrainer, "train", DropLog(), TRAINING)

    def trained_on(train_dataset):
        trainer = NTPTrainer(
            model=load_model(model_args), args=args, train_dataset=train_dataset, processing_class=tokenizer
        )
        assert args.dataset_kwargs is None  # the caller's arguments are left as they were
        return trainer.train_dataset

    assert trained_on(prepared) is prepared  # not even copied
    from_raw = trained_on(dataset)
    for column in ("example_id", "input_ids", "labels"):
        assert from_raw[column] == prepared[column]
    too_long = prepared.map(lambda example: {"input_ids": example["input_ids"] * 40, "labels": example["labels"] * 40})
    assert max(len(ids) for ids in trained_on(too_long)["input_ids"]) <= 64  # rows over max_length: prepared again
