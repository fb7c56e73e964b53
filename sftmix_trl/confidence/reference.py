"""The reference run of SFTMix stage 1 and its orchestration: train a LoRA reference with NTP, snapshot its adapter
C times, score every example at each snapshot, write the table. Every step resumes from the files it finds."""

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
from sftmix_trl.confidence.report import report_pending, run_data_report
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


def compute_confidence(
    train_dataset: Dataset,
    model_args,
    training_args,
    config: ConfidenceConfig,
    confidence_dir: str | os.PathLike,
    must_exist: bool = False,
    prepared: Dataset | None = None,
) -> ConfidenceTable:
    """Run (or resume, or reuse) the reference pass and return the confidence table.

    Args:
        train_dataset: normalised training data with an `example_id` column (`sftmix_trl.data.load.load_datasets`).
        model_args: `ModelArguments` of the model being trained; the reference uses its base unless
            `config.reference_model_name_or_path` names another.
        training_args: the run's `SFTConfig`/`SFTMixConfig` (precision, max length, seed, logging are shared).
        config: the reference pass settings.
        confidence_dir: folder of the artifact (see the package docstring).
        must_exist: only load (and check) a finished table; never train a reference.
        prepared: `train_dataset` already prepared for the reference's tokenizer (`data.prepare.prepare_run_data`'s
            `reference_train`), so that it is not tokenised again; None: the reference's trainer prepares it.
    """

    directory = Path(confidence_dir)
    if len(train_dataset) < 2:
        raise ConfidenceError(f"the confidence split needs at least 2 training examples, got {len(train_dataset)}")
    reference_args = dataclasses.replace(
        model_args, model_name_or_path=config.reference_model_name_or_path or model_args.model_name_or_path
    )
    all_turns = scores_all_turns(train_dataset, training_args)
    tokenizer = load_tokenizer(
        reference_args,
        training_args.trust_remote_code,
        training_args.chat_template_path,
        assistant_only_loss=all_turns,
    )
    expected = expected_metadata(train_dataset, model_args, training_args, config, tokenizer)

    # 1. A finished table that fits is reused; `must_exist` never trains
    existing = None
    if (directory / TABLE_FILE).is_file():
        existing = _reuse_table(directory, expected, config, must_exist)
        if must_exist or not report_pending(directory, config):
            return existing
    elif must_exist:
        raise ConfidenceError(f"no confidence table in {directory} (expected {directory / TABLE_FILE})")
    _claim(directory, expected)
    # 2. The reference run, unless all its snapshots are on disk already
    trainer, snapshots = _reference_trainer(
        train_dataset, prepared, reference_args, training_args, config, tokenizer, directory
    )
    if existing is not None:  # a finished table without its data report (`sftmix-trl report`): only the report
        logger.info("writing the data report of the table in %s (no training, no snapshot scoring)", directory)
        run_data_report(
            _scoring_model(trainer), trainer.train_dataset, train_dataset, tokenizer, existing, config, directory
        )
        snapshots.trainer = None
        return existing
    steps, times = _train_reference(trainer, snapshots, directory)
    # 3. Every example scored at every snapshot (each snapshot's scores are kept as they complete)
    prepared = trainer.train_dataset
    columns, scoring = _score_snapshots(trainer, prepared, steps, config, tokenizer, directory)
    # 4. The table, its metadata and its picture
    table = _build_table(train_dataset, prepared, columns, config, training_args)
    table.metadata.update(run=expected, snapshot_steps=steps, scoring=scoring, **times)
    if config.data_report:  # 5. the data report, before the table, so that its metadata records the report's passes
        run_data_report(_scoring_model(trainer), prepared, train_dataset, tokenizer, table, config, directory)
    _write_table(table, directory)
    snapshots.trainer = None
    del trainer
    return table


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
    """Refuse a half-finished run of other settings in `directory`, then record this run's (`run.json`)."""
    if (directory / SETTINGS_FILE).is_file():
        check_metadata(
            expected, {**METADATA_DEFAULTS, **json.loads((directory / SETTINGS_FILE).read_text())}, directory
        )
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write(directory / SETTINGS_FILE, json.dumps(expected, indent=2, default=str))


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
    trainer, prepared: Dataset, steps: list[int], config: ConfidenceConfig, tokenizer, directory: Path
) -> tuple[list[np.ndarray], list[dict]]:
    """(N,) perplexities per snapshot, each read back when a finished pass left them on disk, and the passes' stats."""
    state = PartialState()
    model = _scoring_model(trainer)
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
