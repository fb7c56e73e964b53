"""TRL's `SFTTrainer` as both stages train through it.

- `check_attention` / `trainable_attention`: padding-free rows (TRL's collator lays a micro-batch's examples end to
  end in one row and restarts `position_ids` at each) need an attention that keeps the examples apart:
  flash-attention through `cu_seq_lens` (its varlen kernel: cost sum of L^2, no mask), flex attention through a block
  mask built from `position_ids`, and sdpa/eager through the dense block-diagonal causal mask transformers builds from
  `position_ids` when there is no attention mask ((sum of L)^2 booleans).
- `TruncatingSFTTrainer`: `SFTTrainer` that keeps `max_length` under `padding_free` and does not prepare a dataset
  twice (the stage-1 reference trains through it).
- `NTPTrainer`: resumes from a checkpoint with the numerics it started with and saves its adapter, final and in every
  checkpoint, under any engine. `recipes/sft.py` trains through it directly and `SFTMixTrainer` as its subclass, so a
  resumed run is the same computation as an uninterrupted one in both.
"""

from __future__ import annotations

import copy
import logging
import os

import pyarrow.compute as pc
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers.utils.generic import is_flash_attention_requested
from trl import SFTTrainer

from sftmix_trl.errors import SFTMixError
from sftmix_trl.sharded import load_adapter_state, save_adapter

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


def is_prepared(dataset, max_length: int | None) -> bool:
    """Whether `dataset` is ready to train as it is: tokenised with labels (TRL's preparation, or `data.checks`),
    every row within `max_length`. None (no dataset) counts as prepared."""
    if dataset is None:
        return True
    if not isinstance(dataset, Dataset) or not {"input_ids", "labels"} <= set(dataset.column_names):
        return False
    if max_length is None or len(dataset) == 0:
        return True
    lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"])
    return pc.max(lengths).as_py() <= max_length


class TruncatingSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer`, but `padding_free=True` keeps `max_length`.

    TRL truncates every example to `max_length` while preparing the dataset (and drops those left without a trainable
    token), yet refuses `padding_free` with a `max_length` and no packing, since its collator does not truncate. Here
    `max_length` is hidden from that one check, so preparation truncates exactly as on the padded path (same
    `truncation_mode`, same examples dropped) and the collator only flattens. The attention implementation is checked
    too (see `check_attention`). Datasets passed already prepared (`input_ids` and `labels`, within `max_length`:
    what `data.checks` returns) are not prepared again. Otherwise this is `SFTTrainer` unchanged.
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
        ):  # datasets the recipe already prepared (`data.checks`) are not tokenised again
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
        # getattr: `data.checks.prepare_like_trl` prepares through an instance whose __init__ never ran
        hidden = getattr(self, "_preparation_max_length", None)
        if hidden is not None and args.max_length is None:
            args = copy.copy(args)  # the caller's arguments keep max_length=None until __init__ restores it
            args.max_length = hidden
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)


class NTPTrainer(TruncatingSFTTrainer):
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP and DeepSpeed, the adapter alone, gathered to the main process's CPU and written in PEFT's
        format: transformers' own save writes nothing under FSDP's SHARDED_STATE_DICT (the shipped
        `fsdp_qlora.yaml`), gathers the whole base under FULL_STATE_DICT, and under ZeRO-3 writes no adapter unless
        16-bit gathering on save is on. Other engines keep transformers' save (the same files).

        A checkpoint (`_internal_call`: transformers' `_save_checkpoint` calls this first, before the optimizer,
        the trainer state, a `hub_strategy` push and the rotation of old checkpoints) keeps transformers' files,
        which resuming reads, and gets the adapter and the tokenizer beside them, as on one process: every
        checkpoint can be evaluated, merged or pushed like the final adapter."""
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            super().save_model(output_dir, _internal_call)
            return
        output_dir = output_dir or self.args.output_dir
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
        save_adapter(self.model_wrapped, output_dir, self.is_world_process_zero())  # a collective: every process
        if _internal_call:
            if self.args.should_save and self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        elif self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
        adapter_file = os.path.join(resume_from_checkpoint, "adapter_model.safetensors")
        fsdp1 = self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1
        if fsdp1 and not os.path.isfile(adapter_file):
            raise SFTMixError(
                f"{resume_from_checkpoint} holds no adapter_model.safetensors: under FSDP1 transformers' sharded "
                "files hold no adapter, so the run would resume from its initial adapter. Resume from a checkpoint "
                "that has one (this package writes it into every checkpoint), or start the run again"
            )
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.is_fsdp_enabled and os.path.isfile(adapter_file):
            # transformers' FSDP files hold no adapter under FSDP1 (accelerate picks the adapter's entries by module
            # names, which FSDP1's wrappers change: it writes 0 tensors), so the run would resume from its initial
            # adapter; the checkpoint's own adapter (`save_model`) is loaded into the shards, under FSDP2 too (the
            # same values). A collective: every process resumes here
            load_adapter_state(model if model is not None else self.model, load_file(adapter_file))
        # PEFT's `load_adapter` rebuilds the adapter in float32, while TRL trains a 4-bit base's adapter in bf16: put
        # back the dtype the run started with, or the resumed run continues with other numerics than the original
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
