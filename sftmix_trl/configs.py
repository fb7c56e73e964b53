"""The dataclasses a recipe parses (data, model, training) and the strict YAML + command-line parser."""

from __future__ import annotations

import difflib
import functools
import json
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import trl
import yaml
from trl import ModelConfig, TrlParser

from sftmix_trl.errors import SFTMixError


def load_yaml(path: str | Path) -> Any:
    """The YAML file at `path`; a syntax error is one `SFTMixError` line with the file, line and column (PyYAML's own
    message is a multi-line traceback)."""

    with open(path) as handle:
        try:
            return yaml.safe_load(handle)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
            if context and start:
                problem += f" ({context} from line {start.line + 1}, column {start.column + 1})"
            raise SFTMixError(f"YAML syntax error in {where}: {problem}") from None


def _read_mixture(text: str) -> dict[str, Any] | None:
    """`dataset_mixture` given as a string: the path of a YAML/JSON file holding the mapping, or the mapping as JSON
    (`null` drops a mixture set in the config file)."""
    path = Path(text).expanduser()
    if path.is_file():
        return load_yaml(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(
            f'`dataset_mixture` must be a JSON mapping {{"datasets": [{{"path": ...}}]}} or the path of a YAML/JSON file '
            f"holding one; got {text!r}, which is neither"
        ) from None


@dataclass
class ScriptArguments:
    """Where the training data comes from. Either one source (`dataset_name`) or a mixture (`dataset_mixture`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "One source: a Hub dataset id, or a local .json/.jsonl/.parquet file or folder of them."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of `dataset_name` to train on."})
    dataset_format: Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt"] = field(
        default="auto",
        metadata={
            "help": "Record format of `dataset_name`: 'alpaca' (instruction, input, output), 'prompt_completion' "
            "(strings or chat messages), 'messages' (chat, possibly multi-turn; see `assistant_turns`), 'sharegpt' "
            "(`conversations` of {from, value} turns; see `role_map`) or 'auto' (detected from the columns)."
        },
    )
    role_map: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Extra role names of chat turns, mapped to system/user/assistant/tool, e.g. {doctor: assistant, "
            "patient: user} (on the command line: JSON). Built in: human/user -> user; gpt/assistant/chatgpt/bing/"
            "bard/model -> assistant; system -> system. A turn with another role stops the run, naming the record. "
            "A `dataset_mixture` entry may add its own `role_map`."
        },
    )
    max_dropped_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Share of the records that may be dropped because they cannot train (empty conversation, only a "
            "system message, no reply, empty replies, refused by the chat template, every reply truncated away) "
            "before the run stops. Each reason is logged with its count and the first records; the counts go into "
            "sftmix_run.json and the model card. 1 never stops (unless nothing is left)."
        },
    )
    assistant_turns: Literal["all", "last"] = field(
        default="all",
        metadata={
            "help": "Assistant turns of a multi-turn 'messages' conversation that are trained and scored: 'all' "
            "(every one, through TRL's `assistant_only_loss`, turned on automatically; the chat template needs "
            "generation markers around the replies, derived for ChatML-like templates) or 'last' (only the last; "
            "earlier turns are context). Single-turn examples train the same either way."
        },
    )
    dataset_mixture: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Several sources: {datasets: [{path, fraction, format, split, name, role_map}], seed} (on the command line: "
            "JSON, or the path of a YAML/JSON file holding it; `null` drops the config file's mixture). "
            "`fraction` (0, 1] is the share of that source kept, drawn with `seed`."
        },
    )
    eval_split_size: float = field(
        default=0.0,
        metadata={
            "help": "Held-out evaluation split taken from the training data: a fraction in (0, 1), or a count of "
            "examples if >= 1. 0 keeps everything for training."
        },
    )
    max_train_examples: int | None = field(
        default=None, metadata={"help": "Keep only this many training examples (after the split), for quick runs."}
    )
    dataset_seed: int = field(default=42, metadata={"help": "Seed of the mixture sampling and the held-out split."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty `output_dir` that holds another run."}
    )

    def __post_init__(self):
        check_choices(self)
        if isinstance(self.dataset_mixture, str):
            self.dataset_mixture = _read_mixture(self.dataset_mixture)
        if isinstance(self.role_map, str):
            try:
                self.role_map = json.loads(self.role_map)
            except json.JSONDecodeError:
                raise ValueError(
                    f'`role_map` must be a JSON mapping such as {{"doctor": "assistant"}}, got {self.role_map!r}'
                ) from None
        if not 0 <= self.max_dropped_fraction <= 1:
            raise ValueError(f"`max_dropped_fraction` must be in [0, 1], got {self.max_dropped_fraction}.")
        if self.dataset_name is None and self.dataset_mixture is None:
            raise ValueError("Set `dataset_name` or `dataset_mixture`: there is no training data.")
        if self.dataset_name is not None and self.dataset_mixture is not None:
            raise ValueError(
                "Set one of `dataset_name` and `dataset_mixture`, not both (to train on another dataset than the "
                "config file's mixture, add `--dataset_mixture null`)."
            )
        if self.eval_split_size < 0:
            raise ValueError(f"`eval_split_size` must be >= 0, got {self.eval_split_size}.")


@dataclass
class ModelArguments(ModelConfig):
    """TRL's `ModelConfig` with QLoRA defaults: a 4-bit nf4 base with double quantisation and LoRA on all linears."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = field(
        default="auto",
        metadata={
            "help": "dtype of the base's unquantised weights and the 4-bit compute dtype. 'auto' chooses at run time: "
            "bfloat16 where CUDA supports it, float16 on older GPUs, float32 on a CPU."
        },
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the base stays frozen)."})
    load_in_4bit: bool = field(default=True, metadata={"help": "Quantise the base to 4 bits on load (QLoRA)."})
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "Double quantisation of the 4-bit base."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get a LoRA adapter; 'all-linear' means every linear layer but the LM head."},
    )
    tokenizer_pad_token: str | None = field(
        default=None,
        metadata={
            "help": "Padding token. Default: the tokenizer's, unless it is missing or equals the end-of-turn token, "
            "in which case an unused special token is chosen so that padding never masks a real end of turn."
        },
    )

    def __post_init__(self):
        check_choices(self)
        super().__post_init__()


@functools.cache
def _literal_choices(config_type: type) -> dict[str, tuple]:
    """Field name -> the values of its `Literal[...]` type (also inside `Literal[...] | None`)."""
    found = {}
    for name, hint in typing.get_type_hints(config_type).items():
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next((arg for arg in typing.get_args(hint) if typing.get_origin(arg) is Literal), hint)
        if typing.get_origin(hint) is Literal:
            found[name] = typing.get_args(hint)
    return found


def check_choices(config) -> None:
    """Refuse a field value outside the field's choices (its `Literal` type, or `choices` in its metadata), for
    configs built in Python or from a YAML file (argparse checks only the command line): a typo such as
    `mixup_lambda_per: batches` must not run the default."""
    from enum import Enum

    literal = _literal_choices(type(config))
    for spec in fields(config):
        choices = spec.metadata.get("choices") or literal.get(spec.name)
        value = getattr(config, spec.name, None)
        if not choices or value is None:
            continue
        allowed = [c.value if isinstance(c, Enum) else c for c in choices]
        if (value.value if isinstance(value, Enum) else value) not in allowed:
            close = difflib.get_close_matches(str(value), [str(c) for c in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SFTMixError(f"`{spec.name}` must be one of {allowed}, got {value!r}{hint}")


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class SFTConfig(trl.SFTConfig):
    """TRL's `SFTConfig` whose precision follows the device at run time: bf16 where CUDA supports it, else float32.

    TRL turns `bf16` on whenever it is left unset, which on a CPU means slow bf16 autocast; one YAML should run on a
    laptop and on a GPU unchanged. Without CUDA, `use_cpu` is set, so that several CPU processes train as one group.
    """

    # TRL's default is True under the old name, which makes transformers warn on every run that the name is
    # deprecated; unset here, and TRL's True applies under the new name unless the user sets either
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass to save memory (about 20% slower). Default: True, as "
            "in TRL.",
            "nargs": "?",
            "const": True,
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing`, removed in transformers v6 (which warns when it "
            "is set).",
            "nargs": "?",
            "const": True,
        },
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        check_choices(self)
        if self.bf16 is None and not self.fp16:
            self.bf16 = bf16_supported()
        if not torch.cuda.is_available() and not torch.backends.mps.is_available():
            # Without an accelerator, several processes must form a CPU (gloo) group; accelerate's multi-process
            # launcher does not say so, and each process would otherwise train alone as rank 0 of 1
            self.use_cpu = True
        super().__post_init__()


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def parse_args(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple[Any, ...]:
    """Parse `--config file.yaml` plus `--key value` overrides into `dataclass_types`.

    Unlike TRL's own scripts, an unknown key in the YAML or on the command line is an error that names the key:
    a misspelt `learning_rate` must not silently train with the default.
    """
    args = list(sys.argv[1:] if args is None else args)
    known = {f.name for dataclass_type in dataclass_types for f in fields(dataclass_type)}
    unknown = []
    if "--config" in args:
        path = args[args.index("--config") + 1]
        try:
            config = load_yaml(path)
        except FileNotFoundError:
            raise SystemExit(f"error: config file not found: {path}") from None
        except ValueError as error:  # a syntax error, in one line
            raise SystemExit(f"error: {error}") from None
        if not isinstance(config, dict):
            raise SystemExit(f"error: {path} must hold a YAML mapping of keys to values")
        unknown += [f"{key}{_suggest(key, known)} in {path}" for key in config if key not in known and key != "env"]
    flags = [a[2:].split("=")[0] for a in args if a.startswith("--") and a not in ("--config", "--help")]
    flags = [flag for flag in flags if flag not in known and flag.removeprefix("no_") not in known]  # --no_<bool>
    unknown += [f"--{flag}{_suggest(flag, known)} on the command line" for flag in flags]
    if unknown:
        raise SystemExit("error: unknown argument(s): " + "; ".join(unknown))
    try:
        return TrlParser(dataclass_types).parse_args_and_config(args)
    except ValueError as error:  # a dataclass's own validation
        raise SystemExit(f"error: {error}") from None
