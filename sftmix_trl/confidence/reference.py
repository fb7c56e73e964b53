"""The reference of SFTMix stage 1 (`Reference`): train a LoRA reference with NTP, snapshot its adapter C times, score
every example at each snapshot, write the table; or read back a finished table that fits. Every step resumes from the
files it finds. The data report scores through the same reference (`Reference.scoring_model`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import TrainerCallback

from sftmix_trl import __version__
from sftmix_trl.atomic import atomic_write
from sftmix_trl.confidence.config import ConfidenceConfig
from sftmix_trl.confidence.plots import plot_confidence
from sftmix_trl.confidence.report import REPORT_TABLE
from sftmix_trl.confidence.snapshots import load_snapshot
from sftmix_trl.confidence.table import (
    DATA_KEYS,
    METADATA_DEFAULTS,
    PLOT_FILE,
    SETTINGS_FILE,
    TABLE_FILE,
    ConfidenceError,
    ConfidenceTable,
    check_metadata,
    expected_metadata,
    scores_all_turns,
)
from sftmix_trl.configs import SFTConfig
from sftmix_trl.data.load import EXAMPLE_ID
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.perplexity import score_perplexities
from sftmix_trl.sft_trainer import TruncatingSFTTrainer
from sftmix_trl.sharded import load_adapter_state, save_adapter, scoring_module

logger = logging.getLogger(__name__)


def snapshot_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """C evenly spaced optimizer steps, the last at the end of the run."""
    if total_steps < num_checkpoints:
        raise ConfidenceError(
            f"the reference run has {total_steps} optimizer steps, fewer than num_confidence_checkpoints="
            f"{num_checkpoints}; lower the reference batch size or the number of checkpoints"
        )
    return [math.ceil(c * total_steps / num_checkpoints) for c in range(1, num_checkpoints + 1)]


class _SnapshotCallback(TrainerCallback):
    """Saves the reference adapter (weights only) at the snapshot steps: gathered from every process through the
    trainer's wrapped model (FSDP and ZeRO-3 hold only shards), written by the main process."""

    def __init__(self, directory: Path, num_checkpoints: int):
        self.directory, self.num_checkpoints, self.steps = directory, num_checkpoints, []
        self.trainer = None  # set once the trainer exists

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = snapshot_steps(state.max_steps, self.num_checkpoints)
        if state.is_world_process_zero:
            atomic_write(self.directory / "steps.json", json.dumps(self.steps))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in self.steps:
            return
        target = self.directory / f"step-{state.global_step}"
        staging = target.with_name(target.name + ".tmp")
        if state.is_world_process_zero:
            shutil.rmtree(staging, ignore_errors=True)
        save_adapter(self.trainer.model_wrapped, staging, state.is_world_process_zero)  # on every process
        if state.is_world_process_zero:
            load_snapshot(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)


def _scoring_model(trainer):
    """The model to score through: the trainer's wrapped model (FSDP and DeepSpeed gather the parameters in its
    forward), prepared here the way `Trainer.evaluate` does when no training ran in this process (all snapshots were
    found); without DDP, which only synchronises gradients."""
    model = trainer.model_wrapped
    if (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled) and not trainer.accelerator._models:
        if trainer.is_deepspeed_enabled and trainer.deepspeed is None:
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(trainer, num_training_steps=0, inference=True)
        model = trainer.accelerator.prepare(model)
        if trainer.is_fsdp_enabled:
            trainer.model = model
        trainer.model_wrapped = model
    return scoring_module(model)


def _reference_args(training_args, config: ConfidenceConfig, output_dir: Path):
    """The reference run's `SFTConfig`: the user's settings with the reference's own schedule and no checkpoints."""

    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(SFTConfig) if f.init}
    values.update(
        output_dir=str(output_dir / "reference"),
        num_train_epochs=config.reference_epochs,
        max_steps=-1,
        learning_rate=config.reference_learning_rate,
        per_device_train_batch_size=config.reference_batch_size,
        gradient_accumulation_steps=config.reference_gradient_accumulation_steps,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
        resume_from_checkpoint=None,
        run_name=f"{training_args.run_name or 'sftmix'}-reference",
    )
    return SFTConfig(**values)


def _versions() -> dict:
    import peft
    import transformers
    import trl

    return {
        "sftmix_trl": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }


class Reference:
    """Stage 1's reference as this process holds it: its tokenizer and what a table of it depends on (`expected`) at
    once; its trainer (TRL's SFTTrainer with the LoRA reference) built on first use and kept. The reference run trains
    through that trainer, and every scoring pass of the stage (snapshots, the data report's prompt fit) goes through
    `scoring_model()`, which under FSDP and DeepSpeed is the trainer's wrapper that gathers the parameters.

    Arguments as `compute_confidence`'s (`sftmix_trl.confidence.stage1`), `directory` being its `confidence_dir`.
    """

    def __init__(
        self,
        train_dataset: Dataset,
        model_args,
        training_args,
        config: ConfidenceConfig,
        directory: str | os.PathLike,
        prepared: Dataset | None = None,
    ):
        self.train_dataset, self.training_args, self.config = train_dataset, training_args, config
        self.directory, self._given_prepared = Path(directory), prepared
        self.model_args = dataclasses.replace(
            model_args, model_name_or_path=config.reference_model_name_or_path or model_args.model_name_or_path
        )
        self.tokenizer = load_tokenizer(
            self.model_args,
            training_args.trust_remote_code,
            training_args.chat_template_path,
            assistant_only_loss=scores_all_turns(train_dataset, training_args),
        )
        self.expected = expected_metadata(train_dataset, model_args, training_args, config, self.tokenizer)
        self._trainer, self._snapshots = None, None

    @property
    def trainer(self) -> TruncatingSFTTrainer:
        """The reference's trainer, built (the model loaded) on first use: a finished table with its report needs
        none."""
        if self._trainer is None:
            self._trainer, self._snapshots = _reference_trainer(
                self.train_dataset,
                self._given_prepared,
                self.model_args,
                self.training_args,
                self.config,
                self.tokenizer,
                self.directory,
            )
        return self._trainer

    @property
    def prepared(self) -> Dataset:
        """The training data as the reference's trainer holds it: tokenised, each row keeping a response token."""
        return self.trainer.train_dataset

    def scoring_model(self):
        """The model to score the reference through (see `_scoring_model`)."""
        return _scoring_model(self.trainer)

    def finished_table(self, must_exist: bool = False) -> ConfidenceTable:
        """The finished table in the folder, refused unless it fits: a table named explicitly (`must_exist`) only has
        to fit the data, the run's own folder everything. Cut at this run's `confident_fraction`."""
        if not (self.directory / TABLE_FILE).is_file():
            raise ConfidenceError(f"no confidence table in {self.directory} (expected {self.directory / TABLE_FILE})")
        return _reuse_table(self.directory, self.expected, self.config, must_exist)

    def compute_table(self) -> ConfidenceTable:
        """The reference run, resumed from what the folder holds: train (unless every snapshot is on disk), score
        each snapshot not scored yet, write the table, its metadata and its picture."""
        _claim(self.directory, self.expected)
        steps, times = _train_reference(self.trainer, self._snapshots, self.directory)
        columns, scoring = _score_snapshots(
            self.scoring_model(), self.prepared, steps, self.config, self.tokenizer, self.directory
        )
        table = _build_table(self.train_dataset, self.prepared, columns, self.config, self.training_args)
        table.metadata.update(run=self.expected, snapshot_steps=steps, scoring=scoring, **times)
        _write_table(table, self.directory)
        return table

    def release(self) -> None:
        """Let the trainer and its model go (the snapshot callback holds the trainer too)."""
        if self._snapshots is not None:
            self._snapshots.trainer = None
        self._trainer, self._snapshots = None, None


def _reuse_table(directory: Path, expected: dict, config: ConfidenceConfig, must_exist: bool) -> ConfidenceTable:
    """The finished table in `directory`, refused unless it fits; cut at this run's `confident_fraction`."""
    table = ConfidenceTable.load(directory)
    # A table named explicitly (must_exist) only has to fit the data; the run's own folder must fit everything
    found = {**METADATA_DEFAULTS, **table.metadata["run"]}
    check_metadata(expected, found, directory, DATA_KEYS if must_exist else None)
    if table.confident_fraction != config.confident_fraction:  # only the cut depends on it: this run's applies
        logger.info(
            "splitting the confidence table at this run's confident_fraction=%s (it was computed with %s)",
            config.confident_fraction,
            table.confident_fraction,
        )
        table.confident_fraction = config.confident_fraction
        confident, unconfident = table.split()
        table.metadata = {**table.metadata, "num_confident": len(confident), "num_unconfident": len(unconfident)}
    logger.info("reusing the confidence table in %s", directory)
    return table


def _claim(directory: Path, expected: dict) -> None:
    """Refuse a half-finished run of other settings in `directory`, then record this run's (`run.json`). A data
    report found there belongs to no finished table: it goes, and the new table gets its own."""
    if (directory / SETTINGS_FILE).is_file():
        check_metadata(
            expected, {**METADATA_DEFAULTS, **json.loads((directory / SETTINGS_FILE).read_text())}, directory
        )
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write(directory / SETTINGS_FILE, json.dumps(expected, indent=2, default=str))
        (directory / REPORT_TABLE).unlink(missing_ok=True)


def _reference_trainer(train_dataset, prepared, reference_args, training_args, config, tokenizer, directory: Path):
    """The reference's trainer (TRL's SFTTrainer; with padding_free, truncated to max_length as the padded path is)
    and its snapshot callback."""

    snapshots = _SnapshotCallback(directory / "snapshots", config.num_confidence_checkpoints)
    reference_training_args = _reference_args(training_args, config, directory)
    reference_training_args.assistant_only_loss = scores_all_turns(train_dataset, training_args)
    trainer = TruncatingSFTTrainer(
        model=load_model(reference_args, training_args.trust_remote_code),
        args=reference_training_args,
        train_dataset=train_dataset if prepared is None else prepared,
        processing_class=tokenizer,
        peft_config=lora_config(reference_args),
        callbacks=[snapshots],
    )
    snapshots.trainer = trainer
    if len(trainer.train_dataset) < 2:
        raise ConfidenceError(
            f"{len(trainer.train_dataset)} of {len(train_dataset)} training examples keep a response token within "
            f"max_length={training_args.max_length}; the confidence split needs at least 2: raise `max_length`"
        )
    return trainer, snapshots


def _train_reference(trainer, snapshots: _SnapshotCallback, directory: Path) -> tuple[list[int], dict]:
    """Train the reference unless every snapshot of a finished run is on disk; its snapshot steps and timing."""
    steps_file = directory / "snapshots" / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else []
    times = {}
    if not steps or not all((directory / "snapshots" / f"step-{s}").is_dir() for s in steps):
        start = time.perf_counter()
        trainer.train()  # a reference run cut short is redone whole: its snapshots must come from one run
        times["reference_training_seconds"] = time.perf_counter() - start
        steps = snapshots.steps
    PartialState().wait_for_everyone()
    return steps, times


def _score_snapshots(
    model, prepared: Dataset, steps: list[int], config: ConfidenceConfig, tokenizer, directory: Path
) -> tuple[list[np.ndarray], list[dict]]:
    """(N,) perplexities per snapshot, each read back when a finished pass left them on disk, and the passes' stats."""
    state = PartialState()
    columns, scoring = [], []
    for c, step in enumerate(steps, start=1):
        scores_path = directory / "scores" / f"step-{step}.parquet"
        if scores_path.is_file():
            logger.info("snapshot %d/%d (step %d): scores found, skipped", c, len(steps), step)
            columns.append(np.asarray(pq.read_table(scores_path)["perplexity"].to_numpy(), dtype=np.float64))
            continue
        weights = load_snapshot(directory / "snapshots" / f"step-{step}")
        try:
            load_adapter_state(model, weights)  # on every process: a collective under FSDP and ZeRO-3
        except ValueError as error:
            raise ConfidenceError(f"snapshot step {step} in {directory}: {error}; delete that folder") from None
        ppl, counts, stats = score_perplexities(
            model, prepared, config.scoring_batch_size, tokenizer.pad_token_id, f"scoring snapshot {c}/{len(steps)}"
        )
        bad = ~np.isfinite(ppl)
        if bad.any():
            ids = [prepared[int(i)][EXAMPLE_ID] for i in np.flatnonzero(bad)[:5]]
            raise ConfidenceError(f"non-finite perplexity at snapshot step {step} for examples {ids}; not written")
        scoring.append(
            {
                "step": step,
                "seconds": stats.seconds,
                "tokens": stats.tokens,
                "tokens_per_second": stats.tokens_per_second,
                "padding_fraction": stats.padding_fraction,
            }
        )
        if state.is_main_process:
            atomic_write(
                scores_path, pa.table({EXAMPLE_ID: prepared[EXAMPLE_ID], "perplexity": ppl, "tokens": counts})
            )
        state.wait_for_everyone()
        columns.append(ppl)
    return columns, scoring


def _build_table(
    train_dataset: Dataset, prepared: Dataset, columns: list[np.ndarray], config: ConfidenceConfig, training_args
) -> ConfidenceTable:
    """The table of the scored examples; those truncation left without a response token are listed as excluded."""
    num_tokens = np.array([sum(1 for t in lab[1:] if t != -100) for lab in prepared["labels"]])
    excluded = sorted(set(train_dataset[EXAMPLE_ID]) - set(prepared[EXAMPLE_ID]))
    if excluded:
        logger.warning(
            "%d examples have no response token after truncation to max_length=%s and get no score",
            len(excluded),
            training_args.max_length,
        )
    table = ConfidenceTable(
        example_ids=list(prepared[EXAMPLE_ID]),
        perplexities=np.stack(columns, axis=1),
        num_response_tokens=num_tokens,
        confident_fraction=config.confident_fraction,
    )
    confident, unconfident = table.split()
    table.metadata = {
        "config": dataclasses.asdict(config),
        "num_scored": len(table.example_ids),
        "num_excluded": len(excluded),
        "excluded_example_ids": excluded,
        "num_confident": len(confident),
        "num_unconfident": len(unconfident),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }
    return table


def _write_table(table: ConfidenceTable, directory: Path) -> None:
    """The table, its metadata and its picture, written by the main process; every process waits for them."""

    state = PartialState()
    if state.is_main_process:
        table.save(directory)
        plot_confidence(table, directory / PLOT_FILE)
        logger.info(
            "confidence table written to %s: %d confident, %d unconfident, %d excluded",
            directory,
            table.metadata["num_confident"],
            table.metadata["num_unconfident"],
            table.metadata["num_excluded"],
        )
    state.wait_for_everyone()
