"""SFTMix stage 1: train the reference adapter, score every example at C snapshots, write the confidence table.

accelerate launch recipes/confidence.py --config configs/demo/sftmix_qlora.yaml
sftmix-trl confidence --config my.yaml                   (an installed package, no clone)

Reads the same YAML as the SFTMix recipe; the table lands in `confidence_dir` (default `<output_dir>/confidence`),
where the SFTMix recipe finds and reuses it. A run that was killed resumes where it stopped.
"""

from __future__ import annotations

import logging

from ..confidence import ConfidenceConfig, compute_confidence
from ..configs import ModelArguments, ScriptArguments
from ..data import has_multi_turn, load_datasets
from ..data_checks import check_sftmix_data
from ..drops import DropLog
from ..model import load_tokenizer
from ..runs import launch, setup_logging
from ..sftmix_config import SFTMixConfig

logger = logging.getLogger(__name__)
ARGUMENTS = (ScriptArguments, SFTMixConfig, ModelArguments)


def main(script_args: ScriptArguments, training_args: SFTMixConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    drops = DropLog(script_args.max_dropped_fraction)
    train_dataset, _ = load_datasets(script_args, drops)
    config = ConfidenceConfig.from_args(training_args)
    # Multi-turn conversations train every assistant turn: TRL masks the rest through the template's generation
    # markers
    training_args.assistant_only_loss |= has_multi_turn(train_dataset)
    tokenizer = load_tokenizer(
        model_args,
        training_args.trust_remote_code,
        training_args.chat_template_path,
        training_args.assistant_only_loss,
    )
    data = check_sftmix_data(
        train_dataset, None, tokenizer, model_args, training_args, config, training_args.confidence_dir, drops=drops
    )
    table = compute_confidence(
        data.examples, model_args, training_args, config, training_args.confidence_dir, prepared=data.reference_train
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


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
