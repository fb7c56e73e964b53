"""SFTMix: stage 1 (confidence table, computed or reused) then stage 2 (QLoRA training with the Mixup regulariser).

accelerate launch recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml [--key value ...]
"""

from __future__ import annotations

from sftmix_trl.confidence import ConfidenceConfig, compute_confidence
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data import check_prepared, has_multi_turn, load_datasets
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.model_card import sftmix_card_sections
from sftmix_trl.runs import (
    check_output_dir,
    launch,
    record_run,
    resolve_resume,
    run_config,
    setup_logging,
    train_save_publish,
)
from sftmix_trl.sftmix_config import SFTMixConfig
from sftmix_trl.sftmix_trainer import SFTMixTrainer


def main(script_args: ScriptArguments, training_args: SFTMixConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    config = run_config(script_args, training_args, model_args)
    resume = resolve_resume(training_args)
    check_output_dir(
        training_args, config, resume, script_args.overwrite_output_dir, keep=training_args.confidence_dir
    )
    train_dataset, eval_dataset = load_datasets(script_args)
    # Multi-turn conversations train every assistant turn: TRL masks the rest through the template's generation markers
    training_args.assistant_only_loss |= has_multi_turn(train_dataset, eval_dataset)
    table = compute_confidence(
        train_dataset,
        model_args,
        training_args,
        ConfidenceConfig.from_args(training_args),
        training_args.confidence_table or training_args.confidence_dir,
        must_exist=training_args.confidence_table is not None,
    )
    tokenizer = load_tokenizer(
        model_args,
        training_args.trust_remote_code,
        training_args.chat_template_path,
        training_args.assistant_only_loss,
    )
    model = load_model(model_args, training_args.trust_remote_code)

    push, training_args.push_to_hub = training_args.push_to_hub, False  # published below, once saved locally
    trainer = SFTMixTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        confidence=table,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    check_prepared(train_dataset, trainer.train_dataset, training_args.max_length)
    record_run(training_args, config, "sftmix.py")
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
    )


if __name__ == "__main__":
    launch(main, (ScriptArguments, SFTMixConfig, ModelArguments))
