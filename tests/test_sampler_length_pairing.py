"""Length-aware pairing (`train_sampling_strategy: group_by_length`) and token-budget micro-batches
(`tokens_per_micro_batch`): the paired sampler's properties hold for both, pairs are alike in length, micro-batches
stay within budget, and the streams are the same for 1 and 2 processes and replay on resume."""

from collections import Counter

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from conftest import run_recipe
from safetensors.torch import load_file
from test_sampler import SIZES, batches_of, chunks, is_balanced, rows, shard_batches
from test_sftmix_trainer import NUM_EXAMPLES, RecordingTrainer, adapter_weights, build, make_args
from torch.utils.data import DataLoader
from trl import SFTTrainer

from sftmix_trl.configs import ScriptArguments
from sftmix_trl.data.load import load_datasets
from sftmix_trl.sftmix.sampler import PairedSampler, TokenBudgetBatchSampler, pack_pairs


def fake_lengths(num_rows: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Alpaca-like: a short prompt and a response of very variable length."""
    rng = np.random.default_rng(seed)
    responses = rng.integers(1, 300, size=num_rows)
    return (responses + rng.integers(10, 60, size=num_rows)).tolist(), responses.tolist()


def make(num_confident, num_unconfident, pairs=3, seed=0, length_aware=True, mega=50) -> PairedSampler:
    confident, unconfident = rows(num_confident, num_unconfident)
    lengths, responses = fake_lengths(2 * max(num_confident, num_unconfident)) if length_aware else (None, None)
    return PairedSampler(
        confident, unconfident, pairs, seed=seed, lengths=lengths, response_lengths=responses, mega_batch_factor=mega
    )


def padded_cost(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[r] for r in batch)


# -- length-aware pairing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_confident, num_unconfident", SIZES)
@pytest.mark.parametrize("pairs", [1, 2, 4])
@pytest.mark.parametrize("mega", [1, 3, 50])
def test_same_draws_as_random_pairing_only_regrouped(num_confident, num_unconfident, pairs, mega):
    """Coverage is the random sampler's: the same multiset of rows (so each example floor/ceil times), balanced."""
    aware, plain = make(num_confident, num_unconfident, pairs, mega=mega), make(num_confident, num_unconfident, pairs)
    plain.lengths = plain.response_lengths = None
    for epoch in (0, 3):
        aware.set_epoch(epoch), plain.set_epoch(epoch)
        stream = list(aware)
        assert len(stream) == len(aware) == len(list(plain))
        assert Counter(stream[::2]) == Counter(list(plain)[::2]) and Counter(stream[1::2]) == Counter(
            list(plain)[1::2]
        )
        assert is_balanced(stream)
        assert all(is_balanced(b) for m in (2, 2 * pairs) for b in chunks(stream, m))
        confident, unconfident = rows(num_confident, num_unconfident)
        assert set(stream[::2]) == set(confident) or len(confident) > len(stream) // 2
        assert set(stream[1::2]) == set(unconfident) or len(unconfident) > len(stream) // 2


def test_pairs_are_alike_and_micro_batches_pad_little():
    lengths, responses = fake_lengths(800)
    confident, unconfident = rows(400, 400)
    kwargs = dict(pairs_per_global_batch=4, seed=1)
    aware = PairedSampler(confident, unconfident, lengths=lengths, response_lengths=responses, **kwargs)
    plain = PairedSampler(confident, unconfident, **kwargs)

    def mixed(sampler):  # sum over pairs of min(N_c, N_u)
        return sum(min(responses[c], responses[u]) for c, u in sampler.pairs().tolist())

    def padding(sampler):  # share of pad slots in micro-batches of 4 pairs
        batches = chunks(list(sampler), 8)
        return 1 - sum(lengths[r] for r in sampler.pairs().flatten().tolist()) / sum(
            padded_cost(b, lengths) for b in batches
        )

    assert mixed(aware) > 1.4 * mixed(plain)
    assert padding(aware) < 0.1 < 0.3 < padding(plain)


def test_global_batches_are_shuffled_not_sorted():
    sampler = make(200, 200, pairs=2, seed=4)
    longest = [max(sampler.lengths[b].tolist()) for b in chunks(list(sampler), 4)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_deterministic_per_seed_and_epoch():
    a, b = make(60, 40, seed=7), make(60, 40, seed=7)
    assert list(a) == list(b) == list(a)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(make(60, 40, seed=8)) != list(make(60, 40, seed=7))


@pytest.mark.parametrize("num_confident, num_unconfident", [(23, 7), (10, 10), (13, 4)])
@pytest.mark.parametrize("pairs_per_device", [1, 3])
def test_two_ranks_see_the_global_batches_of_one_process(num_confident, num_unconfident, pairs_per_device):
    sampler = make(num_confident, num_unconfident, pairs=2 * pairs_per_device, seed=11, mega=2)
    sampler.set_epoch(2)
    ranks = shard_batches(sampler, pairs_per_device, 2)
    single = chunks(list(sampler), 4 * pairs_per_device)
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for i, global_batch in enumerate(single):
        assert ranks[0][i] + ranks[1][i] == global_batch and is_balanced(ranks[0][i]) and is_balanced(ranks[1][i])


@pytest.mark.parametrize("skip", [0, 2, 5])
def test_resume_on_a_prepared_shard_replays_the_tail(skip):
    sampler = make(21, 9, pairs=2, seed=1, mega=2)
    indices = list(range(42))

    def shard():
        loader = DataLoader(indices, batch_size=2, sampler=sampler)
        return prepare_data_loader(loader, num_processes=2, process_index=1, put_on_device=False)

    full = shard()
    full.set_epoch(1)
    expected = batches_of(full)
    sampler.set_epoch(0)  # a fresh process
    resumed = skip_first_batches(shard(), num_batches=skip)
    # SFTMixTrainer._run_epoch does it: accelerate's set_epoch misses it here (see test_sftmix_trainer.py)
    sampler.set_epoch(1)
    assert batches_of(resumed) == expected[skip:]


def test_length_errors():
    with pytest.raises(ValueError, match="both `lengths` and `response_lengths`"):
        PairedSampler([0], [1], 1, lengths=[3, 4])
    with pytest.raises(ValueError, match="lengths cover 2 rows"):
        PairedSampler([0, 4], [1], 1, lengths=[3, 4], response_lengths=[1, 1])
    with pytest.raises(ValueError, match="mega_batch_factor"):
        PairedSampler([0], [1], 1, mega_batch_factor=0)


# -- token-budget micro-batches --------------------------------------------------------------------------------------


def test_pack_pairs_next_fit():
    pairs = torch.tensor([[10, 8], [9, 9], [7, 3], [30, 30], [2, 2]])
    # padding-free: sums 18, 18, 10 | 60 (alone, over budget) | 4
    assert pack_pairs(pairs, 50, padded=False) == [3, 1, 1]
    # padded: rows x longest: 2x10=20, 4x10=40, 6x10=60 > 50 -> cut; 2x7=14, 4x30 > 50 -> cut; 2x30=60 alone; 2x2
    assert pack_pairs(pairs, 50, padded=True) == [2, 1, 1, 1]
    assert pack_pairs(pairs, 1, padded=False) == [1] * 5
    assert pack_pairs(torch.zeros(0, 2, dtype=torch.long), 10, padded=True) == []


def budget_sampler(num_processes=1, padded=False, max_tokens=1200, num_epochs=3, seed=3, length_aware=True):
    pairs = make(37, 29, pairs=1, seed=seed, length_aware=True, mega=40)
    lengths = pairs.lengths.tolist()
    if not length_aware:
        pairs.lengths = pairs.response_lengths = None
    return TokenBudgetBatchSampler(pairs, lengths, max_tokens, padded, num_processes, num_epochs), lengths


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("length_aware", [True, False])
def test_budget_batches_hold_whole_pairs_within_budget_and_cover_the_epoch(padded, length_aware):
    sampler, lengths = budget_sampler(padded=padded, length_aware=length_aware)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)  # the same count every planned epoch
        packed = sampler.micro_batches()
        assert batches[: len(packed)] == packed and all(b in packed for b in batches[len(packed) :])
        for batch in batches:
            cost = padded_cost(batch, lengths) if padded else sum(lengths[r] for r in batch)
            assert is_balanced(batch) and (cost <= 1200 or len(batch) == 2)
        # the packed batches hold exactly this epoch's pairs of the paired sampler
        pairs = sorted(map(tuple, sampler.sampler.pairs().tolist()))
        assert sorted((b[i], b[i + 1]) for b in packed for i in range(0, len(b), 2)) == pairs
    assert len({len(b) for b in batches}) > 1  # the size follows the lengths


def test_budget_sorting_fills_padded_batches_better():
    aware, lengths = budget_sampler(padded=True, max_tokens=2000)
    plain, _ = budget_sampler(padded=True, max_tokens=2000, length_aware=False)

    def padding(sampler):
        batches = sampler.micro_batches()
        real = sum(lengths[r] for b in batches for r in b)
        return 1 - real / sum(padded_cost(b, lengths) for b in batches)

    assert padding(aware) < 0.15 and padding(plain) > 2 * padding(aware)
    assert len(aware) < len(plain)


def test_budget_is_deterministic_and_changes_with_the_epoch():
    a, _ = budget_sampler()
    b, _ = budget_sampler()
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(budget_sampler(seed=4)[0]) != list(b)


def test_budget_length_covers_every_planned_epoch_and_refuses_beyond():
    sampler, _ = budget_sampler(num_epochs=1, max_tokens=900)
    counts = [len(sampler.micro_batches(epoch)) for epoch in range(40)]
    assert len(set(counts)) > 1  # epochs pack differently: hence the plan
    sampler.plan(40)
    assert len(sampler) == max(counts)
    first = counts.index(min(counts))
    sampler.set_epoch(first)
    assert len(list(sampler)) == len(sampler)  # topped up with its own first micro-batches
    sampler.plan(1)
    worst = counts.index(max(counts))
    sampler.set_epoch(worst)
    if counts[worst] > counts[0]:
        with pytest.raises(RuntimeError, match="planned for 1 epoch"):
            list(sampler)


@pytest.mark.parametrize("epoch", [0, 2])
def test_budget_two_ranks_get_alternate_micro_batches_of_the_one_process_stream(epoch):
    """Accelerate's BatchSamplerShard: rank r gets micro-batches r, r+2, ...; with gradient accumulation G on 2 ranks,
    an optimizer step covers the same micro-batches as 2G on one process."""
    one, _ = budget_sampler(num_processes=2)
    one.set_epoch(epoch)
    stream = list(one)
    assert len(stream) % 2 == 0
    indices = list(range(80))
    ranks = []
    for rank in range(2):
        sampler, _ = budget_sampler(num_processes=2)
        loader = prepare_data_loader(
            DataLoader(indices, batch_sampler=sampler), num_processes=2, process_index=rank, put_on_device=False
        )
        loader.set_epoch(epoch)
        ranks.append(batches_of(loader))
    assert len(ranks[0]) == len(ranks[1]) == len(stream) // 2
    assert ranks[0] == stream[0::2] and ranks[1] == stream[1::2]
    accumulation = 3
    for step in range(len(ranks[0]) // accumulation):
        window = slice(step * accumulation, (step + 1) * accumulation)
        two_process_rows = Counter(r for rank in ranks for b in rank[window] for r in b)
        one_process = stream[step * 2 * accumulation : (step + 1) * 2 * accumulation]
        assert two_process_rows == Counter(r for b in one_process for r in b)


@pytest.mark.parametrize("skip", [1, 4])
def test_budget_resume_on_a_prepared_shard_replays_the_tail(skip):
    indices = list(range(80))
    sampler, _ = budget_sampler(num_processes=2)

    def shard():
        loader = DataLoader(indices, batch_sampler=sampler)
        return prepare_data_loader(loader, num_processes=2, process_index=1, put_on_device=False)

    full = shard()
    full.set_epoch(2)
    expected = batches_of(full)
    sampler.set_epoch(0)  # a fresh process
    resumed = skip_first_batches(shard(), num_batches=skip)
    sampler.set_epoch(2)  # as SFTMixTrainer._run_epoch does
    assert batches_of(resumed) == expected[skip:]


def test_budget_errors():
    pairs = make(4, 4, pairs=1)
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatchSampler(pairs, pairs.lengths.tolist(), 0)
    with pytest.raises(ValueError, match="num_processes"):
        TokenBudgetBatchSampler(pairs, pairs.lengths.tolist(), 100, num_processes=0)


# -- in the trainer --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=NUM_EXAMPLES))[0]


class ShapeRecordingTrainer(RecordingTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            self.shapes = getattr(self, "shapes", []) + [tuple(inputs["input_ids"].shape)]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_trainer_pairs_by_length_from_the_prepared_rows(tiny_model, demo, tmp_path):
    args = make_args(tmp_path, train_sampling_strategy="group_by_length", max_steps=3)
    trainer = build(tiny_model, demo, args, trainer_cls=RecordingTrainer)
    lengths, responses = trainer._row_lengths()
    prepared = trainer.train_dataset
    assert lengths == [len(ids) for ids in prepared["input_ids"]]
    assert responses == [sum(label != -100 for label in labels) for labels in prepared["labels"]]
    assert min(responses) > 0 and lengths != responses
    sampler = trainer._get_train_sampler()
    assert sampler.length_aware and sampler.pairs_per_global_batch == 2
    trainer.train()
    assert len(trainer.seen_rows) == 3
    for batch in trainer.seen_rows:
        assert [r in trainer.confident_rows for r in batch] == [True, False, True, False]


def test_config_refuses_samplers_that_break_pairs_and_bad_budgets(tmp_path):
    with pytest.raises(ValueError, match="'random' or 'group_by_length'"):
        make_args(tmp_path, train_sampling_strategy="batch_rebalance")
    with pytest.raises(ValueError, match="tokens_per_micro_batch"):
        make_args(tmp_path, tokens_per_micro_batch=0)


def test_trainer_fills_micro_batches_to_the_token_budget(tiny_model, demo, tmp_path):
    args = make_args(
        tmp_path, tokens_per_micro_batch=400, train_sampling_strategy="group_by_length", gradient_accumulation_steps=2
    )
    trainer = build(tiny_model, demo, args, trainer_cls=ShapeRecordingTrainer)
    trainer.train()
    assert len(trainer.seen_rows) == 8  # 4 optimizer steps x 2 micro-batches
    for batch, (num_rows, width) in zip(trainer.seen_rows, trainer.shapes):
        assert len(batch) == num_rows and num_rows % 2 == 0
        assert [r in trainer.confident_rows for r in batch] == [True, False] * (num_rows // 2)
        assert num_rows * width <= 400 or num_rows == 2
    assert len({len(batch) for batch in trainer.seen_rows}) > 1
    logs = [h for h in trainer.state.log_history if "mixup_loss" in h]
    assert len(logs) == 4 and all(np.isfinite(h["loss"]) and h["mixup_token_share"] > 0 for h in logs)


def test_padding_free_micro_batches_fill_the_token_budget(tiny_model, demo, tmp_path):
    args = make_args(
        tmp_path, padding_free=True, tokens_per_micro_batch=600, train_sampling_strategy="group_by_length", max_steps=3
    )
    trainer = build(tiny_model, demo, args, trainer_cls=ShapeRecordingTrainer)
    lengths, _ = trainer._row_lengths()
    trainer.train()
    for batch, shape in zip(trainer.seen_rows, trainer.shapes):
        assert shape[0] == 1 and shape[1] == sum(lengths[r] for r in batch)  # one row, no padding
        assert shape[1] <= 600 or len(batch) == 2
        assert [r in trainer.confident_rows for r in batch] == [True, False] * (len(batch) // 2)
    assert max(len(batch) for batch in trainer.seen_rows) > 4  # more than a fixed batch of 4 would hold
    logs = [h for h in trainer.state.log_history if "mixup_loss" in h]
    assert len(logs) == 3 and all(np.isfinite(h["loss"]) and h["mixup_token_share"] > 0 for h in logs)


def test_token_budget_resume_in_a_later_epoch_replays_the_same_batches(tiny_model, demo, tmp_path):
    common = dict(tokens_per_micro_batch=300, train_sampling_strategy="group_by_length", max_steps=9)
    full = build(tiny_model, demo, make_args(tmp_path / "full", **common), trainer_cls=RecordingTrainer)
    full.train()
    assert full.state.epoch > 1  # the checkpoint below is in a later epoch
    args = make_args(tmp_path / "cut", save_strategy="steps", save_steps=7, **common)
    build(tiny_model, demo, args, trainer_cls=RecordingTrainer).train()
    resumed = build(tiny_model, demo, args, trainer_cls=RecordingTrainer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-7"))
    assert resumed.seen_rows == full.seen_rows[7:]
    for name, weight in adapter_weights(full).items():
        torch.testing.assert_close(adapter_weights(resumed)[name], weight, rtol=1e-4, atol=1e-6)


def test_run_epoch_sets_the_epoch_of_the_paired_sampler(tiny_model, demo, tmp_path, monkeypatch):
    """accelerate's `set_epoch` does not reach a sampler under SkipBatchSampler(BatchSamplerShard(...)), which is
    what a resumed multi-process run iterates: the trainer sets it at the start of each epoch."""
    sampler = make(6, 6, pairs=2)
    loader = DataLoader(list(range(12)), batch_size=2, sampler=sampler)
    resumed = skip_first_batches(
        prepare_data_loader(loader, num_processes=2, process_index=1, put_on_device=False), num_batches=1
    )
    resumed.set_epoch(3)
    assert sampler.epoch == 0  # the gap the hook closes

    trainer = build(tiny_model, demo, make_args(tmp_path))
    seen = []
    monkeypatch.setattr(SFTTrainer, "_run_epoch", lambda self, model, epoch, *a, **k: seen.append(epoch))
    trainer._get_train_sampler()
    trainer._run_epoch(model=None, epoch=3, train_dataloader=None)
    assert seen == [3] and trainer._paired_sampler.epoch == 3


@pytest.mark.slow
def test_token_budget_two_processes_match_one_process_with_twice_the_accumulation(tiny_model, tmp_path):
    """The global batch of an optimizer step is the same micro-batches on 1 process x 2G and 2 processes x G, and the
    NTP and Mixup normalisation (per accumulation window, across processes) gives the same losses."""
    from test_recipes import TINY, log_history, ok

    common = [*TINY, "--config", "configs/demo/sftmix_qlora.yaml", "--model_name_or_path", str(tiny_model)]
    ok(
        run_recipe(
            "confidence.py", *common, "--output_dir", str(tmp_path / "ref"), "--reference_learning_rate", "1e-2"
        )
    )
    stage2 = [
        *common,
        "--confidence_table", str(tmp_path / "ref" / "confidence"),
        "--max_steps", "3",
        "--learning_rate", "1e-2",
        "--tokens_per_micro_batch", "700",
        "--train_sampling_strategy", "group_by_length",
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run_recipe("sftmix.py", *stage2, "--output_dir", str(one), "--gradient_accumulation_steps", "2"))
    ok(
        run_recipe(
            "sftmix.py", *stage2, "--output_dir", str(two), "--gradient_accumulation_steps", "1", num_processes=2
        )
    )
    logs_one = [h for h in log_history(one) if "ntp_loss" in h]
    logs_two = [h for h in log_history(two) if "ntp_loss" in h]
    assert len(logs_one) == len(logs_two) == 3
    # the loss and gradient of each optimizer step (per-micro-batch metrics like ntp_loss average differently)
    for a, b in zip(logs_one, logs_two):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-3), key
    expected, got = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].float(), tensor.float(), rtol=2e-3, atol=1e-5)
