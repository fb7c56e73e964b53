"""The pieces of benchmarks/overfit_study.py: curves from trainer_state.json, the post-training confidence spread,
the aggregation over seeds. The study itself is a benchmark, not a test."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from sftmix_trl.confidence import ConfidenceTable
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.load import load_datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import overfit_study as study  # noqa: E402

N_TRAIN, N_HELD_OUT = 8, 4


def test_epoch_curves_group_steps_by_epoch_and_read_each_held_out_set():
    log = [
        {"loss": 3.0, "ntp_loss": 2.0, "ntp_loss_confident": 1.0, "ntp_loss_unconfident": 3.0, "epoch": 0.5},
        {"loss": 5.0, "ntp_loss": 4.0, "ntp_loss_confident": 2.0, "ntp_loss_unconfident": 5.0, "epoch": 1.0},
        {"eval_medical_loss": 2.5, "eval_alpaca_loss": 1.5, "epoch": 1.0},
        {"loss": 1.0, "ntp_loss": 1.0, "ntp_loss_confident": 0.5, "ntp_loss_unconfident": 1.5, "epoch": 1.5},
        {"loss": 1.0, "ntp_loss": 0.6, "ntp_loss_confident": 0.5, "ntp_loss_unconfident": 0.5, "epoch": 2.0},
        {"eval_medical_loss": 2.7, "eval_alpaca_loss": 1.4, "epoch": 2.0},
        {"train_runtime": 1.0, "train_loss": 2.5, "epoch": 2.0},
    ]
    curves = study.epoch_curves(log)
    # SFTMix: the NTP part (`ntp_loss`), not the logged total with the Mixup term
    assert curves["train_ntp_loss"] == pytest.approx([3.0, 0.8])
    assert curves["ntp_loss_confident"] == pytest.approx([1.5, 0.5])
    assert curves["ntp_loss_unconfident"] == pytest.approx([4.0, 1.0])
    assert curves["eval_medical_loss"] == [2.5, 2.7]
    assert curves["eval_alpaca_loss"] == [1.5, 1.4]
    # NTP logs only `loss`
    assert study.epoch_curves([{"loss": 2.0, "epoch": 0.25}, {"loss": 4.0, "epoch": 1.0}])["train_ntp_loss"] == [3.0]
    with pytest.raises(ValueError, match="every epoch"):
        study.epoch_curves([{"eval_medical_loss": 1.0, "epoch": 2.0}])


def synthetic_summary(variant: str, seed: int, medical: list[float], train_loss: float, ppl_std: float) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "steps": 10,
        "curves": {"eval_medical_loss": medical, "eval_alpaca_loss": [x - 1 for x in medical]},
        "train_scores": {"loss": train_loss, "ppl_std": ppl_std, "log_ppl_std": 0.1, "ppl_mean": 3.0},
        "wall_seconds": 100.0 + seed,
    }


def test_aggregate_over_seeds_uses_whatever_runs_finished():
    runs = [
        synthetic_summary("NTP", 1, [2.0, 1.5, 1.8], 1.0, 4.0),
        synthetic_summary("NTP", 2, [2.2, 1.7, 1.6], 1.2, 6.0),
        synthetic_summary("SFTMix mu=1.0", 1, [2.1, 1.9], 1.1, 3.0),  # a shorter (cut short) run still counts
    ]
    agg = study.aggregate(runs)
    ntp = agg["NTP"]
    assert ntp["seeds"] == [1, 2]
    assert ntp["curves"]["eval_medical_loss"]["mean"] == pytest.approx([2.1, 1.6, 1.7])
    assert ntp["curves"]["eval_medical_loss"]["std"][0] == pytest.approx(np.std([2.0, 2.2], ddof=1))
    s = ntp["scalars"]
    assert s["medical_best"]["mean"] == pytest.approx(1.55)  # the best epoch of each seed, then averaged
    assert s["medical_best_epoch"]["mean"] == pytest.approx(2.5)  # epoch 2 for seed 1, epoch 3 for seed 2
    assert s["medical_last"]["mean"] == pytest.approx(1.7)
    assert s["medical_rise"]["mean"] == pytest.approx(0.15)  # 0.3 and 0.0
    assert s["medical_gap"]["mean"] == pytest.approx((0.8 + 0.4) / 2)
    assert s["ppl_std"] == {"mean": pytest.approx(5.0), "std": pytest.approx(math.sqrt(2))}
    mix = agg["SFTMix mu=1.0"]
    assert mix["seeds"] == [1] and mix["scalars"]["ppl_std"]["std"] == 0.0
    assert mix["curves"]["eval_medical_loss"]["n"] == 1


def test_confidence_spread_is_the_std_of_perplexity_and_a_token_weighted_loss():
    ppl, tokens = np.array([2.0, 8.0]), np.array([3, 1])
    spread = study.confidence_spread(ppl, tokens)
    assert spread["ppl_std"] == pytest.approx(3.0)
    assert spread["ppl_mean"] == pytest.approx(5.0)
    assert spread["log_ppl_std"] == pytest.approx(math.log(2))  # log 2 and 3 log 2
    assert spread["loss"] == pytest.approx((3 * math.log(2) + math.log(8)) / 4)


@pytest.fixture(scope="module")
def tiny_setup(tiny_model):
    source = "data/demo/health_qa.json"
    train = load_datasets(ScriptArguments(dataset_name=source, max_train_examples=N_TRAIN))[0]
    held_out = load_datasets(ScriptArguments(dataset_name=source, max_train_examples=N_TRAIN + N_HELD_OUT))[0]
    held_out = held_out.select(range(N_TRAIN, N_TRAIN + N_HELD_OUT))
    args = study.parse_args(
        ["--train_examples", str(N_TRAIN), "--held_out", str(N_HELD_OUT), "--batch_size", "4", "--epochs", "2"]
        + ["--max_length", "64", "--learning_rate", "1e-2"]
    )
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    return args, model_args, train, {"medical": held_out, "alpaca": held_out}


@pytest.mark.parametrize("variant", ["NTP", "SFTMix mu=1.0"])
def test_a_run_records_per_epoch_curves_and_the_final_spread(tiny_setup, tmp_path, variant):
    args, model_args, train, evals = tiny_setup
    rng = np.random.default_rng(0)
    table = ConfidenceTable(list(train["example_id"]), rng.uniform(2, 50, (len(train), 3)), np.ones(len(train), int))
    run_dir = tmp_path / study.run_name(variant, 3)
    summary = study.train_variant(variant, 3, args, model_args, train, evals, table, run_dir)

    assert summary["steps"] == 4  # 2 epochs of 8 examples, batch 4
    curves = summary["curves"]
    assert curves == study.curves_from_state(run_dir)  # read back from the saved trainer_state.json
    for name in ("eval_medical_loss", "eval_alpaca_loss", "train_ntp_loss"):
        assert len(curves[name]) == 2 and all(math.isfinite(x) for x in curves[name])
    assert curves["eval_medical_loss"] == curves["eval_alpaca_loss"]  # same held-out rows under both names
    assert ("mixup_token_share" in curves) == (variant != "NTP")
    assert ("ntp_loss_confident" in curves) == (variant != "NTP")
    scores = summary["train_scores"]
    assert scores["ppl_std"] > 0 and scores["log_ppl_std"] > 0
    # The final adapter's training-set loss from stage 1's scoring is what the trainer's eval loss reports for the
    # training set in one batch: the gap compares like with like
    from peft import PeftModel
    from trl import SFTTrainer

    from sftmix_trl.configs import SFTConfig
    from sftmix_trl.model import load_model, load_tokenizer

    model = PeftModel.from_pretrained(load_model(model_args), run_dir / "adapter")
    check = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path / "check"),
            report_to="none",
            max_length=64,
            per_device_eval_batch_size=N_TRAIN,
        ),
        train_dataset=train,
        eval_dataset=train,
        processing_class=load_tokenizer(model_args),
    )
    assert check.evaluate()["eval_loss"] == pytest.approx(scores["loss"], rel=1e-4)
    # Rerunning reuses the finished run
    assert study.train_variant(variant, 3, args, model_args, train, evals, table, run_dir) == json.loads(
        (run_dir / "summary.json").read_text()
    )
