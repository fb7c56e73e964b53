"""The paired sampler: every micro-batch holds K confident and K unconfident examples, paired at random.

Indices come out interleaved, `[c_1, u_1, c_2, u_2, ...]`, so any even batch size cuts the stream into whole pairs:
with DDP, accelerate hands consecutive batches to consecutive ranks, and the pairs of one global batch are the same
whether it runs as one process with batch 2K*P or as P processes with batch 2K each. Rows 2k and 2k+1 of a batch are
pair k.

One epoch covers the larger subset exactly once, in a random order. The smaller subset is re-sampled to match: it
is walked through in fresh random orders, back to back, so each of its examples is drawn floor or ceil(larger /
smaller) times. The number of pairs is then rounded *up* to whole global batches (K pairs x processes) with more
re-sampled pairs, so nothing is dropped and no process gets a short batch. The order depends only on the seed and
the epoch: identical on every rank, and replayed exactly when a run resumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class PairedSampler(Sampler[int]):
    def __init__(
        self,
        confident: Sequence[int],
        unconfident: Sequence[int],
        pairs_per_global_batch: int,
        seed: int = 0,
    ):
        """
        Args:
            confident, unconfident: dataset row indices of the two subsets.
            pairs_per_global_batch: K x number of processes; the epoch is a whole number of these.
            seed: the run's seed; the epoch is mixed in by `set_epoch`.
        """
        if len(confident) == 0 or len(unconfident) == 0:  # `not array` fails on numpy arrays and tensors
            raise ValueError(f"both subsets need examples: {len(confident)} confident, {len(unconfident)} unconfident")
        if pairs_per_global_batch < 1:
            raise ValueError(f"pairs_per_global_batch must be >= 1, got {pairs_per_global_batch}")
        self.confident = torch.as_tensor(list(confident), dtype=torch.long)
        self.unconfident = torch.as_tensor(list(unconfident), dtype=torch.long)
        self.pairs_per_global_batch = pairs_per_global_batch
        self.seed = seed
        self.epoch = 0
        larger = max(len(self.confident), len(self.unconfident))
        self.num_pairs = math.ceil(larger / pairs_per_global_batch) * pairs_per_global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 2 * self.num_pairs

    def _draw(self, subset: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`num_pairs` indices of `subset`: whole random permutations back to back, the last one cut short."""
        rounds = math.ceil(self.num_pairs / len(subset))
        orders = [subset[torch.randperm(len(subset), generator=generator)] for _ in range(rounds)]
        return torch.cat(orders)[: self.num_pairs]

    def pairs(self) -> torch.Tensor:
        """(num_pairs, 2) [confident, unconfident] row indices of this epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.stack([self._draw(self.confident, generator), self._draw(self.unconfident, generator)], dim=1)

    def __iter__(self) -> Iterator[int]:
        return iter(self.pairs().flatten().tolist())
