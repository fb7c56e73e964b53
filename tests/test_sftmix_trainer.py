import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict
from trl import SFTTrainer

import sftmix_trl.sftmix.trainer as trainer_module
from sftmix_trl.confidence import ConfidenceError, ConfidenceTable
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.load import load_datasets
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.sftmix.config import SFTMixConfig
from sftmix_trl.sftmix.sampler import PairedSampler
from sftmix_trl.sftmix.trainer import ROW, SFTMixTrainer

NUM_EXAMPLES = 20


@pytest.fixture(scope="module")
def dataset():
    return load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=NUM_EXAMPLES))[0]


def crafted_table(dataset, seed=0) -> ConfidenceTable:
    rng = np.random.default_rng(seed)
    return ConfidenceTable(
        example_ids=list(dataset["example_id"]),
        perplexities=rng.uniform(2, 50, size=(len(dataset), 3)),
        num_response_tokens=np.ones(len(dataset), dtype=int),
    )


def make_args(tmp_path, **overrides) -> SFTMixConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        per_device_train_batch_size=4,
        max_length=64,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        activation_checkpointing=False,
        seed=7,
    )
    values.update(overrides)
    return SFTMixConfig(**values)


def build(tiny_model, dataset, args, trainer_cls=SFTMixTrainer, table=None, load_in_4bit=False, **kwargs):
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=load_in_4bit)
    torch.manual_seed(0)  # the LoRA initialisation
    common = dict(
        model=load_model(model_args),
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer(model_args),
        peft_config=lora_config(model_args),
        **kwargs,
    )
    if issubclass(trainer_cls, SFTMixTrainer):
        return trainer_cls(confidence=table or crafted_table(dataset), **common)
    return trainer_cls(**common)


class RecordingTrainer(SFTMixTrainer):
    """Keeps the dataset rows of every micro-batch it trains on."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if ROW in inputs:
            self.seen_rows = getattr(self, "seen_rows", []) + [inputs[ROW].tolist()]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def adapter_weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(per_device_train_batch_size=3), "must be even"),
        (dict(mixup_alpha=0.0), "mixup_alpha"),
        (dict(mixup_weight=-0.1), "mixup_weight"),
        (dict(packing=True), "packing"),
        (dict(confident_fraction=1.0), "confident_fraction"),
    ],
)
def test_config_rejects_invalid_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_zero_mixup_weight_trains_exactly_like_sft_trainer_on_the_same_batches(tiny_model, dataset, tmp_path):
    args = make_args(tmp_path, mixup_weight=0.0)
    sftmix = build(tiny_model, dataset, args)
    sftmix.train()

    class SamePairs(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return PairedSampler(sftmix.confident_rows, sftmix.unconfident_rows, 2, seed=args.seed)

    baseline = build(tiny_model, dataset, make_args(tmp_path / "b", mixup_weight=0.0), trainer_cls=SamePairs)
    baseline.train()
    losses = [h["loss"] for h in sftmix.state.log_history if "loss" in h]
    expected = [h["loss"] for h in baseline.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses == pytest.approx(expected, rel=1e-6)
    for name, weight in adapter_weights(sftmix).items():
        torch.testing.assert_close(weight, adapter_weights(baseline)[name])
    assert any(h.get("mixup_loss", 0) > 0 for h in sftmix.state.log_history)  # still measured, just not trained


def test_logged_loss_is_ntp_plus_weighted_mixup_and_halves_are_reported(tiny_model, dataset, tmp_path):
    trainer = build(tiny_model, dataset, make_args(tmp_path, mixup_weight=0.2))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "ntp_loss" in h]
    assert len(logs) == 4
    for log in logs:
        assert log["loss"] == pytest.approx(log["ntp_loss"] + 0.2 * log["mixup_loss"], rel=1e-4)
        assert 0 <= log["mixup_lambda"] <= 1 and 0 < log["mixup_token_share"] <= 1
        assert log["ntp_loss_confident"] > 0 and log["ntp_loss_unconfident"] > 0


def test_micro_batches_are_balanced_under_gradient_accumulation(tiny_model, dataset, tmp_path):
    args = make_args(tmp_path, gradient_accumulation_steps=3, max_steps=2)  # 5 micro-batches an epoch: 3 + 2
    trainer = build(tiny_model, dataset, args, trainer_cls=RecordingTrainer)
    trainer.train()
    confident, unconfident = set(trainer.confident_rows), set(trainer.unconfident_rows)
    assert len(trainer.seen_rows) == 5
    for rows in trainer.seen_rows:
        assert [r in confident for r in rows] == [True, False, True, False]
        assert all(r in unconfident for r in rows[1::2])


def test_resume_replays_the_same_pairs_and_ends_with_the_same_adapter(tiny_model, dataset, tmp_path):
    full = build(tiny_model, dataset, make_args(tmp_path / "full", max_steps=6), trainer_cls=RecordingTrainer)
    full.train()
    args = make_args(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    first = build(tiny_model, dataset, args, trainer_cls=RecordingTrainer)
    first.train()  # runs to the end too, but only its checkpoint-3 is used below
    resumed = build(tiny_model, dataset, args, trainer_cls=RecordingTrainer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-3"))
    assert resumed.seen_rows == full.seen_rows[3:]
    for name, weight in adapter_weights(full).items():
        torch.testing.assert_close(adapter_weights(resumed)[name], weight, rtol=1e-4, atol=1e-6)


def test_lambda_is_seeded_per_pair_and_shared_per_batch(tiny_model, dataset, tmp_path):
    trainer = build(tiny_model, dataset, make_args(tmp_path))
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    lam = trainer._draw_lambdas(rows)
    assert lam.shape == (3,) and torch.all((lam >= 0) & (lam <= 1)) and len(set(lam.tolist())) == 3
    torch.testing.assert_close(trainer._draw_lambdas(rows), lam)  # a function of seed, step and pair
    trainer.args.mixup_lambda_per = "batch"
    assert len(set(trainer._draw_lambdas(rows).tolist())) == 1


def test_non_finite_loss_stops_with_step_and_example_ids(tiny_model, dataset, tmp_path, monkeypatch):
    args = make_args(tmp_path, save_strategy="steps", save_steps=1)
    trainer = build(tiny_model, dataset, args)
    monkeypatch.setattr(trainer_module, "mixup_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match=r"optimizer step 1.*" + dataset["example_id"][0][:0]) as error:
        trainer.train()
    assert any(i in str(error.value) for i in dataset["example_id"])
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_evaluation_reports_plain_ntp_loss(tiny_model, dataset, tmp_path):
    trainer = build(tiny_model, dataset, make_args(tmp_path), eval_dataset=dataset.select(range(6)))
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and not any("mixup" in k for k in metrics)
    plain = build(tiny_model, dataset, make_args(tmp_path / "p"), trainer_cls=SFTTrainer)
    assert plain.evaluate(dataset.select(range(6)))["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)


def test_table_of_another_dataset_is_refused(tiny_model, dataset, tmp_path):
    table = crafted_table(dataset.select(range(10)))
    with pytest.raises(ConfidenceError, match="no score in the confidence table"):
        build(tiny_model, dataset, make_args(tmp_path), table=table)


def test_subset_smaller_than_k_is_refused(tiny_model, dataset, tmp_path):
    small = dataset.select(range(6))  # 3 confident, 3 unconfident; K = 4 pairs per micro-batch
    with pytest.raises(ConfidenceError, match="fewer than the 4 pairs"):
        build(tiny_model, small, make_args(tmp_path, per_device_train_batch_size=8))


def test_trains_a_4bit_base(tiny_model, dataset, tmp_path):
    trainer = build(tiny_model, dataset, make_args(tmp_path, max_steps=2), load_in_4bit=True)
    before = adapter_weights(trainer)
    trainer.train()
    after = adapter_weights(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
