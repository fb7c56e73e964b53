"""SFTMix: stage 1 (confidence table, computed or reused) then stage 2 (QLoRA training with the Mixup regulariser).

accelerate launch recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml [--key value ...]
sftmix-trl sftmix --config my.yaml                       (an installed package, no clone)
"""

from __future__ import annotations

from pathlib import Path

from sftmix_trl.after_training.card import sftmix_card_sections
from sftmix_trl.after_training.save import train_save_publish
from sftmix_trl.confidence import ConfidenceConfig, compute_confidence
from sftmix_trl.confidence.table import TABLE_FILE, check_counts
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.prepare import prepare_run_data
from sftmix_trl.model import load_model, lora_config
from sftmix_trl.runs import (
    check_output_dir,
    launch,
    record_run,
    resolve_resume,
    run_config,
    setup_logging,
)
from sftmix_trl.sftmix.config import SFTMixConfig
from sftmix_trl.sftmix.exclusion import exclude_suspicious
from sftmix_trl.sftmix.trainer import SFTMixTrainer

ARGUMENTS = (ScriptArguments, SFTMixConfig, ModelArguments)


def main(script_args: ScriptArguments, training_args: SFTMixConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    config = run_config(script_args, training_args, model_args)
    resume = resolve_resume(training_args)
    check_output_dir(
        training_args, config, resume, script_args.overwrite_output_dir, keep=training_args.confidence_dir
    )
    confidence_config = ConfidenceConfig.from_args(training_args)
    table_dir = training_args.confidence_table or training_args.confidence_dir
    run = prepare_run_data(  # the data prepared once, as TRL would, and checked before any write
        script_args,
        training_args,
        model_args,
        SFTMixTrainer,
        confidence_config,
    )
    data, tokenizer, drops = run.data, run.tokenizer, run.drops
    check_counts(
        len(data.reference_train),
        len(data.train),
        training_args,
        confidence_config,
        table_dir,
        table_given=training_args.confidence_table is not None,
    )
    table = compute_confidence(
        data.examples,
        model_args,
        training_args,
        confidence_config,
        table_dir,
        must_exist=training_args.confidence_table is not None,
        prepared=data.reference_train,
    )
    # Opt-in: the most suspicious share of the data report leaves the split and the prepared training set
    table, train_prepared, left_out = exclude_suspicious(
        table, data.train, table_dir, training_args.exclude_suspicious_fraction
    )
    model = load_model(model_args, training_args.trust_remote_code)

    push, training_args.push_to_hub = training_args.push_to_hub, False  # published below, once saved locally
    trainer = SFTMixTrainer(
        model=model,
        args=training_args,
        train_dataset=train_prepared,
        confidence=table,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    record_run(training_args, config, "sftmix.py", drops, extra={"suspicious_excluded_ids": left_out})
    train_save_publish(
        trainer,
        tokenizer,
        script_args,
        training_args,
        model_args,
        push,
        "sftmix.py",
        resume,
        method="SFTMix",
        card_sections=lambda history: sftmix_card_sections(table, history, training_args),
        drops=drops,
        promised=[Path(table_dir) / TABLE_FILE],
    )


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
