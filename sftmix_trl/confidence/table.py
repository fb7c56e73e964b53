"""The confidence table: per-example perplexities at each snapshot, the confident/unconfident split, and the
metadata that says which data and settings a table belongs to (a table that does not fit is refused, never reused)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from sftmix_trl.atomic import atomic_write
from sftmix_trl.confidence.config import ConfidenceConfig
from sftmix_trl.data.load import EXAMPLE_ID, has_multi_turn
from sftmix_trl.errors import DataError, SFTMixError

CONFIDENT, UNCONFIDENT = "confident", "unconfident"
# SETTINGS_FILE: the settings a stage-1 folder was claimed for (the run's own record is `runs.RUN_FILE`, sftmix_run.json)
TABLE_FILE, METADATA_FILE, SETTINGS_FILE, PLOT_FILE = (
    "confidence.parquet",
    "metadata.json",
    "run.json",
    "confidence.png",
)


class ConfidenceError(SFTMixError):
    """A confidence table is missing, broken, or belongs to another dataset or setting."""


@dataclass
class ConfidenceTable:
    example_ids: list[str]
    perplexities: np.ndarray  # (N, C) float64, one column per snapshot
    num_response_tokens: np.ndarray  # (N,)
    confident_fraction: float = 0.5
    metadata: dict = field(default_factory=dict)
    # The data report beside the table (`confidence.report`: one row per scored example), None when there is none;
    # stored in its own file, never in the table's
    report: pa.Table | None = field(default=None, repr=False, compare=False)

    @property
    def confidence(self) -> np.ndarray:
        return -self.perplexities.mean(axis=1)

    @property
    def subsets(self) -> list[str]:
        confident = set(split_confidence(self.example_ids, self.confidence, self.confident_fraction)[0])
        return [CONFIDENT if i in confident else UNCONFIDENT for i in self.example_ids]

    def split(self) -> tuple[list[str], list[str]]:
        """(confident ids, unconfident ids)."""
        return split_confidence(self.example_ids, self.confidence, self.confident_fraction)

    def to_arrow(self) -> pa.Table:
        columns = {EXAMPLE_ID: self.example_ids}
        for c in range(self.perplexities.shape[1]):
            columns[f"ppl_{c + 1}"] = self.perplexities[:, c]
        columns.update(confidence=self.confidence, subset=self.subsets, num_response_tokens=self.num_response_tokens)
        return pa.table(columns)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        atomic_write(directory / METADATA_FILE, json.dumps(self.metadata, indent=2, default=str))
        atomic_write(directory / TABLE_FILE, self.to_arrow())  # last: a table file means a finished, described table

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ConfidenceTable:
        directory = Path(directory)
        table_path, meta_path = directory / TABLE_FILE, directory / METADATA_FILE
        if not table_path.is_file() or not meta_path.is_file():
            raise ConfidenceError(f"no confidence table in {directory} (expected {TABLE_FILE} and {METADATA_FILE})")
        metadata = json.loads(meta_path.read_text())
        data = pq.read_table(table_path).to_pydict()
        ppl_columns = sorted((k for k in data if k.startswith("ppl_")), key=lambda k: int(k[4:]))
        perplexities = np.stack([np.asarray(data[k], dtype=np.float64) for k in ppl_columns], axis=1)
        if not np.isfinite(perplexities).all():
            raise ConfidenceError(f"{table_path} holds non-finite perplexities; delete {directory} and recompute")
        return cls(
            example_ids=list(data[EXAMPLE_ID]),
            perplexities=perplexities,
            num_response_tokens=np.asarray(data["num_response_tokens"]),
            confident_fraction=metadata["config"]["confident_fraction"],
            metadata=metadata,
        )


def split_confidence(
    example_ids: list[str], confidence: np.ndarray, confident_fraction: float = 0.5
) -> tuple[list[str], list[str]]:
    """Split at the `confident_fraction` quantile: the floor(fraction x N) most confident examples are confident.

    Ties are broken by example id (ascending), so the split is the same on every machine and run.
    """
    if not 0 < confident_fraction < 1:
        raise ConfidenceError(f"`confident_fraction` must be in (0, 1), got {confident_fraction}")
    n = len(example_ids)
    if n < 2:
        raise ConfidenceError(f"a confidence split needs at least 2 examples, got {n}")
    order = sorted(range(n), key=lambda i: (-float(confidence[i]), example_ids[i]))
    num_confident = min(max(int(confident_fraction * n), 1), n - 1)
    return [example_ids[i] for i in order[:num_confident]], [example_ids[i] for i in order[num_confident:]]


def reference_steps(num_examples: int, training_args, config: ConfidenceConfig) -> int:
    """Optimizer steps of the stage-1 reference run, as transformers' Trainer counts them (one epoch = the batches
    of one process, each process holding ceil(batches / processes))."""
    batches = math.ceil(num_examples / config.reference_batch_size)
    per_process = math.ceil(batches / training_args.world_size)
    accumulation = config.reference_gradient_accumulation_steps
    per_epoch = max(per_process // accumulation + int(per_process % accumulation > 0), 1)
    return math.ceil(config.reference_epochs * per_epoch)


def check_counts(
    num_reference: int,
    num_train: int | None,
    training_args,
    config: ConfidenceConfig,
    table_dir: str | os.PathLike | None,
    table_given: bool = False,
) -> None:
    """Before any write, one `DataError` line when the prepared data is too small for SFTMix: the reference run
    (`num_reference` prepared examples) needs at least `num_confidence_checkpoints` optimizer steps, unless a finished
    table already lies in `table_dir` or the run only reads one (`table_given`); with `num_train` (stage 2's prepared
    examples), each half of the split needs the `pairs_per_device` pairs of a micro-batch."""
    has_table = table_given or (table_dir is not None and (Path(table_dir) / TABLE_FILE).is_file())
    steps = reference_steps(num_reference, training_args, config)
    if not has_table and steps < config.num_confidence_checkpoints:
        raise DataError(
            f"the confidence reference run has {steps} optimizer step(s) on {num_reference} examples, fewer than "
            f"num_confidence_checkpoints={config.num_confidence_checkpoints}; add data, or lower "
            "`reference_batch_size` or `num_confidence_checkpoints`"
        )
    if num_train is None:
        return
    ids = [str(i) for i in range(num_train)]  # the split's sizes depend only on the count
    confident, unconfident = split_confidence(ids, [0.0] * num_train, config.confident_fraction)
    if min(len(confident), len(unconfident)) < training_args.pairs_per_device:
        raise DataError(
            f"the confidence split of {num_train} trainable examples gives {len(confident)} confident and "
            f"{len(unconfident)} unconfident, fewer than the {training_args.pairs_per_device} pairs of a micro-batch; "
            "lower `per_device_train_batch_size` or add data"
        )


def dataset_fingerprint(example_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(example_ids)).encode()).hexdigest()[:24]


# What makes a table apply to a training run at all (the data, and which tokens are scored: the labelling settings
# and the assistant turns); the reference settings only matter when recomputing
LABEL_KEYS = ("truncation_mode", "completion_only_loss", "assistant_only_loss")
DATA_KEYS = (
    "dataset_fingerprint",
    "num_examples",
    "tokenizer",
    "chat_template_sha256",
    "max_length",
    "scored_turns",
    *LABEL_KEYS,
)
# Tables written before multi-turn conversations trained every assistant turn scored each example's last turn
METADATA_DEFAULTS = {"scored_turns": "last"}
# The data report's settings: a table is the same whatever they are (a missing report is written on reuse)
REPORT_FIELDS = ("data_report", "prompt_fit_model", "report_top_k", "exclude_suspicious_fraction")


def check_metadata(expected: dict, found: dict, where: str | os.PathLike, keys: tuple[str, ...] | None = None) -> None:
    """Refuse a table (or a half-finished run) computed from other data or settings; say what differs."""
    keys = sorted(set(expected) | set(found)) if keys is None else keys
    unrecorded = [k for k in LABEL_KEYS if k in keys and k in expected and k not in found]
    if unrecorded:  # a table from before these settings were recorded: which tokens it scored is unknown
        raise ConfidenceError(
            f"the confidence table in {where} does not record {', '.join(unrecorded)} (an older sftmix-trl wrote "
            "it): delete that folder to recompute it, or set `confidence_dir` to another folder."
        )
    diffs = [
        f"{k}: expected {expected.get(k)!r}, found {found.get(k)!r}" for k in keys if expected.get(k) != found.get(k)
    ]
    if diffs:
        raise ConfidenceError(
            f"the confidence table in {where} belongs to another dataset or setting ({'; '.join(diffs)}). "
            "Delete that folder to recompute it, or set `confidence_dir` to another folder."
        )


def scores_all_turns(train_dataset: Dataset, training_args) -> bool:
    """Whether the response tokens are every assistant turn (TRL's `assistant_only_loss`, on for multi-turn
    conversations) rather than each example's completion."""
    return bool(getattr(training_args, "assistant_only_loss", False)) or has_multi_turn(train_dataset)


def expected_metadata(train_dataset: Dataset, model_args, training_args, config: ConfidenceConfig, tokenizer) -> dict:
    """What a confidence table depends on. Anything here that differs makes a stored table inapplicable.

    `scored_turns` is "all" when the perplexity runs over every assistant turn of the conversations, "last" when it
    runs over each example's completion (its only or last assistant turn).
    """
    reference = config.reference_model_name_or_path or model_args.model_name_or_path
    # The template's content as rendered (a `chat_template_path` file edited in place must not reuse the table)
    chat_template = tokenizer.chat_template or ""
    chat_template = json.dumps(chat_template, sort_keys=True) if isinstance(chat_template, dict) else chat_template
    return {
        "dataset_fingerprint": dataset_fingerprint(list(train_dataset[EXAMPLE_ID])),
        "num_examples": len(train_dataset),
        "model": model_args.model_name_or_path,
        "reference_model": reference,
        "tokenizer": f"{tokenizer.name_or_path} (vocab {len(tokenizer)})",
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest()[:16],
        "max_length": training_args.max_length,
        "scored_turns": "all" if scores_all_turns(train_dataset, training_args) else "last",
        **{k: getattr(training_args, k, None) for k in LABEL_KEYS},
        "load_in_4bit": model_args.load_in_4bit,
        "lora": f"r={model_args.lora_r} alpha={model_args.lora_alpha} targets={model_args.lora_target_modules}",
        "seed": training_args.seed,
        "config": {
            k: v
            for k, v in dataclasses.asdict(config).items()
            if k not in ("confidence_dir", "scoring_batch_size", *REPORT_FIELDS)
        },
    }
