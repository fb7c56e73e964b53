"""From a run's arguments to its prepared data: the one path every recipe (sft, confidence, sftmix, report) takes.

A confidence table is keyed on the examples and the settings that decide which tokens are scored. If two commands
read the same YAML but prepared the data differently (one dropping the records the chat template refuses, another
not; one deciding multi-turn training on both splits, another on the training split only), the second would refuse
the first's table as "belonging to another dataset". So they all go through `prepare_run_data`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sftmix_trl.data.checks import (
    CONFIDENCE_SPLIT,
    EVALUATION,
    TRAINING,
    PreparedData,
    check_same_survivors,
    drop_unrenderable,
    prepare_split,
    refuse_eval_strategy_without_eval,
)
from sftmix_trl.data.drops import DropLog
from sftmix_trl.data.load import has_multi_turn, load_datasets
from sftmix_trl.model import load_tokenizer
from sftmix_trl.sft_trainer import TruncatingSFTTrainer


@dataclass
class RunData:
    data: PreparedData  # what the trainers train on, and the normalised examples it comes from
    tokenizer: object  # the model's tokenizer, with the training template when multi-turn conversations need one
    drops: DropLog  # every record dropped so far, for the log, `sftmix_run.json` and the model card


def reference_tokenizer_of_its_own(model_args, training_args, confidence_config) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a stage-1 reference model other than the model trained (`reference_model_name_or_path`);
    None when the reference is the model's base or the run has no stage 1 (`confidence_config` None)."""
    reference = confidence_config.reference_model_name_or_path if confidence_config is not None else None
    if not reference or reference == model_args.model_name_or_path:
        return None
    return load_tokenizer(
        dataclasses.replace(model_args, model_name_or_path=reference),
        training_args.trust_remote_code,
        training_args.chat_template_path,
        training_args.assistant_only_loss,
    )


def prepare_run_data(
    script_args,
    training_args,
    model_args,
    trainer_class: type | None = None,
    confidence_config=None,
) -> RunData:
    """Load the data, choose the tokenizer(s), drop what cannot train, prepare it as TRL will, and check it, before
    any write. Sets `training_args.assistant_only_loss` when a split holds multi-turn conversations.

    Args:
        trainer_class: the trainer of the run (`NTPTrainer`, `SFTMixTrainer`): it trains on the training set and
            evaluates on the held-out set; None for stage 1 alone (`confidence`, `report`).
        confidence_config: the run's `ConfidenceConfig` when it has a stage 1 (all but `sft`): a reference trains on
            the training set and scores it, with its own tokenizer when `reference_model_name_or_path` names another
            model. The counts stage 1 needs beyond two examples are stage 1's to check
            (`confidence.table.check_counts`).
    """
    drops = DropLog(script_args.max_dropped_fraction)
    train_dataset, eval_dataset = load_datasets(script_args, drops)
    # Decided on both splits, by every command alike: multi-turn conversations train every assistant turn, which TRL
    # masks through the template's generation markers (the table records the setting and the template)
    training_args.assistant_only_loss |= has_multi_turn(train_dataset, eval_dataset)
    tokenizer = load_tokenizer(
        model_args,
        training_args.trust_remote_code,
        training_args.chat_template_path,
        training_args.assistant_only_loss,
    )
    if trainer_class is not None:
        refuse_eval_strategy_without_eval(training_args, eval_dataset)
    reference_tokenizer = reference_tokenizer_of_its_own(model_args, training_args, confidence_config)

    # Stage 2 trains only examples stage 1 scored: what either template refuses leaves the training set
    both = (tokenizer,) if reference_tokenizer is None else (tokenizer, reference_tokenizer)
    train_dataset = drop_unrenderable(train_dataset, both, drops)
    eval_dataset = drop_unrenderable(eval_dataset, (tokenizer,), drops, "eval")
    drops.log(["template_refused"])

    # One preparation per tokenizer: the reference's own first (stage 1 runs first), then the model's, which the
    # run's trainer trains on and, with no tokenizer of its own, the reference too. Stage 1 alone prepares the model's
    # as well, so that `confidence` refuses what `sftmix` would refuse after it
    need = TRAINING if confidence_config is None else CONFIDENCE_SPLIT
    reference_train = None
    if reference_tokenizer is not None:
        reference_train = prepare_split(
            train_dataset, reference_tokenizer, training_args, TruncatingSFTTrainer, "train", drops, need
        )
    trainer = trainer_class or TruncatingSFTTrainer  # stage 1 alone: the reference's trainer
    train = prepare_split(train_dataset, tokenizer, training_args, trainer, "train", drops, need)
    held_out = None
    if trainer_class is not None and eval_dataset is not None:
        held_out = prepare_split(eval_dataset, tokenizer, training_args, trainer_class, "eval", drops, EVALUATION)
    if reference_tokenizer is not None:  # before the dropped share: this stop says which max_length fixes both
        check_same_survivors(train_dataset, train, reference_train, tokenizer, reference_tokenizer, training_args)
    elif confidence_config is not None:
        reference_train = train
    drops.check(len(train))
    return RunData(PreparedData(train, held_out, reference_train, train_dataset, eval_dataset), tokenizer, drops)
