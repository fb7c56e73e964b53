"""Merge a LoRA adapter into its base: one standalone model folder that vLLM, TGI, llama.cpp or plain transformers
load without PEFT, that says which weights it ships and what that costs.

A QLoRA adapter was trained against the dequantised 4-bit weights of its base. Two targets:

- `original` (default, as axolotl and unsloth merge): the base's own 16/32-bit weights. The adapter then runs on
  weights it never saw; the shipped model differs from the trained one by the quantisation error, usually a little,
  sometimes enough to swamp the fine-tune.
- `dequantized`: the base quantised with the run's own settings (its `sftmix_run.json`), then dequantised
  (transformers' `dequantize()`): exactly the weights the adapter was trained against, so the merge is the trained
  model, quantisation error included.

`merge` measures what it ships: held-out response perplexity of the merged folder next to base + adapter as trained,
printed and written into the folder's card. Everything that can be refused (the folder to write, the adapter against
the base, the target, the data to measure on) is refused before a weight is loaded or a file written.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sftmix_trl.adapter import adapter_base, check_adapter, load_with_adapter
from sftmix_trl.after_training.hub import merge_figures_table, push_folder, write_merged_card
from sftmix_trl.configs import ModelArguments
from sftmix_trl.errors import EvalError
from sftmix_trl.evaluation.perplexity import load_perplexity_data, recorded_held_out, response_perplexity
from sftmix_trl.model import ModelLoadError, _check_model_path, _resolve_dtype, load_model
from sftmix_trl.run_record import method_of, quantisation_label, read_run_record, trained_model_arguments
from sftmix_trl.runs import check_promised

logger = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")
TARGETS = ("original", "dequantized")
MERGE_RECORD = "sftmix_merge.json"
_MARKER = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
# Conversations on which a template the run trained with and the base's own must render the same text
_PROBES = (
    [{"role": "user", "content": "Q1?"}],
    [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."}],
    [
        {"role": "system", "content": "S."},
        {"role": "user", "content": "Q1?"},
        {"role": "assistant", "content": "A1."},
        {"role": "user", "content": "Q2?"},
    ],
)


class MergeError(ModelLoadError):
    """The adapter cannot be merged as asked; the message says what to change."""


@dataclass
class MergeArguments:
    """What `sftmix-trl merge` merges, into which weights and dtype, what it measures, and where it writes."""

    adapter_path: str = field(
        default=None, metadata={"help": "Folder of the saved LoRA adapter (a training run's `output_dir`)."}
    )
    output_dir: str = field(
        default=None,
        metadata={
            "help": "Folder for the merged model (safetensors), its tokenizer and model card; must be new or empty."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The base model (local folder or Hub id). Default: the base recorded in the adapter "
            "(`base_model_name_or_path` of adapter_config.json)."
        },
    )
    target: str = field(
        default="original",
        metadata={
            "help": "Weights the adapter is merged into. 'original': the base's own 16/32-bit weights (as axolotl "
            "and unsloth merge; a QLoRA adapter then runs on weights it was not trained against, off by the "
            "quantisation error). 'dequantized': the base quantised with the run's settings, then dequantised: the "
            "weights the adapter was trained against, so the merge is the trained model.",
            "choices": list(TARGETS),
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the merged weights. 'auto': for target 'original' the dtype the base checkpoint is "
            "stored in (float32 if it does not say); for 'dequantized' the dtype the run computed in (its "
            "4-bit weights were dequantised to it in every forward pass).",
            "choices": list(DTYPES),
        },
    )
    measure: bool = field(
        default=True,
        metadata={
            "help": "Measure what the merge ships: held-out response perplexity of the merged model and of base + "
            "adapter as trained (the run's 4-bit base), printed and written into the card."
        },
    )
    eval_file: str | None = field(
        default=None,
        metadata={
            "help": "Data to measure on: any source and format the training recipes read. Default: the run's "
            "held-out split (`eval_split_size` in its sftmix_run.json), re-read from its data settings."
        },
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Measure on the first N examples only."})
    bnb_4bit_quant_type: str | None = field(
        default=None,
        metadata={
            "help": "4-bit type of the trained model (target 'dequantized' and the measurement). Default: the run's "
            "(sftmix_run.json); a different value is used with a warning.",
            "choices": ["fp4", "nf4"],
        },
    )
    use_bnb_nested_quant: bool | None = field(
        default=None,
        metadata={"help": "Double quantisation of the trained model. Default: the run's; a different value warns."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Write into a non-empty `output_dir` (its model files are replaced)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the base's own modelling code."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the merged folder to `hub_model_id` once it is saved locally."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository (user/name) to push to."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repository private."})

    def __post_init__(self):
        if not self.adapter_path:
            raise MergeError("`adapter_path` is not set: the folder of the LoRA adapter to merge")
        if not self.output_dir:
            raise MergeError("`output_dir` is not set: where the merged model goes")
        if self.target not in TARGETS:
            raise MergeError(f"`target` must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.dtype not in DTYPES:
            raise MergeError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise MergeError(f"`eval_limit` must be at least 1, got {self.eval_limit}")
        if self.push_to_hub and not self.hub_model_id:
            raise MergeError("push_to_hub is set but `hub_model_id` is not: name the repository (user/name)")

    def quantisation_overrides(self) -> dict:
        return {"bnb_4bit_quant_type": self.bnb_4bit_quant_type, "use_bnb_nested_quant": self.use_bnb_nested_quant}


@dataclass
class MergeFigures:
    """Held-out response perplexity of a merged model next to base + adapter as trained, on the same examples."""

    data: str  # what was scored, in words
    examples: int
    tokens: int
    merged_perplexity: float
    trained_perplexity: float
    seconds: float

    @property
    def difference(self) -> float:
        return self.merged_perplexity - self.trained_perplexity


@dataclass
class MergedModel:
    """What a merged folder holds, recorded beside it (`sftmix_merge.json`) for its card and for tools that take
    the folder further (export)."""

    base: str
    adapter: str
    method: str
    target: str
    dtype: str
    trained_as: str  # how the run loaded the base the adapter was trained against
    quantised: bool  # whether that base was quantised (else both targets are the trained model)
    lora: dict
    figures: MergeFigures | None = None

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MERGE_RECORD
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> MergedModel:
        path = Path(os.path.expanduser(str(folder))) / MERGE_RECORD
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise MergeError(
                f"{folder} is no folder written by `sftmix-trl merge` (no readable {MERGE_RECORD})"
            ) from None
        figures = values.pop("figures", None)
        return cls(**values, figures=MergeFigures(**figures) if figures else None)


def strip_generation_markers(template: str) -> str:
    """The template without TRL's `{% generation %}` / `{% endgeneration %}` tags (they only mark trained tokens)."""
    return _MARKER.sub("", template)


def _renders_same(tokenizer, first: str, second: str) -> bool:
    try:
        return all(
            tokenizer.apply_chat_template(p, tokenize=False, chat_template=first, add_generation_prompt=g)
            == tokenizer.apply_chat_template(p, tokenize=False, chat_template=second, add_generation_prompt=g)
            for p in _PROBES
            for g in (False, True)
        )
    except Exception:  # a template that refuses a probe (e.g. a system message): cannot tell they agree
        return False


def serving_chat_template(tokenizer, trained: str | None, base: str | None) -> str | None:
    """The chat template to ship: the base's own where it renders what the run trained with (the usual case: the
    run only added `{% generation %}` markers), else the trained template without its markers."""
    if not trained:
        return base
    if base and _renders_same(tokenizer, strip_generation_markers(trained), base):
        return base
    return strip_generation_markers(trained)


def _check_output_dir(output_dir: str, adapter_path: str, overwrite: bool) -> Path:
    out, adapter = Path(os.path.expanduser(output_dir)), Path(os.path.expanduser(adapter_path))
    if out.exists() and adapter.exists() and out.resolve() == adapter.resolve():
        raise MergeError("`output_dir` is the adapter folder: write the merged model to a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"output_dir {out} is not empty: choose a new folder or pass `--overwrite_output_dir true`")
    return out


def _stored_dtype(base_path: str, base_name: str, trust_remote_code: bool) -> torch.dtype:
    """The dtype the base checkpoint is stored in; a checkpoint that is itself quantised is refused."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        method = dict(config.quantization_config).get("quant_method", "quantized")
        raise MergeError(
            f"the base {base_name} is a {method} checkpoint: merge into the unquantised model it was "
            "made from (a LoRA merged into quantised weights is rounded away or wrong)"
        )
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _checked_base(adapter_path: str, model_name_or_path: str | None, trust_remote_code: bool):
    """The base to merge into (name, local path or Hub id, stored dtype) and the adapter's config, once the adapter is
    checked against it: refused in one line, before any weight is loaded."""

    base_name = model_name_or_path or adapter_base(adapter_path)
    if not base_name:
        raise MergeError(f"{adapter_path} records no base model: set `model_name_or_path`")
    base_path = _check_model_path(base_name)
    lora = check_adapter(adapter_path, ModelArguments(model_name_or_path=base_name), trust_remote_code)
    return base_name, base_path, lora, _stored_dtype(base_path, base_name, trust_remote_code)


def _is_quantised(trained_as: ModelArguments) -> bool:
    return bool(trained_as.load_in_4bit or trained_as.load_in_8bit)


def _check_target(target: str, trained_as: ModelArguments) -> None:
    if target not in TARGETS:
        raise MergeError(f"`target` must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "dequantized" and not _is_quantised(trained_as):
        raise MergeError(
            "target 'dequantized' needs a run trained on a quantised base, and this one trained on the unquantised "
            "base (load_in_4bit false): target 'original' is the model it trained"
        )


def _load_target_base(target: str, base_path: str, dtype: torch.dtype, trained_as: ModelArguments, trust: bool):
    """The base weights to merge into: the checkpoint's own, or the run's quantised weights dequantised."""
    from transformers import AutoModelForCausalLM

    if target == "original":
        logger.info("loading %s in %s (unquantised)", base_path, dtype)
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust)
    logger.info(
        "loading %s as the run did (%s), then dequantising to %s", base_path, quantisation_label(trained_as), dtype
    )
    model = load_model(trained_as, trust)  # the run's loader: same quantisation, same dtype, the repack guard
    model = model.dequantize(dtype=dtype)
    return model.to(dtype)  # the modules left unquantised (embeddings, norms, LM head) too


def merge_adapter(
    adapter_path: str,
    output_dir: str,
    *,
    target: str = "original",
    dtype: str = "auto",
    model_name_or_path: str | None = None,
    overwrite_output_dir: bool = False,
    trust_remote_code: bool = False,
    trained_as: ModelArguments | None = None,
) -> Path:
    """Merge the adapter into the `target` weights of its base and save a standalone folder (safetensors, tokenizer
    with a serving chat template, `sftmix_merge.json`, a card without figures); return the folder.

    `trained_as`: how the run loaded its base (default: from the adapter's `sftmix_run.json`,
    `run_record.trained_model_arguments`); it makes the 'dequantized' target and names what the adapter saw.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise MergeError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = _check_output_dir(output_dir, adapter_path, overwrite_output_dir)
    base_name, base_path, lora, stored = _checked_base(adapter_path, model_name_or_path, trust_remote_code)
    trained_as = trained_as or trained_model_arguments(adapter_path, base_name)[0]
    _check_target(target, trained_as)
    if dtype != "auto":
        merged_dtype = getattr(torch, dtype)
    else:
        merged_dtype = stored if target == "original" else _resolve_dtype(trained_as)
    adapter = Path(os.path.expanduser(adapter_path))

    base = _load_target_base(target, base_path, merged_dtype, trained_as, trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload(safe_merge=True)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)  # safetensors
    del base, merged
    gc.collect()

    base_tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    has_own = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=trust_remote_code) if has_own else None
    tokenizer = tokenizer or base_tokenizer
    tokenizer.chat_template = serving_chat_template(tokenizer, tokenizer.chat_template, base_tokenizer.chat_template)
    tokenizer.save_pretrained(out)
    record = MergedModel(
        base=base_name,
        adapter=adapter_path,
        method=method_of(adapter_path),
        target=target,
        dtype=str(merged_dtype).removeprefix("torch."),
        trained_as=quantisation_label(trained_as),
        quantised=_is_quantised(trained_as),
        lora={key: lora.get(key) for key in ("r", "lora_alpha", "target_modules")},
    )
    record.save(out)
    write_merged_card(str(out), record)
    logger.info("merged model (target %s) saved to %s", target, out)
    return out


def merge_eval_data(adapter_path: str, eval_file: str | None = None, limit: int | None = None):
    """The examples a merge is measured on and their description: `eval_file` (any training-format source) if given,
    else the run's held-out split re-read from its recorded data settings. A MergeError says what to give when there
    is neither."""

    if eval_file:
        dataset = load_perplexity_data(eval_file, limit=limit)
        return dataset, f"`{Path(eval_file).name}` ({len(dataset)} examples)"
    try:
        return recorded_held_out(adapter_path, limit)
    except EvalError as error:
        raise MergeError(f"{error}. Instead: `--eval_file` (any training-format file) or `--measure false`") from None


def _scoring_settings(adapter_path: str) -> tuple[int, int]:
    """Batch size and longest sequence of the measurement: the run's evaluation settings (what fitted then)."""
    config = (read_run_record(adapter_path) or {}).get("config") or {}
    return int(config.get("per_device_eval_batch_size") or 8), int(config.get("max_length") or 2048)


def measure_merge(
    merged_dir: str,
    *,
    eval_file: str | None = None,
    eval_limit: int | None = None,
    data=None,
    trained_as: ModelArguments | None = None,
    trust_remote_code: bool = False,
) -> MergeFigures:
    """Held-out response perplexity of the merged folder (loaded as a user loads it) and of base + adapter as the run
    trained them, on the same examples: `data` ((dataset, description) from `merge_eval_data`), else `eval_file`,
    else the run's held-out split."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = MergedModel.load(merged_dir)
    dataset, description = data or merge_eval_data(record.adapter, eval_file, eval_limit)
    trained_as = trained_as or trained_model_arguments(record.adapter, record.base)[0]
    batch_size, max_length = _scoring_settings(record.adapter)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # only pads left-padded rows under an attention mask here
        tokenizer.pad_token = tokenizer.eos_token
    start = time.perf_counter()

    trained = load_with_adapter(trained_as, record.adapter, trust_remote_code)
    trained_metrics, _ = response_perplexity(trained, tokenizer, dataset, batch_size, max_length, "as trained")
    del trained
    gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=trust_remote_code)
    merged.to(PartialState().device).eval()
    merged_metrics, _ = response_perplexity(merged, tokenizer, dataset, batch_size, max_length, "merged")
    del merged
    gc.collect()
    return MergeFigures(
        data=description,
        examples=trained_metrics["n"],
        tokens=trained_metrics["tokens"],
        merged_perplexity=merged_metrics["perplexity"],
        trained_perplexity=trained_metrics["perplexity"],
        seconds=round(time.perf_counter() - start, 1),
    )


def merge(args: MergeArguments) -> Path:
    """`sftmix-trl merge`: merge, measure what is shipped, write the figures into the card, publish if asked."""

    _check_output_dir(args.output_dir, args.adapter_path, args.overwrite_output_dir)
    base_name = _checked_base(args.adapter_path, args.model_name_or_path, args.trust_remote_code)[0]
    trained_as, _ = trained_model_arguments(args.adapter_path, base_name, args.quantisation_overrides())
    _check_target(args.target, trained_as)
    data = merge_eval_data(args.adapter_path, args.eval_file, args.eval_limit) if args.measure else None
    out = merge_adapter(
        args.adapter_path,
        args.output_dir,
        target=args.target,
        dtype=args.dtype,
        model_name_or_path=base_name,
        overwrite_output_dir=args.overwrite_output_dir,
        trust_remote_code=args.trust_remote_code,
        trained_as=trained_as,
    )
    if args.measure:
        record = MergedModel.load(out)
        record.figures = measure_merge(
            str(out), data=data, trained_as=trained_as, trust_remote_code=args.trust_remote_code
        )
        record.save(out)
        write_merged_card(str(out), record)
        logger.info("what the merge ships, held-out response perplexity:\n%s", merge_figures_table(record))
    weights = (
        "model.safetensors.index.json" if (out / "model.safetensors.index.json").is_file() else "model.safetensors"
    )
    check_promised(out, (weights, "config.json", "tokenizer_config.json", "README.md", MERGE_RECORD), "merge")
    if args.push_to_hub:
        logger.info("pushed to %s", push_folder(str(out), args.hub_model_id, private=args.hub_private_repo))
    return out
