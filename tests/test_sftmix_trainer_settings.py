"""SFTMixTrainer settings that used to be accepted and then silently did nothing (or the wrong thing): each now works
or is refused."""

import json

import numpy as np
import pytest
import torch

from sftmix_trl.confidence import (
    METADATA_FILE,
    ConfidenceConfig,
    ConfidenceError,
    ConfidenceTable,
    compute_confidence,
    expected_metadata,
)
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.load import load_datasets
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.sftmix.config import SFTMixConfig, unsupported_parallelism
from sftmix_trl.sftmix.trainer import SFTMixTrainer

NUM_EXAMPLES = 10


@pytest.fixture(scope="module")
def dataset():
    return load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=NUM_EXAMPLES))[0]


def make_args(tmp_path, **overrides) -> SFTMixConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        per_device_train_batch_size=4,
        max_length=64,
        activation_checkpointing=False,
        seed=7,
    )
    return SFTMixConfig(**{**values, **overrides})


def table_for(dataset) -> ConfidenceTable:
    rng = np.random.default_rng(0)
    return ConfidenceTable(list(dataset["example_id"]), rng.uniform(2, 50, size=(len(dataset), 1)), np.ones(10))


def build(tiny_model, dataset, args, model=None, table=None, **kwargs) -> SFTMixTrainer:
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    torch.manual_seed(0)
    return SFTMixTrainer(
        model=model or load_model(model_args),
        args=args,
        train_dataset=dataset,
        confidence=table or table_for(dataset),
        processing_class=load_tokenizer(model_args),
        peft_config=lora_config(model_args),
        **kwargs,
    )


def cross_entropy(outputs, labels, num_items_in_batch=None):
    logits, targets = outputs.logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    return loss / (num_items_in_batch or (targets != -100).sum())


@pytest.mark.parametrize("setting", ["label_smoothing", "compute_loss_func"])
def test_mixup_term_has_a_gradient_when_trl_runs_a_second_forward_for_metrics(tiny_model, dataset, tmp_path, setting):
    """TRL's label smoothing and `compute_loss_func` compute the loss from one forward and the metrics from a second,
    no-grad one: the Mixup term must come from the first, or mu changes the logged loss but not the update."""
    extra = {"compute_loss_func": cross_entropy} if setting == "compute_loss_func" else {}
    args = make_args(tmp_path, label_smoothing_factor=0.1 if setting == "label_smoothing" else 0.0)
    trainer = build(tiny_model, dataset, args, **extra)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # non-zero B, so that every adapter weight gets a gradient
            torch.nn.init.normal_(param, std=0.02)
    trainer.model.train()
    data = trainer._remove_unused_columns(trainer.train_dataset)
    pairs = zip(trainer.confident_rows[:2], trainer.unconfident_rows[:2])
    batch = trainer.data_collator([data[row] for pair in pairs for row in pair])  # rows 2k, 2k+1: pair k

    def gradients(mixup_weight: float) -> dict[str, torch.Tensor]:
        trainer.args.mixup_weight = mixup_weight
        trainer.model.zero_grad()
        torch.manual_seed(0)  # the same LoRA dropout masks in every call
        trainer.compute_loss(trainer.model, dict(batch)).backward()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    with_mixup, without, again = gradients(0.2), gradients(0.0), gradients(0.0)
    assert all(torch.equal(without[n], again[n]) for n in without)  # deterministic: a difference is the Mixup's
    assert max((with_mixup[n] - without[n]).abs().max().item() for n in without) > 1e-6


def _stored_table(dataset, tiny_model, args, tmp_path, drop=()):
    """A finished table for `dataset` whose metadata is what this run expects, minus the keys in `drop`."""
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    config = ConfidenceConfig.from_args(args)
    run = expected_metadata(dataset, model_args, args, config, load_tokenizer(model_args))
    table = table_for(dataset)
    table.metadata = {"run": {k: v for k, v in run.items() if k not in drop}, "config": {"confident_fraction": 0.5}}
    table.save(tmp_path / "table")
    return model_args, tmp_path / "table"


def test_an_explicit_table_is_split_at_the_runs_confident_fraction(tiny_model, dataset, tmp_path, caplog):
    args = make_args(tmp_path)
    model_args, directory = _stored_table(dataset, tiny_model, args, tmp_path)  # computed with 0.5
    run = make_args(tmp_path, confident_fraction=0.3)
    with caplog.at_level("INFO", logger="sftmix_trl"):
        table = compute_confidence(
            dataset, model_args, run, ConfidenceConfig.from_args(run), directory, must_exist=True
        )
    confident, unconfident = table.split()
    assert (len(confident), len(unconfident)) == (3, 7)
    assert (table.metadata["num_confident"], table.metadata["num_unconfident"]) == (3, 7)
    assert "confident_fraction=0.3 (it was computed with 0.5)" in caplog.text
    trainer = build(tiny_model, dataset, make_args(tmp_path, per_device_train_batch_size=2), table=table)
    assert (len(trainer.confident_rows), len(trainer.unconfident_rows)) == (3, 7)


@pytest.mark.parametrize("key, value", [("completion_only_loss", False), ("truncation_mode", "keep_end")])
def test_an_explicit_table_with_other_labelling_is_refused(tiny_model, dataset, tmp_path, key, value):
    args = make_args(tmp_path)
    model_args, directory = _stored_table(dataset, tiny_model, args, tmp_path)
    other = make_args(tmp_path, **{key: value})
    with pytest.raises(ConfidenceError, match=f"{key}: expected"):
        compute_confidence(dataset, model_args, other, ConfidenceConfig.from_args(other), directory, must_exist=True)


def test_a_table_from_before_the_labelling_settings_were_recorded_must_be_recomputed(tiny_model, dataset, tmp_path):
    args = make_args(tmp_path)
    model_args, directory = _stored_table(dataset, tiny_model, args, tmp_path, drop=("assistant_only_loss",))
    assert "assistant_only_loss" not in json.loads((directory / METADATA_FILE).read_text())["run"]
    with pytest.raises(ConfidenceError, match="does not record assistant_only_loss .*recompute"):
        compute_confidence(dataset, model_args, args, ConfidenceConfig.from_args(args), directory, must_exist=True)


def test_parallelism_that_divides_the_ntp_normaliser_is_refused(tiny_model, dataset, tmp_path, monkeypatch):
    assert unsupported_parallelism(1, 1, 1, 1) is None
    assert "context parallelism (size 2)" in unsupported_parallelism(1, 2, 1, 1)
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "2")  # what `accelerate launch` sets from its config
    with pytest.raises(ValueError, match="does not support sequence parallelism"):
        make_args(tmp_path)
    monkeypatch.delenv("PARALLELISM_CONFIG_SP_SIZE")
    monkeypatch.setattr(SFTMixConfig, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="does not support DataParallel over 2 GPUs"):
        make_args(tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(SFTMixTrainer, "get_cp_size", lambda self: 2)  # an accelerator set up another way
    with pytest.raises(ValueError, match="does not support context parallelism"):
        build(tiny_model, dataset, make_args(tmp_path))


def test_a_model_scaling_its_logits_by_output_multiplier_is_refused(tiny_model, dataset, tmp_path):
    model = load_model(ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False))
    model.config.output_multiplier = 2.0  # TRL's fused head applies it; the Mixup loss would not
    with pytest.raises(ValueError, match=r"scales its logits \(output_multiplier\)"):
        build(tiny_model, dataset, make_args(tmp_path), model=model)


def test_mixup_token_share_counts_both_tokens_of_each_mixed_position(tiny_model, dataset, tmp_path):
    """Each mixed position consumes one response token of each sequence of its pair: the share of response tokens in
    the Mixup is 2 x mixed positions / response tokens (the old `mixed_token_fraction` could never pass 0.5)."""
    from sftmix_trl.sftmix.mixup import count_mixed_positions

    trainer = build(tiny_model, dataset, make_args(tmp_path))
    trainer.model.train()
    data = trainer._remove_unused_columns(trainer.train_dataset)
    pairs = zip(trainer.confident_rows[:2], trainer.unconfident_rows[:2])
    batch = trainer.data_collator([data[row] for pair in pairs for row in pair])
    labels = batch["labels"]
    trainer.compute_loss(trainer.model, dict(batch))
    expected = 2 * int(count_mixed_positions(labels)) / int((labels[:, 1:] != -100).sum())
    assert trainer._metrics["train"]["mixup_token_share"][-1] == pytest.approx(expected)
    lengths = (labels[:, 1:] != -100).sum(1)
    assert 0.5 < expected < 1 and (lengths[0::2] != lengths[1::2]).any()  # unequal pairs: short of 1, beyond 0.5
