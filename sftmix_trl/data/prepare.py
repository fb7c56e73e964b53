"""From a run's arguments to its prepared data: the one path every recipe (sft, confidence, sftmix, report) takes.

A confidence table is keyed on the examples and the settings that decide which tokens are scored. If two commands
read the same YAML but prepared the data differently (one dropping the records the chat template refuses, another
not; one deciding multi-turn training on both splits, another on the training split only), the second would refuse
the first's table as "belonging to another dataset". So they all go through `prepare_run_data`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sftmix_trl.data.checks import PreparedData, check_sftmix_data, check_training_data, drop_unrenderable
from sftmix_trl.data.drops import DropLog
from sftmix_trl.data.load import has_multi_turn, load_datasets
from sftmix_trl.model import load_tokenizer


@dataclass
class RunData:
    data: PreparedData  # what the trainers train on, and the normalised examples it comes from
    tokenizer: object  # the model's tokenizer, with the training template when multi-turn conversations need one
    drops: DropLog  # every record dropped so far, for the log, `sftmix_run.json` and the model card


def prepare_run_data(
    script_args,
    training_args,
    model_args,
    trainer_class: type | None = None,
    confidence_config=None,
) -> RunData:
    """Load the data, choose the tokenizer, drop what cannot train, prepare it as TRL will, and check it, before any
    write. Sets `training_args.assistant_only_loss` when a split holds multi-turn conversations.

    Args:
        trainer_class: the trainer of the run (`NTPTrainer`, `SFTMixTrainer`); None for stage 1 alone (`confidence`,
            `report`), which prepares only what the reference trains on and scores.
        confidence_config: the run's `ConfidenceConfig` when it has a confidence table (all but `sft`); the counts
            stage 1 needs are stage 1's to check (`confidence.table.check_counts`).
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
    if confidence_config is None:
        train_dataset = drop_unrenderable(train_dataset, tokenizer, drops)
        eval_dataset = drop_unrenderable(eval_dataset, tokenizer, drops, name="eval")
        data = check_training_data(
            train_dataset, tokenizer, training_args, eval_dataset, trainer_class=trainer_class, drops=drops
        )
    else:
        data = check_sftmix_data(
            train_dataset,
            eval_dataset,
            tokenizer,
            model_args,
            training_args,
            confidence_config,
            trainer_class,
            drops=drops,
        )
    return RunData(data, tokenizer, drops)
