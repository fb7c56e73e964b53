"""SFTMix stage 1: train the reference adapter, score every example at C snapshots, write the confidence table.

    accelerate launch recipes/confidence.py --config configs/demo/sftmix_qlora.yaml

Reads the same YAML as `recipes/sftmix.py`; the table lands in `confidence_dir` (default `<output_dir>/confidence`),
where the SFTMix recipe finds and reuses it. A run that was killed resumes where it stopped.
"""

from __future__ import annotations

import logging

from sftmix_trl.confidence import ConfidenceConfig, compute_confidence
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data import load_datasets
from sftmix_trl.runs import launch, setup_logging
from sftmix_trl.sftmix_config import SFTMixConfig

logger = logging.getLogger(__name__)


def main(script_args: ScriptArguments, training_args: SFTMixConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    train_dataset, _ = load_datasets(script_args)
    table = compute_confidence(
        train_dataset,
        model_args,
        training_args,
        ConfidenceConfig.from_args(training_args),
        training_args.confidence_dir,
    )
    meta = table.metadata
    logger.info(
        "confidence table: %d scored (%d confident, %d unconfident), %d excluded; see %s/confidence.png",
        meta["num_scored"],
        meta["num_confident"],
        meta["num_unconfident"],
        meta["num_excluded"],
        training_args.confidence_dir,
    )


if __name__ == "__main__":
    launch(main, (ScriptArguments, SFTMixConfig, ModelArguments))
