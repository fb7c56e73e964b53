"""The paired sampler: balanced micro-batches, epoch coverage, determinism, and how accelerate shards and resumes it."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader, skip_first_batches
from torch.utils.data import BatchSampler, DataLoader

from sftmix_trl.sftmix.sampler import PairedSampler

# Confident rows are even numbers and unconfident rows odd ones, so a row's subset can be read off the row itself.
SIZES = [(10, 10), (23, 7), (7, 23), (1, 1), (1, 9), (9, 1), (12, 5)]


def rows(num_confident: int, num_unconfident: int) -> tuple[list[int], list[int]]:
    return list(range(0, 2 * num_confident, 2)), list(range(1, 2 * num_unconfident, 2))


def make(num_confident: int, num_unconfident: int, pairs: int = 3, seed: int = 0) -> PairedSampler:
    confident, unconfident = rows(num_confident, num_unconfident)
    return PairedSampler(confident, unconfident, pairs_per_global_batch=pairs, seed=seed)


def is_balanced(batch: list[int]) -> bool:
    """Rows 2k, 2k+1 are confident then unconfident for every k."""
    return len(batch) % 2 == 0 and all(c % 2 == 0 and u % 2 == 1 for c, u in zip(batch[::2], batch[1::2]))


def chunks(stream: list, size: int) -> list[list]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


@pytest.mark.parametrize("num_confident, num_unconfident", SIZES)
@pytest.mark.parametrize("pairs", [1, 2, 4])
def test_every_pair_is_confident_then_unconfident(num_confident, num_unconfident, pairs):
    stream = list(make(num_confident, num_unconfident, pairs))
    assert len(stream) == len(make(num_confident, num_unconfident, pairs))
    assert is_balanced(stream)
    for micro_batch in (2, 4, 6, 2 * pairs):
        assert all(is_balanced(batch) for batch in chunks(stream, micro_batch))
        assert all(sum(r % 2 == 0 for r in batch) * 2 == len(batch) for batch in chunks(stream, micro_batch))


@pytest.mark.parametrize("num_confident, num_unconfident", SIZES)
@pytest.mark.parametrize("pairs", [1, 3, 4, 8])
def test_epoch_covers_the_larger_subset_and_resamples_the_smaller(num_confident, num_unconfident, pairs):
    sampler = make(num_confident, num_unconfident, pairs)
    stream = list(sampler)
    confident, unconfident = rows(num_confident, num_unconfident)
    larger, smaller = (confident, unconfident) if num_confident >= num_unconfident else (unconfident, confident)
    num_pairs = math.ceil(len(larger) / pairs) * pairs

    assert len(stream) == 2 * num_pairs == len(sampler)
    assert len(stream) % (2 * pairs) == 0
    assert num_pairs - len(larger) < pairs  # only the last global batch is filled up

    counts = Counter(stream)
    assert set(counts) <= set(confident) | set(unconfident)
    # the larger subset: every example, the first `len(larger)` of its draws a permutation, the rest re-sampled extras
    larger_draws = [r for r in stream if (r % 2 == 0) == (larger is confident)]
    assert sorted(larger_draws[: len(larger)]) == sorted(larger)
    assert sum(counts[r] for r in larger) == num_pairs
    if num_pairs == len(larger):
        assert all(counts[r] == 1 for r in larger)
    # both subsets: each example floor or ceil(num_pairs / size) times (the larger: at least once)
    for subset in (larger, smaller):
        low, high = num_pairs // len(subset), math.ceil(num_pairs / len(subset))
        assert low >= 1 and all(low <= counts[r] <= high for r in subset)
    assert sum(counts[r] for r in smaller) == num_pairs


def test_exact_multiple_has_no_extras():
    stream = list(make(12, 5, pairs=4))
    assert len(stream) == 24
    assert sorted(stream[::2]) == list(range(0, 24, 2))
    assert sorted(Counter(stream[1::2]).values()) == [2, 2, 2, 3, 3]


def test_pairs_matches_the_stream():
    sampler = make(9, 4, pairs=2)
    pairs = sampler.pairs()
    assert pairs.shape == (10, 2)
    assert pairs.flatten().tolist() == list(sampler)
    assert (pairs[:, 0] % 2 == 0).all() and (pairs[:, 1] % 2 == 1).all()


def test_size_one_subsets():
    assert list(PairedSampler([5], [8], pairs_per_global_batch=1)) == [5, 8]
    assert list(PairedSampler([5], [8], pairs_per_global_batch=3)) == [5, 8] * 3
    stream = list(PairedSampler([5], [1, 3, 7], pairs_per_global_batch=2))
    assert stream[::2] == [5, 5, 5, 5] and sorted(stream[1::2][:3]) == [1, 3, 7]


def test_arbitrary_row_numbers_are_passed_through():
    confident, unconfident = [100, 7, 42], [3, 999, 15, 8, 64]
    stream = list(PairedSampler(confident, unconfident, pairs_per_global_batch=5, seed=1))
    assert set(stream[::2]) == set(confident) and sorted(stream[1::2]) == sorted(unconfident)


def test_accepts_arrays_and_tensors():
    expected = list(make(6, 4, pairs=2, seed=5))
    confident, unconfident = rows(6, 4)
    for convert in (np.asarray, torch.tensor, tuple, list):
        sampler = PairedSampler(convert(confident), convert(unconfident), pairs_per_global_batch=2, seed=5)
        assert list(sampler) == expected
    with pytest.raises(ValueError, match="both subsets"):
        PairedSampler(np.array([], dtype=int), np.arange(3), pairs_per_global_batch=1)


def test_yields_python_ints():
    assert all(type(r) is int for r in make(4, 3))


def test_deterministic_per_seed_and_epoch():
    a, b = make(30, 11, seed=7), make(30, 11, seed=7)
    assert list(a) == list(b) == list(a)  # same seed and epoch; iterating twice replays
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(make(30, 11, seed=8)) != list(make(30, 11, seed=7))
    epochs = []
    for epoch in range(4):
        a.set_epoch(epoch)
        epochs.append(tuple(a))
    assert len(set(epochs)) == 4
    a.set_epoch(2)
    assert tuple(a) == epochs[2]


def test_order_is_random_and_resampling_is_not_a_fixed_cycle():
    sampler = make(40, 7, pairs=1, seed=3)
    confident_order = list(sampler)[::2]
    assert confident_order != sorted(confident_order)
    unconfident = list(sampler)[1::2]
    rounds = chunks(unconfident, 7)
    assert all(sorted(r) == list(range(1, 14, 2)) for r in rounds[:-1])  # whole permutations back to back
    assert len({tuple(r) for r in rounds[:-1]}) > 1  # each one freshly shuffled


@pytest.mark.parametrize(
    "confident, unconfident, pairs",
    [([], [1, 3], 1), ([0, 2], [], 1), ([], [], 1), ([0], [1], 0), ([0], [1], -2)],
)
def test_errors(confident, unconfident, pairs):
    with pytest.raises(ValueError):
        PairedSampler(confident, unconfident, pairs_per_global_batch=pairs)


def shard_batches(sampler: PairedSampler, pairs_per_device: int, num_processes: int) -> list[list[list[int]]]:
    batch_sampler = BatchSampler(sampler, batch_size=2 * pairs_per_device, drop_last=False)
    return [
        list(
            BatchSamplerShard(
                batch_sampler, num_processes=num_processes, process_index=r, split_batches=False, even_batches=True
            )
        )
        for r in range(num_processes)
    ]


@pytest.mark.parametrize("num_confident, num_unconfident", [(23, 7), (7, 23), (10, 10), (1, 1), (13, 4)])
@pytest.mark.parametrize("pairs_per_device", [1, 2, 3])
def test_two_ranks_see_the_global_batches_of_one_process(num_confident, num_unconfident, pairs_per_device):
    num_processes = 2
    sampler = make(num_confident, num_unconfident, pairs=pairs_per_device * num_processes, seed=11)
    sampler.set_epoch(3)
    stream = list(sampler)
    ranks = shard_batches(sampler, pairs_per_device, num_processes)

    # no short or padded batch: both ranks get the same number of full, balanced batches
    assert len(ranks[0]) == len(ranks[1]) == len(stream) // (2 * pairs_per_device * num_processes)
    for batches in ranks:
        assert all(len(b) == 2 * pairs_per_device and is_balanced(b) for b in batches)

    # rank 0 batch i then rank 1 batch i is global batch i of one process with batch 4K, in the same order
    single = list(BatchSampler(sampler, batch_size=2 * pairs_per_device * num_processes, drop_last=False))
    assert len(single) == len(ranks[0])
    for i, global_batch in enumerate(single):
        assert ranks[0][i] + ranks[1][i] == global_batch
        assert ranks[0][i][::2] + ranks[1][i][::2] == global_batch[::2]  # the same pairs

    # together the ranks consume the sampler's stream exactly: nothing duplicated or dropped across ranks
    merged = [row for i in range(len(ranks[0])) for rank in ranks for row in rank[i]]
    assert merged == stream
    assert Counter(ranks[0][0] + ranks[1][0]) == Counter(stream[: 4 * pairs_per_device])


def test_ranks_draw_different_pairs():
    ranks = shard_batches(make(40, 40, pairs=4, seed=0), pairs_per_device=2, num_processes=2)
    assert {r for b in ranks[0] for r in b}.isdisjoint({r for b in ranks[1] for r in b})


def test_prepared_data_loader_shards_like_batch_sampler_shard():
    """The path the Trainer takes: `prepare_data_loader` (DataLoaderShard) sets the epoch on the sampler."""
    sampler = make(17, 6, pairs=4, seed=2)
    dataset = list(range(2 * 17))
    expected = None
    outputs = []
    for rank in range(2):
        loader = DataLoader(dataset, batch_size=4, sampler=sampler)
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        shard.set_epoch(5)
        outputs.append([b.tolist() for b in shard])
    sampler.set_epoch(5)
    expected = shard_batches(sampler, pairs_per_device=2, num_processes=2)
    assert outputs == expected
    assert all(is_balanced(b) for batches in outputs for b in batches)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_gradient_accumulation_micro_batches_are_balanced(num_processes):
    pairs_per_device, accumulation = 2, 3
    sampler = make(29, 8, pairs=pairs_per_device * num_processes, seed=4)
    for rank_batches in shard_batches(sampler, pairs_per_device, num_processes):
        steps = chunks(rank_batches, accumulation)  # one optimizer step: GA micro-batches, the last step may be short
        assert sum(len(s) for s in steps) == len(rank_batches)
        for step in steps:
            assert all(len(micro) == 2 * pairs_per_device and is_balanced(micro) for micro in step)
    flat = list(sampler)
    assert all(is_balanced(m) for m in chunks(flat, 2 * pairs_per_device))


def batches_of(loader) -> list[list[int]]:
    return [torch.as_tensor(b).tolist() for b in loader]


@pytest.mark.parametrize("use_batch_sampler", [True, False])
@pytest.mark.parametrize("skip", [0, 1, 3, 7])
def test_resume_with_skip_first_batches_replays_the_tail(use_batch_sampler, skip):
    pairs_per_device, epoch = 2, 2
    sampler = make(13, 5, pairs=pairs_per_device, seed=9)
    dataset = list(range(2 * 13))

    def loader():
        if use_batch_sampler:
            return DataLoader(dataset, batch_sampler=BatchSampler(sampler, 2 * pairs_per_device, drop_last=False))
        return DataLoader(dataset, batch_size=2 * pairs_per_device, sampler=sampler)

    sampler.set_epoch(epoch)
    full = batches_of(loader())
    assert len(full) == 7 and all(is_balanced(b) for b in full)

    sampler.set_epoch(0)  # a fresh process: the sampler starts elsewhere
    list(sampler)
    sampler.set_epoch(epoch)
    resumed = batches_of(skip_first_batches(loader(), num_batches=skip))
    assert resumed == full[skip:]

    sampler.set_epoch(epoch + 1)
    assert batches_of(skip_first_batches(loader(), num_batches=skip)) != full[skip:] or skip == len(full)


def test_resume_on_a_prepared_shard():
    """Resume mid-epoch on rank 1 of 2: the skipped shard yields the tail of that rank's uninterrupted batches."""
    sampler = make(21, 9, pairs=2, seed=1)
    dataset = list(range(2 * 21))
    shard = prepare_data_loader(
        DataLoader(dataset, batch_size=2, sampler=sampler), num_processes=2, process_index=1, put_on_device=False
    )
    shard.set_epoch(1)
    full = batches_of(shard)
    resumed_loader = skip_first_batches(shard, num_batches=4)
    resumed_loader.set_epoch(1)
    assert batches_of(resumed_loader) == full[4:]
