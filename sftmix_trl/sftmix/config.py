"""`SFTMixConfig`: TRL's `SFTConfig` plus the Mixup settings (stage 2) and the reference pass settings (stage 1)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from sftmix_trl.confidence import ConfidenceConfig
from sftmix_trl.configs import SFTConfig


def unsupported_parallelism(tp_size: int, cp_size: int, sp_size: int, n_gpu: int) -> str | None:
    """Why SFTMix cannot train with these sizes, or None. Tensor, context and sequence parallelism and DataParallel
    make transformers divide `num_items_in_batch` (the NTP normaliser) by the ranks or GPUs sharing a batch, while the
    Mixup term is normalised by the mixed positions of whole sequences: the two terms would be weighted wrongly."""
    shared = [
        f"{name} parallelism (size {size})"
        for name, size in (("tensor", tp_size), ("context", cp_size), ("sequence", sp_size))
        if size > 1
    ]
    if n_gpu > 1:
        shared.append(f"DataParallel over {n_gpu} GPUs of one process")
    if not shared:
        return None
    return (
        f"SFTMix does not support {', '.join(shared)}: launch one process per GPU with `accelerate launch` "
        "(DDP, FSDP or DeepSpeed ZeRO)"
    )


@dataclass
class SFTMixConfig(SFTConfig, ConfidenceConfig):
    """Configuration of `SFTMixTrainer`: TRL's `SFTConfig` (through `sftmix_trl.configs.SFTConfig`, whose precision
    follows the device), the stage-1 settings of [`ConfidenceConfig`] (so one YAML drives both stages) and the Mixup
    settings below. The loss is `L = L_ntp + mixup_weight * L_mix`.

    `per_device_train_batch_size` is 2K: K confident and K unconfident sequences, forming K pairs (unless
    `tokens_per_micro_batch` sets a token budget instead). `train_sampling_strategy: group_by_length` pairs examples of
    similar response lengths inside length-sorted mega-batches (more mixed positions per pair, less padding); `packing`
    and `shuffle_dataset` are refused, since they break the pairs.

    Parameters:
        > Parameters of the Mixup term (stage 2)

        mixup_alpha (`float`, *optional*, defaults to `0.5`):
            alpha of the Beta(alpha, alpha) distribution each lambda is drawn from.
        mixup_weight (`float`, *optional*, defaults to `0.2`):
            mu, the weight of the Mixup term added to the NTP loss; `0` gives plain NTP on the same batches.
        mixup_lambda_per (`Literal["pair", "batch"]`, *optional*, defaults to `"pair"`):
            Draw one lambda per pair, or one per micro-batch shared by its pairs.
        mixup_chunk_size (`int`, *optional*, defaults to `256`):
            Mixed positions whose float32 logits exist at once in the Mixup loss: the memory knob of the term.
        tokens_per_micro_batch (`int`, *optional*):
            Fill each micro-batch with whole pairs up to this many computed tokens instead of
            `per_device_train_batch_size / 2` pairs; a pair over the budget gets a micro-batch of its own. `None`:
            fixed-size micro-batches.

        > Parameters of the confidence table

        confidence_table (`str`, *optional*):
            Folder of an existing confidence table to train on; it must match the data and labelling settings.
            Default: `confidence_dir`, computed there first if missing.
        push_confidence_table (`bool`, *optional*, defaults to `False`):
            With `push_to_hub`, also upload the stage-1 table (`<output_dir>/confidence/confidence.parquet`) with the
            adapter.

        > Stage 1 (the reference pass and the data report)

        The fields of [`ConfidenceConfig`]: `confidence_dir`, `reference_model_name_or_path`, `reference_epochs`,
        `reference_learning_rate`, `reference_batch_size`, `reference_gradient_accumulation_steps`,
        `num_confidence_checkpoints`, `scoring_batch_size`, `confident_fraction`, `data_report`, `prompt_fit_model`,
        `report_top_k`, `exclude_suspicious_fraction`.
    """

    mixup_alpha: float = field(
        default=0.5, metadata={"help": "alpha of the Beta(alpha, alpha) distribution lambda is drawn from."}
    )
    mixup_weight: float = field(
        default=0.2, metadata={"help": "mu: weight of the Mixup term added to the NTP loss (0 gives plain NTP)."}
    )
    mixup_lambda_per: Literal["pair", "batch"] = field(
        default="pair",
        metadata={"help": "Draw one lambda per pair, or one per micro-batch shared by its pairs."},
    )
    mixup_chunk_size: int = field(
        default=256,
        metadata={"help": "Mixed positions whose float32 logits exist at once in the Mixup loss (memory knob)."},
    )
    tokens_per_micro_batch: int | None = field(
        default=None,
        metadata={
            "help": "Fill each micro-batch with whole pairs up to this many computed tokens (padded: rows x longest "
            "row; padding-free: the sum of the lengths) instead of per_device_train_batch_size / 2 pairs; a pair "
            "over the budget gets a micro-batch of its own. Combine with train_sampling_strategy: group_by_length "
            "so that neighbours in the packing are alike. P processes with gradient_accumulation_steps G train on "
            "the batches of one process with P x G. None: fixed-size micro-batches."
        },
    )
    confidence_table: str | None = field(
        default=None,
        metadata={
            "help": "Folder of an existing confidence table to train on (it must match the data and settings). "
            "Default: `confidence_dir`, computed there first if missing."
        },
    )

    push_confidence_table: bool = field(
        default=False,
        metadata={"help": "With `push_to_hub`, also upload the stage-1 table (confidence.parquet) with the adapter."},
    )

    def __post_init__(self):
        # SFTMix pairs whole examples in the sampler's order: packing cuts and merges them across rows, while
        # padding_free only lays a micro-batch's examples end to end (the trainer finds them again)
        if self.packing:
            raise ValueError(
                "SFTMix pairs whole examples: `packing` cuts and merges them; use `padding_free: true` instead"
            )
        if self.shuffle_dataset:
            raise ValueError("`shuffle_dataset` must stay off: the paired sampler orders the examples")
        if self.mixup_alpha <= 0:
            raise ValueError(f"`mixup_alpha` must be > 0, got {self.mixup_alpha}")
        if self.mixup_weight < 0:
            raise ValueError(f"`mixup_weight` must be >= 0, got {self.mixup_weight}")
        if self.per_device_train_batch_size < 2 or self.per_device_train_batch_size % 2:
            raise ValueError(
                "`per_device_train_batch_size` must be even (K confident + K unconfident examples), got "
                f"{self.per_device_train_batch_size}"
            )
        # `group_by_length` is honoured by the paired sampler (length-aware pairing); other samplers would break pairs
        if self.train_sampling_strategy not in ("random", "group_by_length"):
            raise ValueError(
                "SFTMix orders the examples with its paired sampler: `train_sampling_strategy` must be 'random' or "
                f"'group_by_length' (length-aware pairing), got '{self.train_sampling_strategy}'"
            )
        if self.tokens_per_micro_batch is not None and self.tokens_per_micro_batch < 1:
            raise ValueError(f"`tokens_per_micro_batch` must be >= 1, got {self.tokens_per_micro_batch}")
        if self.mixup_chunk_size < 1:
            raise ValueError(f"`mixup_chunk_size` must be >= 1, got {self.mixup_chunk_size}")
        self.validate_confidence()
        super().__post_init__()
        pc = self.parallelism_config  # else what an accelerate config puts in the environment
        sizes = [
            getattr(pc, f"{dim}_size", 1)
            if pc is not None
            else int(os.environ.get(f"PARALLELISM_CONFIG_{dim.upper()}_SIZE", 1))
            for dim in ("tp", "cp", "sp")
        ]
        problem = unsupported_parallelism(*sizes, self.n_gpu)  # before stage 1 runs; the trainer checks again
        if problem:
            raise ValueError(problem)
        if self.confidence_dir is None:
            self.confidence_dir = os.path.join(self.output_dir, "confidence")
        if self.push_confidence_table:  # the upload takes <output_dir>/confidence/confidence.parquet
            table_dir = os.path.abspath(os.path.expanduser(self.confidence_table or self.confidence_dir))
            if not self.push_to_hub:
                raise ValueError("`push_confidence_table` uploads the table with the adapter: set `push_to_hub: true`")
            if table_dir != os.path.abspath(os.path.join(os.path.expanduser(self.output_dir), "confidence")):
                raise ValueError(
                    f"`push_confidence_table` uploads <output_dir>/confidence/, but the table is in {table_dir}: "
                    "leave `confidence_dir` and `confidence_table` unset, or upload that folder yourself"
                )
        if self.confidence_table is not None and not os.path.isfile(
            os.path.join(os.path.expanduser(self.confidence_table), "confidence.parquet")
        ):
            raise ValueError(
                f"`confidence_table`: no confidence table in {self.confidence_table} (expected confidence.parquet there); "
                "leave it unset to compute one in `confidence_dir`"
            )

    @property
    def pairs_per_device(self) -> int:
        return self.per_device_train_batch_size // 2
