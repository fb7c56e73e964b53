"""Padding-free batches: one row per micro-batch, the examples laid end to end, no padding.

TRL's collator (`padding_free=True`) concatenates the examples of a micro-batch into a single row, restarts
`position_ids` at 0 for each example and passes no `attention_mask`. The attention keeps the examples apart from the
sequence boundaries: flash-attention through `cu_seq_lens` (its varlen kernel: cost sum of L^2, no mask), flex attention
through a block mask built from `position_ids` (128 x 128 blocks wholly outside every example are skipped; no dense
mask), and sdpa/eager through the dense block-diagonal causal mask transformers builds from `position_ids` when there is
no attention mask and no cache ((sum of L)^2 booleans, and no flash kernel behind it).

Here:
- `check_attention`: refuse an attention implementation that would let packed examples see each other;
- `trainable_attention`: the attention to load on this machine (flex attention has no backward on a CPU: sdpa there);
- `sequence_lengths` and `unflatten`: recover the examples of a flattened row as right-padded rows (pure functions,
  for the labels and per-token metrics, whose rows are small);
- `mixed_flat_positions`: where the Mixup's positions lie in the flattened row, so the hidden states are gathered
  there and never re-padded;
- `TruncatingSFTTrainer`: TRL's `SFTTrainer` that keeps `max_length` under `padding_free`.
"""

from __future__ import annotations

import copy
import logging

import pyarrow.compute as pc
import torch
from datasets import Dataset
from transformers.utils.generic import is_flash_attention_requested
from trl import SFTTrainer

from .errors import SFTMixError
from .mixup import IGNORE_INDEX, mixed_position_masks

logger = logging.getLogger(__name__)

# Implementations that build transformers' packed-sequence mask from `position_ids`. Every flash flavour (the
# flash-attn packages, Hub kernels such as `kernels-community/flash-attn2`, `paged|flash_attention_2`) runs its varlen
# kernel on the collator's `cu_seq_lens`: transformers' own `is_flash_attention_requested` names them
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")


class PaddingFreeError(SFTMixError):
    """A setting that padding-free batches cannot honour."""


def check_attention(attn_implementation: str | None) -> None:
    """Refuse an attention implementation that cannot keep the examples of a padding-free row apart.

    `None` is transformers' default choice (sdpa, or eager for a model without sdpa), which can; so do the masked
    implementations and every flash flavour transformers recognises. A paged cache (`paged|sdpa`) cannot: it attends
    over the whole row.
    """
    if attn_implementation is None or attn_implementation in MASKED_ATTENTION:
        return
    if is_flash_attention_requested(requested_attention_implementation=attn_implementation):
        return
    raise PaddingFreeError(
        f"padding_free needs an attention that keeps packed examples apart; attn_implementation="
        f"{attn_implementation!r} does not: set `attn_implementation: sdpa` (or flex_attention, or a flash "
        "attention on a GPU), or `padding_free: false`"
    )


def trainable_attention(attn_implementation: str | None) -> str | None:
    """The attention to train with here: `flex_attention` has no backward on a CPU (torch raises at the first step),
    so a config that opts into it trains with sdpa on a CPU, which keeps padding-free examples apart too (with a
    dense mask)."""
    if attn_implementation == "flex_attention" and not (torch.cuda.is_available() or torch.xpu.is_available()):
        logger.warning("flex_attention has no backward on a CPU: sdpa is used instead (same results, dense mask)")
        return "sdpa"
    return attn_implementation


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


def is_prepared(dataset, max_length: int | None) -> bool:
    """Whether `dataset` is ready to train as it is: tokenised with labels (TRL's preparation, or `data_checks`),
    every row within `max_length`. None (no dataset) counts as prepared."""
    if dataset is None:
        return True
    if not isinstance(dataset, Dataset) or not {"input_ids", "labels"} <= set(dataset.column_names):
        return False
    if max_length is None or len(dataset) == 0:
        return True
    lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"])
    return pc.max(lengths).as_py() <= max_length


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


class TruncatingSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer`, but `padding_free=True` keeps `max_length`.

    TRL truncates every example to `max_length` while preparing the dataset (and drops those left without a trainable
    token), yet refuses `padding_free` with a `max_length` and no packing, since its collator does not truncate. Here
    `max_length` is hidden from that one check, so preparation truncates exactly as on the padded path (same
    `truncation_mode`, same examples dropped) and the collator only flattens. The attention implementation is checked
    too (see `check_attention`). Datasets passed already prepared (`input_ids` and `labels`, within `max_length`:
    what `data_checks` returns) are not prepared again. Otherwise this is `SFTTrainer` unchanged.
    """

    def __init__(self, model, args=None, **kwargs):
        if args is not None and args.padding_free and hasattr(model, "config"):  # before Trainer creates output_dir
            check_attention(model.config._attn_implementation)
        # Settings TRL must not see while it sets up; the caller's arguments get them back right after
        overrides = {}
        if args is not None and args.padding_free and not args.packing:  # truncated in `_prepare_dataset` instead
            overrides["max_length"] = None
        if args is not None and all(
            is_prepared(kwargs.get(name), args.max_length) for name in ("train_dataset", "eval_dataset")
        ):  # datasets the recipe already prepared (`data_checks`) are not tokenised again
            overrides["dataset_kwargs"] = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        # `load_tokenizer` already read a `chat_template_path` .jinja into the tokenizer, and marked it for
        # `assistant_only_loss`: TRL would read the file again over the marked copy (a model id is TRL's to clone)
        template_path = getattr(args, "chat_template_path", None) if kwargs.get("processing_class") else None
        if template_path is not None and template_path.endswith(".jinja"):
            overrides["chat_template_path"] = None
        self._preparation_max_length = args.max_length if "max_length" in overrides else None
        saved = {name: getattr(args, name) for name in overrides}
        try:
            for name, value in overrides.items():
                setattr(args, name, value)
            super().__init__(model, args=args, **kwargs)
        finally:
            for name, value in saved.items():
                setattr(args, name, value)
        if "dataset_kwargs" in overrides:  # a dataset handed to `evaluate` later is prepared as usual
            self._skip_prepare_dataset = bool((saved["dataset_kwargs"] or {}).get("skip_prepare_dataset"))
        if self.padding_free:  # a model TRL loaded from its name, or BFD packing (padding-free too)
            check_attention(self.accelerator.unwrap_model(self.model).config._attn_implementation)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # getattr: `data_checks.prepare_like_trl` prepares through an instance whose __init__ never ran
        hidden = getattr(self, "_preparation_max_length", None)
        if hidden is not None and args.max_length is None:
            args = copy.copy(args)  # the caller's arguments keep max_length=None until __init__ restores it
            args.max_length = hidden
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
