"""NTP baseline: QLoRA supervised fine-tuning with TRL's SFTTrainer.

accelerate launch recipes/sft.py --config configs/demo/sft_qlora.yaml [--key value ...]
sftmix-trl sft --config my.yaml                          (an installed package, no clone)
"""

from __future__ import annotations

from sftmix_trl.after_training.save import train_save_publish
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
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
from sftmix_trl.sft_trainer import NTPTrainer

ARGUMENTS = (ScriptArguments, SFTConfig, ModelArguments)


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    config = run_config(script_args, training_args, model_args)
    resume = resolve_resume(training_args)
    check_output_dir(training_args, config, resume, script_args.overwrite_output_dir)
    # The data prepared once, as TRL would, and checked before any write
    run = prepare_run_data(script_args, training_args, model_args, NTPTrainer)
    data, tokenizer, drops = run.data, run.tokenizer, run.drops
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
