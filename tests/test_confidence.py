import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from sftmix_trl.confidence import (
    ConfidenceConfig,
    ConfidenceError,
    ConfidenceTable,
    check_metadata,
    compute_confidence,
    snapshot_steps,
    split_confidence,
)
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.load import load_datasets
from sftmix_trl.perplexity import length_grouped_batches, score_perplexities
from sftmix_trl.sftmix.config import SFTMixConfig


def test_split_at_median_even_count():
    ids = ["a", "b", "c", "d"]
    confident, unconfident = split_confidence(ids, np.array([-1.0, -4.0, -2.0, -3.0]))
    assert confident == ["a", "c"] and unconfident == ["d", "b"]


def test_split_odd_count_puts_the_middle_example_in_the_unconfident_half():
    confident, unconfident = split_confidence(list("abcde"), np.array([-5.0, -1.0, -3.0, -2.0, -4.0]))
    assert confident == ["b", "d"] and unconfident == ["c", "e", "a"]


def test_split_ties_are_broken_by_example_id_whatever_the_input_order():
    scores = np.array([-2.0, -1.0, -2.0, -2.0, -3.0, -2.0])
    ids = ["z", "m", "b", "y", "q", "a"]
    confident, _ = split_confidence(ids, scores)
    assert confident == ["m", "a", "b"]
    order = [5, 3, 1, 0, 4, 2]
    again, _ = split_confidence([ids[i] for i in order], scores[order])
    assert again == confident


def test_split_fraction_moves_the_cut():
    ids = [f"id{i}" for i in range(10)]
    scores = -np.arange(10.0)
    assert len(split_confidence(ids, scores, 0.3)[0]) == 3
    assert len(split_confidence(ids, scores, 0.99)[0]) == 9  # both halves keep at least one example


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fractions_outside_the_open_interval(fraction):
    with pytest.raises(ConfidenceError, match="confident_fraction"):
        split_confidence(["a", "b"], np.array([1.0, 2.0]), fraction)


def test_split_needs_two_examples():
    with pytest.raises(ConfidenceError, match="at least 2"):
        split_confidence(["a"], np.array([1.0]))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="confident_fraction"):
        ConfidenceConfig(confident_fraction=1.0)
    with pytest.raises(ValueError, match="num_confidence_checkpoints"):
        ConfidenceConfig(num_confidence_checkpoints=0)


def test_snapshot_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert snapshot_steps(12, 3) == [4, 8, 12]
    assert snapshot_steps(10, 3) == [4, 7, 10]
    assert snapshot_steps(5, 1) == [5]
    with pytest.raises(ConfidenceError, match="fewer than"):
        snapshot_steps(2, 3)


def test_length_grouped_batches_cover_every_row_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=101).tolist()
    batches = length_grouped_batches(lengths, 8)
    assert sorted(r for b in batches for r in b) == list(range(101))
    padded = sum(len(b) * max(lengths[r] for r in b) for b in batches)
    assert 1 - sum(lengths) / padded < 0.10


def test_table_round_trip_and_subsets(tmp_path):
    table = ConfidenceTable(
        example_ids=["a", "b", "c", "d"],
        perplexities=np.array([[2.0, 1.5], [9.0, 8.0], [3.0, 2.0], [30.0, 20.0]]),
        num_response_tokens=np.array([5, 6, 7, 8]),
        metadata={"run": {"x": 1}, "config": {"confident_fraction": 0.5}},
    )
    assert table.subsets == ["confident", "unconfident", "confident", "unconfident"]
    np.testing.assert_allclose(table.confidence, [-1.75, -8.5, -2.5, -25.0])
    table.save(tmp_path)
    loaded = ConfidenceTable.load(tmp_path)
    assert loaded.example_ids == table.example_ids
    np.testing.assert_array_equal(loaded.perplexities, table.perplexities)
    assert loaded.split() == table.split()
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_table_is_a_clear_error(tmp_path):
    with pytest.raises(ConfidenceError, match=str(tmp_path)):
        ConfidenceTable.load(tmp_path)


def test_mismatch_names_each_difference():
    with pytest.raises(ConfidenceError, match=r"max_length: expected 512, found 256.*/some/dir|/some/dir.*max_length"):
        check_metadata({"max_length": 512, "model": "m"}, {"max_length": 256, "model": "m"}, "/some/dir")
    check_metadata({"a": 1}, {"a": 1}, "x")  # equal: no error


def _prepared(tokenizer_ids: list[list[int]], labels: list[list[int]]) -> Dataset:
    return Dataset.from_dict({"input_ids": tokenizer_ids, "labels": labels})


def test_perplexity_equals_a_hand_computation_in_float64(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    sequences = [[5, 17, 40, 3, 99, 12, 7], [8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    prompt_lengths = [3, 2, 6]
    labels = [[-100] * p + s[p:] for s, p in zip(sequences, prompt_lengths)]
    ppl, counts, stats = score_perplexities(model, _prepared(sequences, labels), batch_size=2, pad_token_id=0)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0]
        log_probs = torch.log_softmax(logits, -1)
        nll = [-log_probs[t - 1, seq[t]].item() for t in range(p, len(seq))]
        assert counts[i] == len(seq) - p
        assert ppl[i] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-10)
    assert stats.tokens == sum(map(len, sequences))
    assert stats.padding_fraction < 0.1  # lengths 9, 7 and 4 are never padded to one another


@pytest.fixture(scope="module")
def demo_subset():
    args = ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=24)
    return load_datasets(args)[0]


def _confidence_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        per_device_train_batch_size=4,
        max_length=96,
        reference_batch_size=4,
        scoring_batch_size=8,
        activation_checkpointing=False,
        logging_steps=1,
    )
    values.update(overrides)
    return SFTMixConfig(**values)


def test_compute_confidence_in_4bit_resumes_and_reuses(tiny_model, demo_subset, tmp_path, monkeypatch):
    import sftmix_trl.confidence.reference as confidence_module

    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=True)
    args = _confidence_args(tmp_path)
    config = ConfidenceConfig.from_args(args)
    table = compute_confidence(demo_subset, model_args, args, config, args.confidence_dir)

    directory = tmp_path / "run" / "confidence"
    assert (directory / "confidence.png").stat().st_size > 10_000
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["snapshot_steps"] == [2, 4, 6]  # 24 examples / batch 4 = 6 steps, C = 3
    assert meta["num_confident"] == meta["num_unconfident"] == 12
    assert sorted(table.example_ids) == sorted(demo_subset["example_id"])
    assert np.isfinite(table.perplexities).all() and table.perplexities.shape == (24, 3)
    assert len({tuple(col) for col in table.perplexities.T}) == 3  # each snapshot scores differently
    for step in (2, 4, 6):
        assert (directory / "snapshots" / f"step-{step}" / "adapter_model.safetensors").is_file()

    # Killed after the first scoring pass: the snapshot weights and the first scores remain (and a report of no table).
    (directory / "confidence.parquet").unlink()
    pq.write_table(pa.table({"example_id": ["stale"]}), directory / "report.parquet")
    for step in (4, 6):
        (directory / "scores" / f"step-{step}.parquet").unlink()
    calls = []
    original = confidence_module.score_perplexities
    monkeypatch.setattr(
        confidence_module, "score_perplexities", lambda *a, **k: calls.append(a[-1]) or original(*a, **k)
    )
    resumed = compute_confidence(demo_subset, model_args, args, config, args.confidence_dir)
    assert len(calls) == 2  # only the unfinished snapshots are scored again
    np.testing.assert_allclose(resumed.perplexities, table.perplexities, rtol=1e-5)
    assert resumed.split() == table.split()
    assert sorted(resumed.report["example_id"].to_pylist()) == sorted(table.example_ids)  # the new table's report

    # Finished: reused without any work, and refused for other settings.
    calls.clear()
    compute_confidence(demo_subset, model_args, args, config, args.confidence_dir)
    assert calls == []
    other = _confidence_args(tmp_path, max_length=64)
    with pytest.raises(ConfidenceError, match="max_length: expected 64, found 96"):
        compute_confidence(demo_subset, model_args, other, ConfidenceConfig.from_args(other), args.confidence_dir)
    with pytest.raises(ConfidenceError, match="dataset_fingerprint"):
        compute_confidence(demo_subset.select(range(20)), model_args, args, config, args.confidence_dir)


def test_examples_without_response_after_truncation_are_excluded_and_counted(tiny_model, tmp_path):
    records = [{"prompt": "word " * (60 if i % 5 == 0 else 3), "completion": f"answer {i}"} for i in range(20)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = load_datasets(ScriptArguments(dataset_name=str(path)))[0]
    args = _confidence_args(tmp_path, max_length=40, num_confidence_checkpoints=2)
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    table = compute_confidence(dataset, model_args, args, ConfidenceConfig.from_args(args), args.confidence_dir)
    assert table.metadata["num_excluded"] == 4
    assert len(table.example_ids) == 16 and np.isfinite(table.perplexities).all()
    assert set(table.metadata["excluded_example_ids"]).isdisjoint(table.example_ids)


def test_fewer_than_two_examples_is_an_error(tiny_model, demo_subset, tmp_path):
    args = _confidence_args(tmp_path)
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    with pytest.raises(ConfidenceError, match="at least 2"):
        compute_confidence(demo_subset.select([0]), model_args, args, ConfidenceConfig(), args.confidence_dir)


def test_must_exist_refuses_to_compute(tiny_model, demo_subset, tmp_path):
    args = _confidence_args(tmp_path)
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    with pytest.raises(ConfidenceError, match="no confidence table"):
        compute_confidence(demo_subset, model_args, args, ConfidenceConfig(), tmp_path / "none", must_exist=True)
