"""NTP baseline: QLoRA supervised fine-tuning with TRL's SFTTrainer.

accelerate launch recipes/sft.py --config configs/demo/sft_qlora.yaml [--key value ...]
"""

from __future__ import annotations

from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
from sftmix_trl.data import load_datasets
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.padding_free import TruncatingSFTTrainer
from sftmix_trl.runs import (
    check_output_dir,
    launch,
    record_run,
    resolve_resume,
    run_config,
    setup_logging,
    train_save_publish,
)


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    config = run_config(script_args, training_args, model_args)
    resume = resolve_resume(training_args)
    check_output_dir(training_args, config, resume, script_args.overwrite_output_dir)
    train_dataset, eval_dataset = load_datasets(script_args)
    tokenizer = load_tokenizer(model_args, training_args.trust_remote_code, training_args.chat_template_path)
    model = load_model(model_args, training_args.trust_remote_code)

    push, training_args.push_to_hub = training_args.push_to_hub, False  # published below, once saved locally
    trainer = TruncatingSFTTrainer(  # TRL's SFTTrainer; with padding_free, truncated to max_length as when padded
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    record_run(training_args, config, "sft.py")
    train_save_publish(trainer, tokenizer, script_args, training_args, model_args, push, "sft.py", resume)


if __name__ == "__main__":
    launch(main, (ScriptArguments, SFTConfig, ModelArguments))
