"""After training: the adapter, tokenizer, trainer state and model card saved, checked, then published."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from sftmix_trl.after_training import hub
from sftmix_trl.after_training.card import data_card_section
from sftmix_trl.chat_templates import user_chat_template
from sftmix_trl.runs import check_promised

logger = logging.getLogger("sftmix_trl")

# What a training recipe promises in its output_dir: the adapter (PEFT's format), the tokenizer, the model card
TRAINED_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "README.md")


def save_tokenizer(tokenizer, output_dir: str) -> None:
    """Save `tokenizer` with the chat template the user gave it: the marked copy that training every assistant turn
    swapped in renders the same text, but the user's template is the one to publish and to generate with."""
    training_template, tokenizer.chat_template = tokenizer.chat_template, user_chat_template(tokenizer)
    try:
        tokenizer.save_pretrained(output_dir)
    finally:
        tokenizer.chat_template = training_template


def train_save_publish(
    trainer,
    tokenizer,
    script_args,
    training_args,
    model_args,
    push: bool,
    recipe: str,
    resume: str | None,
    method: str = "NTP",
    card_sections=lambda log_history: [],
    drops=None,
    promised: Iterable[str | os.PathLike] = (),
) -> None:
    """Train (or resume), then save the adapter, tokenizer, trainer state and model card, check they are there (and
    `promised`, more files the recipe promises), then publish if asked.

    `push` is the user's `push_to_hub`: the trainer runs with it off, so that an offline machine fails only here,
    after everything is saved locally. The saved tokenizer carries the user's own chat template, not the marked
    training copy. `drops` (a `DropLog`): the records dropped, for the model card. The adapter is saved whatever
    engine shards it (`NTPTrainer.save_model`).
    """
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged figures, for cards, studies and tests
    if trainer.is_world_process_zero():
        # A pickle of the arguments; `sftmix_run.json` records them as JSON (checkpoints keep theirs for resuming)
        (Path(training_args.output_dir) / "training_args.bin").unlink(missing_ok=True)
        save_tokenizer(tokenizer, training_args.output_dir)
        hub.write_model_card(
            training_args.output_dir,
            base_model=model_args.model_name_or_path,
            datasets=hub.dataset_names(script_args),
            method=method,
            settings=hub.card_settings(training_args, model_args),
            launch_line=hub.launch_line(recipe),
            sections=card_sections(trainer.state.log_history) + ([data_card_section(drops)] if drops else []),
            hub_model_id=training_args.hub_model_id,
        )
        check_promised(training_args.output_dir, (*TRAINED_FILES, *promised), recipe)
        logger.info("adapter saved to %s", training_args.output_dir)
        if push:
            table = ["confidence/confidence.parquet"] if getattr(training_args, "push_confidence_table", False) else []
            url = hub.push_folder(
                training_args.output_dir,
                training_args.hub_model_id,
                private=training_args.hub_private_repo,
                extra_patterns=table,
            )
            logger.info("pushed to %s", url)
    trainer.accelerator.wait_for_everyone()
    # Free the DDP/FSDP wrapper (and its gradient reducer) while the process group is alive and idle, then shut the
    # group down: a reducer freed after `end_training` destroyed the group can hang in gloo's destructor at exit
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    gc.collect()
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
