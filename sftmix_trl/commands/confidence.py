"""SFTMix stage 1: train the reference adapter, score every example at C snapshots, write the confidence table.

accelerate launch recipes/confidence.py --config configs/demo/sftmix_qlora.yaml
sftmix-trl confidence --config my.yaml                   (an installed package, no clone)

Reads the same YAML as the SFTMix recipe; the table lands in `confidence_dir` (default `<output_dir>/confidence`),
where the SFTMix recipe finds and reuses it. A run that was killed resumes where it stopped.
"""

from __future__ import annotations

import logging

from accelerate import PartialState

from sftmix_trl.confidence import ConfidenceConfig, compute_confidence
from sftmix_trl.confidence.report import DATA_MAP, REPORT_PAGE, REPORT_TABLE
from sftmix_trl.confidence.table import PLOT_FILE, TABLE_FILE, check_counts
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.prepare import prepare_run_data
from sftmix_trl.runs import check_promised, launch, setup_logging
from sftmix_trl.sftmix.config import SFTMixConfig

logger = logging.getLogger(__name__)
ARGUMENTS = (ScriptArguments, SFTMixConfig, ModelArguments)


def main(script_args: ScriptArguments, training_args: SFTMixConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    config = ConfidenceConfig.from_args(training_args)
    data = prepare_run_data(script_args, training_args, model_args, confidence_config=config).data
    check_counts(len(data.reference_train), None, training_args, config, training_args.confidence_dir)
    table = compute_confidence(
        data.examples, model_args, training_args, config, training_args.confidence_dir, prepared=data.reference_train
    )
    if PartialState().is_main_process:  # the process that wrote them
        report = (REPORT_TABLE, REPORT_PAGE, DATA_MAP) if config.data_report else ()
        check_promised(training_args.confidence_dir, (TABLE_FILE, PLOT_FILE, *report), "confidence.py")
    meta = table.metadata
    logger.info(
        "confidence table: %d scored (%d confident, %d unconfident), %d excluded; see %s/confidence.png",
        meta["num_scored"],
        meta["num_confident"],
        meta["num_unconfident"],
        meta["num_excluded"],
        training_args.confidence_dir,
    )


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
