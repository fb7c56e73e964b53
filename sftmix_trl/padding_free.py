"""Padding-free batches: one row per micro-batch, the examples laid end to end, no padding.

TRL's collator (`padding_free=True`) concatenates the examples of a micro-batch into a single row, restarts
`position_ids` at 0 for each example and passes no `attention_mask`. The attention keeps the examples apart from the
sequence boundaries: flash-attention through `cu_seq_lens`, and sdpa/eager/flex through the block-diagonal causal
mask transformers builds from `position_ids` when there is no attention mask and no cache.

Here:
- `check_attention`: refuse an attention implementation that would let packed examples see each other;
- `sequence_lengths` and `unflatten`: recover the examples of a flattened row as right-padded rows (pure functions;
  the Mixup term and its counts then run unchanged);
- `TruncatingSFTTrainer`: TRL's `SFTTrainer` that keeps `max_length` under `padding_free`.
"""

from __future__ import annotations

import copy

import torch
from trl import SFTTrainer

# Implementations that separate packed sequences: the masked ones build transformers' packed-sequence mask from
# `position_ids`, the flash ones run their varlen kernels on `cu_seq_lens`
SEPARATING_ATTENTION = (
    "sdpa",
    "eager",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
)


class PaddingFreeError(ValueError):
    """A setting that padding-free batches cannot honour."""


def check_attention(attn_implementation: str | None) -> None:
    """Refuse an attention implementation that cannot keep the examples of a padding-free row apart.

    `None` is transformers' default choice (sdpa, or eager for a model without sdpa), which can.
    """
    if attn_implementation is not None and attn_implementation not in SEPARATING_ATTENTION:
        raise PaddingFreeError(
            f"padding_free needs an attention that keeps packed examples apart; attn_implementation="
            f"{attn_implementation!r} does not: set `attn_implementation: sdpa` (or flash_attention_2 on a GPU), or "
            "`padding_free: false`"
        )


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


class TruncatingSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer`, but `padding_free=True` keeps `max_length`.

    TRL truncates every example to `max_length` while preparing the dataset (and drops those left without a trainable
    token), yet refuses `padding_free` with a `max_length` and no packing, since its collator does not truncate. Here
    `max_length` is hidden from that one check, so preparation truncates exactly as on the padded path (same
    `truncation_mode`, same examples dropped) and the collator only flattens. Without `padding_free` this is
    `SFTTrainer` unchanged. The attention implementation is checked too (see `check_attention`).
    """

    def __init__(self, model, args=None, **kwargs):
        if args is not None and args.padding_free and hasattr(model, "config"):  # before Trainer creates output_dir
            check_attention(model.config._attn_implementation)
        hide = args is not None and args.padding_free and not args.packing
        self._preparation_max_length = args.max_length if hide else None
        if self._preparation_max_length is not None:
            args.max_length = None
        # `load_tokenizer` already read a `chat_template_path` .jinja into the tokenizer, and marked it for
        # `assistant_only_loss`: TRL would read the file again over the marked copy
        template_path = getattr(args, "chat_template_path", None) if kwargs.get("processing_class") else None
        if template_path is not None and not template_path.endswith(".jinja"):
            template_path = None  # a model id: TRL clones that model's template and tokens
        if template_path is not None:
            args.chat_template_path = None
        try:
            super().__init__(model, args=args, **kwargs)
        finally:
            if self._preparation_max_length is not None:
                args.max_length = self._preparation_max_length
            if template_path is not None:
                args.chat_template_path = template_path
        if self.padding_free:  # a model TRL loaded from its name, or BFD packing (padding-free too)
            check_attention(self.accelerator.unwrap_model(self.model).config._attn_implementation)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # getattr: `data_checks.prepare_like_trl` prepares through an instance whose __init__ never ran
        hidden = getattr(self, "_preparation_max_length", None)
        if hidden is not None and args.max_length is None:
            args = copy.copy(args)  # the caller's arguments keep max_length=None until __init__ restores it
            args.max_length = hidden
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
