"""NTP baseline: QLoRA supervised fine-tuning with TRL's SFTTrainer.

accelerate launch recipes/sft.py --config configs/demo/sft_qlora.yaml [--key value ...]
sftmix-trl sft --config my.yaml                          (an installed package, no clone)
"""

from __future__ import annotations

from ..configs import ModelArguments, ScriptArguments, SFTConfig
from ..data import has_multi_turn, load_datasets
from ..data_checks import check_training_data, drop_unrenderable
from ..drops import DropLog
from ..model import load_model, load_tokenizer, lora_config
from ..ntp_trainer import NTPTrainer
from ..runs import (
    check_output_dir,
    launch,
    record_run,
    resolve_resume,
    run_config,
    setup_logging,
    train_save_publish,
)

ARGUMENTS = (ScriptArguments, SFTConfig, ModelArguments)


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    config = run_config(script_args, training_args, model_args)
    resume = resolve_resume(training_args)
    check_output_dir(training_args, config, resume, script_args.overwrite_output_dir)
    drops = DropLog(script_args.max_dropped_fraction)
    train_dataset, eval_dataset = load_datasets(script_args, drops)
    # Multi-turn conversations train every assistant turn: TRL masks the rest through the template's generation
    # markers
    training_args.assistant_only_loss |= has_multi_turn(train_dataset, eval_dataset)
    tokenizer = load_tokenizer(
        model_args,
        training_args.trust_remote_code,
        training_args.chat_template_path,
        training_args.assistant_only_loss,
    )
    # The data prepared once, as TRL would, and checked before any write
    train_dataset = drop_unrenderable(train_dataset, tokenizer, drops)
    eval_dataset = drop_unrenderable(eval_dataset, tokenizer, drops, name="eval")
    data = check_training_data(
        train_dataset, tokenizer, training_args, eval_dataset, trainer_class=NTPTrainer, drops=drops
    )
    model = load_model(model_args, training_args.trust_remote_code)

    push, training_args.push_to_hub = training_args.push_to_hub, False  # published below, once saved locally
    trainer = NTPTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    record_run(training_args, config, "sft.py", drops)
    train_save_publish(trainer, tokenizer, script_args, training_args, model_args, push, "sft.py", resume, drops=drops)


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
