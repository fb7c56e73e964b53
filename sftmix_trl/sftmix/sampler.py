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

Length-aware pairing (`lengths` given, `train_sampling_strategy: group_by_length`): the same draws of both subsets
(so the same coverage) are cut into mega-batches of `mega_batch_factor` global batches; inside each, the confident
and the unconfident draws are each sorted by response length and paired rank by rank, which raises the mixed
positions of a pair (min(N_c, N_u)); the pairs are then ordered by their longer sequence and cut into global
batches, so a micro-batch pads little. The global batches are shuffled, so lengths do not follow the training time.

`TokenBudgetBatchSampler` fills micro-batches with whole pairs up to a token budget instead of a fixed K.
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
        lengths: Sequence[int] | None = None,
        response_lengths: Sequence[int] | None = None,
        mega_batch_factor: int = 50,
    ):
        """
        Args:
            confident, unconfident: dataset row indices of the two subsets.
            pairs_per_global_batch: K x number of processes; the epoch is a whole number of these.
            seed: the run's seed; the epoch is mixed in by `set_epoch`.
            lengths, response_lengths: per dataset row, its token count and its trained (label) token count. Given,
                pairs are drawn inside length-sorted mega-batches (length-aware pairing); None, at random.
            mega_batch_factor: global batches per mega-batch of length-aware pairing (transformers'
                `LengthGroupedSampler` uses 50): larger matches lengths better, smaller keeps more randomness.
        """
        if len(confident) == 0 or len(unconfident) == 0:  # `not array` fails on numpy arrays and tensors
            raise ValueError(f"both subsets need examples: {len(confident)} confident, {len(unconfident)} unconfident")
        if pairs_per_global_batch < 1:
            raise ValueError(f"pairs_per_global_batch must be >= 1, got {pairs_per_global_batch}")
        if (lengths is None) != (response_lengths is None):
            raise ValueError("length-aware pairing needs both `lengths` and `response_lengths`")
        if mega_batch_factor < 1:
            raise ValueError(f"mega_batch_factor must be >= 1, got {mega_batch_factor}")
        self.confident = torch.as_tensor(list(confident), dtype=torch.long)
        self.unconfident = torch.as_tensor(list(unconfident), dtype=torch.long)
        self.pairs_per_global_batch = pairs_per_global_batch
        self.seed = seed
        self.epoch = 0
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths), dtype=torch.long)
        self.response_lengths = (
            None if response_lengths is None else torch.as_tensor(list(response_lengths), dtype=torch.long)
        )
        if self.lengths is not None:
            needed = int(max(self.confident.max(), self.unconfident.max())) + 1
            if len(self.lengths) < needed or len(self.response_lengths) < needed:
                raise ValueError(f"lengths cover {len(self.lengths)} rows, the subsets index up to row {needed - 1}")
        self.mega_batch_factor = mega_batch_factor
        larger = max(len(self.confident), len(self.unconfident))
        self.num_pairs = math.ceil(larger / pairs_per_global_batch) * pairs_per_global_batch

    @property
    def length_aware(self) -> bool:
        return self.lengths is not None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 2 * self.num_pairs

    def _draw(self, subset: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`num_pairs` indices of `subset`: whole random permutations back to back, the last one cut short."""
        rounds = math.ceil(self.num_pairs / len(subset))
        orders = [subset[torch.randperm(len(subset), generator=generator)] for _ in range(rounds)]
        return torch.cat(orders)[: self.num_pairs]

    def _by_length(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` sorted longest response first (ties: longest sequence first, then draw order: deterministic)."""
        key = self.response_lengths[rows] * (int(self.lengths.max()) + 1) + self.lengths[rows]
        return rows[torch.sort(key, descending=True, stable=True).indices]

    def pair_groups(self, epoch: int | None = None) -> tuple[list[torch.Tensor], torch.Generator]:
        """The pairs of `epoch` (default: the current one), as groups of (n, 2) [confident, unconfident] rows, and the
        generator that drew them (to draw further orderings from the same seed and epoch).

        At random: one group, in random order. Length-aware: one group per mega-batch, sorted longest pair first.
        """
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        confident, unconfident = self._draw(self.confident, generator), self._draw(self.unconfident, generator)
        if not self.length_aware:
            return [torch.stack([confident, unconfident], dim=1)], generator
        groups = []
        mega_batch = self.pairs_per_global_batch * self.mega_batch_factor
        for start in range(0, self.num_pairs, mega_batch):
            # similar response lengths paired: N_k = min(N_c, N_u) is the most a pair can mix
            chunk = slice(start, start + mega_batch)
            pairs = torch.stack(
                [self._by_length(confident[chunk]), self._by_length(unconfident[chunk])], dim=1
            )  # (m, 2)
            longer = self.lengths[pairs].max(dim=1).values  # (m,): a micro-batch pads to its longest row
            groups.append(pairs[torch.sort(longer, descending=True, stable=True).indices])
        return groups, generator

    def pairs(self) -> torch.Tensor:
        """(num_pairs, 2) [confident, unconfident] row indices of this epoch, in order."""
        groups, generator = self.pair_groups()
        if not self.length_aware:
            return groups[0]
        # whole global batches, shuffled: their pairs stay together, their order no longer follows length
        blocks = torch.cat(groups).view(-1, self.pairs_per_global_batch, 2)
        return blocks[torch.randperm(len(blocks), generator=generator)].view(-1, 2)

    def __iter__(self) -> Iterator[int]:
        return iter(self.pairs().flatten().tolist())


def pack_pairs(pair_lengths: torch.Tensor, max_tokens: int, padded: bool) -> list[int]:
    """Next-fit packing of consecutive pairs into micro-batches of at most `max_tokens` computed tokens.

    Args:
        pair_lengths: (n, 2) token counts of the two sequences of each pair, in the order to pack them.
        max_tokens: the budget of one micro-batch.
        padded: count rows x longest row (a right-padded batch); else the sum of the lengths (padding-free).

    Returns:
        the number of pairs of each micro-batch, in order (sums to n). A pair over the budget alone gets a
        micro-batch of its own: pairs are never cut.
    """
    sizes: list[int] = []
    rows = longest = total = 0
    for a, b in pair_lengths.tolist():
        new_longest, new_total = max(longest, a, b), total + a + b
        cost = (rows + 2) * new_longest if padded else new_total
        if rows and cost > max_tokens:
            sizes.append(rows // 2)
            rows, new_longest, new_total = 0, max(a, b), a + b
        rows, longest, total = rows + 2, new_longest, new_total
    if rows:
        sizes.append(rows // 2)
    return sizes


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Micro-batches of whole pairs filled up to a token budget, instead of a fixed K pairs.

    Each epoch takes the pairs of a `PairedSampler` (its coverage, its seed and epoch), packs them next-fit into
    micro-batches of at most `max_tokens` computed tokens (inside each length-sorted mega-batch when the pairing is
    length-aware, so neighbours are alike), and shuffles the micro-batches. Each is yielded interleaved,
    `[c_1, u_1, c_2, u_2, ...]`, so rows 2k and 2k+1 are pair k as with the fixed-size sampler.

    Across processes: accelerate's `BatchSamplerShard` hands consecutive micro-batches to consecutive ranks, so every
    rank gets whole micro-batches (whole pairs). The stream does not depend on the number of processes P, so P
    processes with gradient accumulation G train on the same optimizer-step batches as one process with P x G.

    The Trainer needs the same number of micro-batches in every epoch (it plans the steps from `len()` and resumes by
    skipping that many), but the packing of each epoch's pairs differs a little. So `plan(num_epochs)` fixes the
    length to the most any planned epoch needs, rounded up to a multiple of P; an epoch that packs into fewer repeats
    its first micro-batches (re-sampled pairs, as the fixed-size sampler tops up its last global batch).
    """

    def __init__(
        self,
        sampler: PairedSampler,
        lengths: Sequence[int],
        max_tokens: int,
        padded: bool = True,
        num_processes: int = 1,
        num_epochs: int = 1,
    ):
        """
        Args:
            sampler: draws each epoch's pairs. Named `sampler` so that accelerate's `set_epoch` reaches it.
            lengths: the token count of each dataset row.
            max_tokens: the budget of one micro-batch, in computed tokens (see `pack_pairs`).
            padded: whether the collator right-pads a micro-batch (False: padding-free, one flattened row).
            num_processes: P; the number of micro-batches is a multiple of it.
            num_epochs: epochs to plan for (`plan`).
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        self.sampler = sampler
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.max_tokens = max_tokens
        self.padded = padded
        self.num_processes = num_processes
        self.plan(num_epochs)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def micro_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The packed micro-batches of `epoch` (default: the current one), shuffled, before any top-up."""
        groups, generator = self.sampler.pair_groups(epoch)
        batches = []
        for pairs in groups:  # (n, 2) each
            start = 0
            for size in pack_pairs(self.lengths[pairs], self.max_tokens, self.padded):
                batches.append(pairs[start : start + size].flatten().tolist())
                start += size
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def plan(self, num_epochs: int) -> None:
        """Fix `len()` to cover epochs 0 .. num_epochs - 1."""
        most = max(len(self.micro_batches(epoch)) for epoch in range(max(1, num_epochs)))
        self.num_epochs = max(1, num_epochs)
        self.num_batches = math.ceil(most / self.num_processes) * self.num_processes

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.micro_batches()
        if len(batches) > self.num_batches:  # only past the planned epochs: never drop pairs silently
            raise RuntimeError(
                f"epoch {self.sampler.epoch} packs into {len(batches)} micro-batches, more than the {self.num_batches} "
                f"planned for {self.num_epochs} epoch(s)"
            )
        yield from batches
        for i in range(self.num_batches - len(batches)):
            yield batches[i % len(batches)]
