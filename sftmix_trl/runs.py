"""What every recipe does around training: logging, a safe output folder, resuming, saving and publishing."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import datasets
import transformers
from transformers.trainer_utils import get_last_checkpoint

from . import hub
from .atomic import atomic_write
from .chat_templates import user_chat_template
from .errors import SFTMixError
from .model_card import data_card_section

logger = logging.getLogger("sftmix_trl")
RUN_FILE = "sftmix_run.json"


def setup_logging(training_args) -> None:
    """INFO from this package on the main process (WARNING on the others) unless `log_level` says otherwise;
    transformers and datasets keep their own verbosity unless `log_level` is set."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    level = training_args.get_process_log_level()
    ours = logging.INFO if training_args.should_log else logging.WARNING
    if training_args.log_level != "passive":
        ours = level
    for name in ("sftmix_trl", "__main__"):
        logging.getLogger(name).setLevel(ours)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def resolve_resume(training_args) -> str | None:
    """`resume_from_checkpoint: true` (or "last") means the newest checkpoint in `output_dir`."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in ("true", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise SFTMixError(f"resume_from_checkpoint is set but {training_args.output_dir} has no checkpoint")
        return last
    if not os.path.isdir(value):
        raise SFTMixError(f"checkpoint folder not found: {value}")
    return value


def check_output_dir(
    training_args, run_config: dict, resume: str | None, overwrite: bool = False, keep: str | None = None
) -> None:
    """Refuse to write into a non-empty `output_dir` that belongs to another run.

    A folder written by this package records its run's configuration; the same configuration may continue there
    (resume, or a re-run), anything else needs `overwrite_output_dir: true`. `keep` names a subfolder that does not
    count (the stage-1 confidence folder, which checks its own settings).
    """
    out = Path(training_args.output_dir)
    if not out.is_dir() or overwrite or resume:
        return
    kept = Path(keep).resolve() if keep else None
    if not any(entry.resolve() != kept for entry in out.iterdir()):
        return
    record = out / RUN_FILE
    if record.is_file() and json.loads(record.read_text()).get("config") == run_config:
        return
    raise SFTMixError(
        f"output_dir {out} is not empty and holds another run. Choose a new output_dir, resume with "
        "`resume_from_checkpoint: true`, or pass `--overwrite_output_dir true` to write over it."
    )


def record_run(training_args, run_config: dict, recipe: str, drops=None, extra: dict | None = None) -> None:
    """Write the run's configuration (no secrets) into `output_dir`, for `check_output_dir` and for the model card,
    with the counts of the records dropped because they cannot train (`drops`, a `DropLog`) and `extra`: what the
    run decided from its data (e.g. the examples it left out), recorded beside the configuration."""
    if not training_args.should_save:
        return
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"recipe": recipe, "argv": hub.redact(" ".join(sys.argv)), "config": run_config, **(extra or {})}
    if drops is not None:
        payload["data"] = drops.as_dict()
    atomic_write(out / RUN_FILE, json.dumps(payload, indent=2, default=str))


def run_config(*dataclasses_) -> dict:
    """The user-facing configuration of a run, without secrets, JSON-serialisable."""
    merged = {}
    for instance in dataclasses_:
        values = instance.to_dict() if hasattr(instance, "to_dict") else vars(instance)
        merged.update({k: v for k, v in values.items() if not k.startswith("_")})
    for volatile in ("resume_from_checkpoint", "overwrite_output_dir", "push_to_hub", "logging_dir", "hub_token"):
        merged.pop(volatile, None)
    return json.loads(json.dumps(merged, default=str))


def launch(main, dataclass_types: tuple[type, ...]) -> None:
    """Parse the recipe's arguments and run it; a problem the user can fix ends in one line, not a traceback."""
    from .configs import parse_args
    from .launch_checks import check_before_writing

    try:
        parsed = parse_args(dataclass_types)
        check_before_writing(parsed)  # settings that would only fail at model loading or training fail here
        main(*parsed)
    except SFTMixError as error:
        raise SystemExit(f"error: {error}") from None


# What a training recipe promises in its output_dir: the adapter (PEFT's format), the tokenizer, the model card
TRAINED_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "README.md")


def check_promised(directory: str | os.PathLike, files: Iterable[str | os.PathLike], recipe: str) -> None:
    """Stop with one line naming what is missing if a file the recipe promises (relative to `directory`, or absolute)
    is not there: called before the recipe reports success or publishes anything."""
    missing = [str(file) for file in files if not (Path(directory) / file).is_file()]
    if missing:
        raise SFTMixError(f"{recipe} finished but wrote no {', '.join(missing)} in {directory}; nothing was published")


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
