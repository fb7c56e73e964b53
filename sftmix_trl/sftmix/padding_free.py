"""Padding-free rows in stage 2: one row per micro-batch, the examples laid end to end, no padding.

TRL's collator (`padding_free=True`) concatenates the examples of a micro-batch into a single row and restarts
`position_ids` at 0 for each example (the attention that keeps them apart is checked in `sft_trainer.check_attention`).
The Mixup needs the examples and their pairs back:
- `sequence_lengths` and `unflatten`: recover the examples of a flattened row as right-padded rows (pure functions,
  for the labels and per-token metrics, whose rows are small);
- `mixed_flat_positions`: where the Mixup's positions lie in the flattened row, so the hidden states are gathered
  there and never re-padded.
"""

from __future__ import annotations

import torch

from sftmix_trl.sftmix.mixup import IGNORE_INDEX, mixed_position_masks


def sequence_lengths(position_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Lengths (num_sequences,) of the first `num_sequences` examples of a flattened row, from `position_ids` (1, N).

    Each example starts where its position is 0. Padding added by `pad_to_multiple_of` after the last example also
    has position 0, so it only ends the last example; it is not counted.
    """
    starts = (position_ids[0] == 0).nonzero().flatten()  # (S,), S >= num_sequences
    if len(starts) < num_sequences:
        raise ValueError(f"the row holds {len(starts)} sequences, fewer than the {num_sequences} examples expected")
    ends = torch.cat([starts[1:], starts.new_tensor([position_ids.shape[1]])])
    return (ends - starts)[:num_sequences]


def unflatten(flat: torch.Tensor, lengths: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
    """One row per example again: (1, N, *) laid end to end -> (B, T, *) right-padded with `fill`, T = max length.

    Gathered by index, so gradients flow back to `flat`; the examples are the first sum(lengths) positions.
    """
    num, width = len(lengths), int(lengths.max())
    offsets = torch.arange(width, device=flat.device)  # (T,)
    starts = (lengths.cumsum(0) - lengths).to(flat.device)  # (B,)
    valid = offsets[None] < lengths.to(flat.device)[:, None]  # (B, T)
    index = torch.where(valid, starts[:, None] + offsets[None], 0)  # (B, T), a real position everywhere
    rows = flat[0][index]  # (B, T, *)
    return rows.masked_fill(~valid.view(num, width, *[1] * (flat.dim() - 2)), fill)


def mixed_flat_positions(
    labels: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Mixup's positions in a flattened row of pairs [c_1, u_1, c_2, u_2, ...]: the same positions, in the same
    order, as `mixup.mixed_position_masks` selects on the padded rows, as indices into the row.

    Args:
        labels: (1, N) labels of the flattened row (the collator sets each example's first label to -100; that
            label is never a target, since position t predicts label t + 1).
        lengths: (2K,) example lengths (`sequence_lengths`).

    Returns:
        `(index_c, index_u, n)`: (M,) row indices of the mixed positions of the confident and the unconfident
        examples, pair-major then position order, and (K,) mixed positions per pair. The targets are
        `labels[0, index + 1]`, and the hidden states `hidden[0, index]`: only M rows of the hidden states are
        gathered, where re-padding them copied (2K, T_max, D).
    """
    rows = unflatten(labels, lengths, IGNORE_INDEX)  # (2K, T) token ids: small next to (2K, T, D)
    keep_c, keep_u, n = mixed_position_masks(rows[0::2], rows[1::2])  # (K, T-1)
    starts = (lengths.cumsum(0) - lengths).to(labels.device)  # (2K,) where each example begins in the row
    offsets = torch.arange(rows.shape[1] - 1, device=labels.device)  # (T-1,) position within an example
    index_c = (starts[0::2, None] + offsets[None])[keep_c]
    index_u = (starts[1::2, None] + offsets[None])[keep_u]
    return index_c, index_u, n
