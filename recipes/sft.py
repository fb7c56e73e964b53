"""NTP baseline: QLoRA supervised fine-tuning with TRL's SFTTrainer.

accelerate launch recipes/sft.py --config configs/demo/sft_qlora.yaml [--key value ...]
"""

from __future__ import annotations

import logging

from trl import SFTTrainer

from sftmix_trl import hub
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
from sftmix_trl.data import load_datasets
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.runs import check_output_dir, launch, record_run, resolve_resume, run_config, setup_logging

logger = logging.getLogger(__name__)


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    config = run_config(script_args, training_args, model_args)
    resume = resolve_resume(training_args)
    check_output_dir(training_args, config, resume, script_args.overwrite_output_dir)
    train_dataset, eval_dataset = load_datasets(script_args)
    tokenizer = load_tokenizer(model_args, training_args.trust_remote_code, training_args.chat_template_path)
    model = load_model(model_args, training_args.trust_remote_code)

    push, training_args.push_to_hub = training_args.push_to_hub, False  # published below, once saved locally
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    record_run(training_args, config, "sft.py")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged figures, for cards, studies and tests
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        hub.write_model_card(
            training_args.output_dir,
            base_model=model_args.model_name_or_path,
            datasets=hub.dataset_names(script_args),
            method="NTP",
            settings=hub.card_settings(training_args, model_args),
            launch_line=hub.launch_line("sft.py"),
            hub_model_id=training_args.hub_model_id,
        )
        logger.info("adapter saved to %s", training_args.output_dir)
        if push:
            url = hub.push_folder(
                training_args.output_dir, training_args.hub_model_id, private=training_args.hub_private_repo
            )
            logger.info("pushed to %s", url)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    launch(main, (ScriptArguments, SFTConfig, ModelArguments))
