"""Stage 1's entry points: `compute_confidence`, the table (reused, or computed) and then its data report, and
`write_data_report`, the report of a finished table alone (`sftmix-trl report`). Both score through one
`Reference`; neither trains anything the files already hold."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
from accelerate import PartialState
from datasets import Dataset

from sftmix_trl.confidence.config import ConfidenceConfig
from sftmix_trl.confidence.reference import Reference
from sftmix_trl.confidence.report import REPORT_TABLE, find_report, run_data_report
from sftmix_trl.confidence.table import TABLE_FILE, ConfidenceError, ConfidenceTable

logger = logging.getLogger(__name__)


def compute_confidence(
    train_dataset: Dataset,
    model_args,
    training_args,
    config: ConfidenceConfig,
    confidence_dir: str | os.PathLike,
    must_exist: bool = False,
    prepared: Dataset | None = None,
) -> ConfidenceTable:
    """Stage 1: the confidence table, reused when a finished one fits, else computed (or resumed); then, with
    `config.data_report`, its data report when the folder has none. Returns the table; `table.report` is its report
    (None when there is none).

    Args:
        train_dataset: normalised training data with an `example_id` column (`sftmix_trl.data.load.load_datasets`).
        model_args: `ModelArguments` of the model being trained; the reference uses its base unless
            `config.reference_model_name_or_path` names another.
        training_args: the run's `SFTConfig`/`SFTMixConfig` (precision, max length, seed, logging are shared).
        config: the stage's settings.
        confidence_dir: folder of the artifact (see the package docstring).
        must_exist: only load (and check against the data) a finished table: never train, never write a report.
        prepared: `train_dataset` already prepared for the reference's tokenizer (`data.prepare.prepare_run_data`'s
            `reference_train`), so that it is not tokenised again; None: the reference's trainer prepares it.
    """
    if len(train_dataset) < 2:
        raise ConfidenceError(f"the confidence split needs at least 2 training examples, got {len(train_dataset)}")
    directory = Path(confidence_dir)
    reference = Reference(train_dataset, model_args, training_args, config, directory, prepared)
    try:
        if must_exist or (directory / TABLE_FILE).is_file():
            table = reference.finished_table(must_exist)
        else:
            table = reference.compute_table()
        report_missing = not (directory / REPORT_TABLE).is_file()
        PartialState().wait_for_everyone()  # every process has looked before the main one writes a report
        if config.data_report and not must_exist and report_missing:
            table.report = _report(reference, table, config)
        else:
            table.report = find_report(directory)
    finally:
        reference.release()
    return table


def write_data_report(
    train_dataset: Dataset,
    model_args,
    training_args,
    config: ConfidenceConfig,
    confidence_dir: str | os.PathLike,
    prepared: Dataset | None = None,
) -> pa.Table:
    """The data report of the finished table in `confidence_dir`, written (again) with `config`'s report settings,
    whatever `config.data_report` says. The table must fit this data and these settings, as a table stage 1 reuses
    does. Trains nothing and scores no snapshot; prompt-fit scores cached by an earlier report cost no forward pass, so
    a changed `report_top_k` or `exclude_suspicious_fraction` costs seconds. Arguments as `compute_confidence`'s."""
    directory = Path(confidence_dir)
    reference = Reference(train_dataset, model_args, training_args, config, directory, prepared)
    try:
        table = reference.finished_table()
        if PartialState().is_main_process:  # written again last: its presence then means this report is complete
            (directory / REPORT_TABLE).unlink(missing_ok=True)
        return _report(reference, table, config)
    finally:
        reference.release()


def _report(reference: Reference, table: ConfidenceTable, config: ConfidenceConfig) -> pa.Table:
    logger.info("writing the data report of the table in %s", reference.directory)
    return run_data_report(
        reference.scoring_model(),
        reference.prepared,
        reference.train_dataset,
        reference.tokenizer,
        table,
        config,
        reference.directory,
    )
