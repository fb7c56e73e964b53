"""What every command does around its work: logging, parsing and the checks made at launch, a safe output folder,
resuming, the run's record (`sftmix_run.json`), and the check that what it promises was written."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import datasets
import transformers
from transformers.trainer_utils import get_last_checkpoint

from sftmix_trl.atomic import atomic_write
from sftmix_trl.configs import parse_args
from sftmix_trl.errors import SFTMixError
from sftmix_trl.launch_checks import check_before_writing

logger = logging.getLogger("sftmix_trl")
RUN_FILE = "sftmix_run.json"
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def redact(text: str) -> str:
    """Remove Hugging Face tokens from text that lands in logs, cards or saved configs."""
    return _TOKEN.sub("hf_***", text)


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
    payload = {"recipe": recipe, "argv": redact(" ".join(sys.argv)), "config": run_config, **(extra or {})}
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

    try:
        parsed = parse_args(dataclass_types)
        check_before_writing(parsed)  # settings that would only fail at model loading or training fail here
        main(*parsed)
    except SFTMixError as error:
        raise SystemExit(f"error: {error}") from None


def check_promised(directory: str | os.PathLike, files: Iterable[str | os.PathLike], recipe: str) -> None:
    """Stop with one line naming what is missing if a file the recipe promises (relative to `directory`, or absolute)
    is not there: called before the recipe reports success or publishes anything."""
    missing = [str(file) for file in files if not (Path(directory) / file).is_file()]
    if missing:
        raise SFTMixError(f"{recipe} finished but wrote no {', '.join(missing)} in {directory}; nothing was published")
