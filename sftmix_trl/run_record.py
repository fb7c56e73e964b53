"""What a saved adapter folder says about the run that trained it (`sftmix_run.json`): how its base was loaded
(quantisation settings, compute dtype) and where its data came from, so that a later command rebuilds the model the
adapter was trained against, not the one today's flags or today's machine would build."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path

from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.model import _resolve_dtype, compute_dtype
from sftmix_trl.runs import RUN_FILE

logger = logging.getLogger(__name__)


def read_run_record(folder: str | Path) -> dict | None:
    """The run's `sftmix_run.json` ({recipe, argv, config, ...}), or None when the folder has none (an adapter made
    by another tool) or it cannot be read."""
    try:
        return json.loads((Path(os.path.expanduser(str(folder))) / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


UNRECORDED = "LoRA fine-tuning (method not recorded)"
METHODS = {"sftmix.py": "SFTMix", "sft.py": "NTP (supervised fine-tuning)", "confidence.py": "NTP (SFTMix reference)"}


def method_of(folder: str | Path) -> str:
    """The training method a run folder records (for cards), or `UNRECORDED`."""
    recipe = (read_run_record(folder) or {}).get("recipe")
    if recipe is None:
        return UNRECORDED
    return METHODS.get(recipe, f"LoRA fine-tuning ({recipe})")


def run_compute_dtype(config: dict) -> str:
    """The dtype the run loaded (and dequantised) its base in. `dtype: auto` was resolved on the training machine
    (`model.compute_dtype`: float32 on a CPU, bfloat16 on a GPU that supports it, else float16), which the record
    shows through `use_cpu` (set on every CPU run) and `bf16` (set where CUDA supports it)."""
    dtype = config.get("dtype") or "auto"
    if dtype != "auto":
        return dtype
    if config.get("use_cpu"):
        return "float32"
    return "bfloat16" if config.get("bf16") else "float16"


def _pick(dataclass_type: type, config: dict) -> dict:
    return {f.name: config[f.name] for f in fields(dataclass_type) if f.init and f.name in config}


def trained_model_arguments(
    adapter_path: str, base: str, overrides: dict | None = None
) -> tuple[ModelArguments, bool]:
    """The `ModelArguments` that load the base as the run loaded it (its quantisation settings, its resolved compute
    dtype), pointed at `base`; and whether the run recorded them. Without a record, the package's QLoRA defaults
    (4-bit nf4, double quantisation, this machine's compute dtype) are assumed and a warning says so.

    `overrides` (field -> value, None = keep) replace recorded settings; one that contradicts the record is warned
    about, since the model so built is no longer the one the adapter was trained against.
    """
    record = read_run_record(adapter_path)
    config = (record or {}).get("config") or {}
    if record is None:
        logger.warning(
            "%s has no %s: assuming it was trained on the package's default QLoRA base (4-bit nf4, double "
            "quantisation); set the quantisation flags if it was not",
            adapter_path,
            RUN_FILE,
        )
        values = {"dtype": str(compute_dtype()).removeprefix("torch.")}
    else:
        values = _pick(ModelArguments, config)
        values["dtype"] = run_compute_dtype(config)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name in values and values[name] != value:
            logger.warning(
                "%s=%s overrides the run's recorded %s=%s: the model so built is not the one the adapter was "
                "trained against",
                name,
                value,
                name,
                values[name],
            )
        values[name] = value
    values.update(model_name_or_path=base, use_peft=True)
    return ModelArguments(**values), record is not None


def quantisation_label(model_args: ModelArguments) -> str:
    """How the base was loaded, in words: `4-bit nf4 (double quantisation), float32` or `float32`."""
    dtype = str(_resolve_dtype(model_args)).removeprefix("torch.")
    if model_args.load_in_4bit:
        nested = " (double quantisation)" if model_args.use_bnb_nested_quant else ""
        return f"4-bit {model_args.bnb_4bit_quant_type}{nested}, {dtype}"
    if model_args.load_in_8bit:
        return f"8-bit, {dtype}"
    return dtype


def run_script_arguments(config: dict) -> ScriptArguments:
    """The run's data settings (source or mixture, format, held-out split and its seed) as `ScriptArguments`."""
    return ScriptArguments(**_pick(ScriptArguments, config))
