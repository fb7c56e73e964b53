"""Merge a LoRA adapter into its base: one standalone model folder that vLLM, TGI, llama.cpp or plain transformers
load without PEFT.

The base is loaded unquantised, in the dtype asked for: merging into a 4-bit base would round the merged weights to
4 bits, or (dequantised on the way) leave weights that differ from the ones the adapter was trained against; the
adapter of a QLoRA run is merged into the 16/32-bit base it was quantised from, as axolotl, LLaMA-Factory and unsloth
do. Everything that can be refused (the folder to write, the adapter against the base) is refused before a weight
is loaded or a file written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import ModelLoadError, _check_model_path

logger = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")
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
UNRECORDED = "LoRA fine-tuning (method not recorded)"
METHODS = {"sftmix.py": "SFTMix", "sft.py": "NTP (supervised fine-tuning)", "confidence.py": "NTP (SFTMix reference)"}


class MergeError(ModelLoadError):
    """The adapter cannot be merged as asked; the message says what to change."""


@dataclass
class MergeArguments:
    """What `sftmix-trl merge` merges, in which dtype, and where it writes."""

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
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the merged weights; the base is loaded unquantised in it (never in 4 bits). 'auto': "
            "the dtype the base checkpoint is stored in (float32 if it does not say).",
            "choices": list(DTYPES),
        },
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
        if self.dtype not in DTYPES:
            raise MergeError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.push_to_hub and not self.hub_model_id:
            raise MergeError("push_to_hub is set but `hub_model_id` is not: name the repository (user/name)")


def adapter_base(adapter_path: str) -> str | None:
    """The base model an adapter folder records (None if it records none)."""
    config = Path(os.path.expanduser(adapter_path)) / "adapter_config.json"
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path") or None
    except (OSError, json.JSONDecodeError):
        return None  # `check_adapter` says what is wrong with the folder


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


def _check_output_dir(args: MergeArguments) -> None:
    out, adapter = Path(os.path.expanduser(args.output_dir)), Path(os.path.expanduser(args.adapter_path))
    if out.exists() and adapter.exists() and out.resolve() == adapter.resolve():
        raise MergeError("`output_dir` is the adapter folder: write the merged model to a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise MergeError(f"output_dir {out} is not empty: choose a new folder or pass `--overwrite_output_dir true`")


def _base_dtype(base_path: str, args: MergeArguments) -> torch.dtype:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=args.trust_remote_code)
    if getattr(config, "quantization_config", None):
        method = dict(config.quantization_config).get("quant_method", "quantized")
        raise MergeError(
            f"the base {args.model_name_or_path} is a {method} checkpoint: merge into the unquantised model it was "
            "made from (a LoRA merged into quantised weights is rounded away or wrong)"
        )
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _method(adapter: Path) -> str:
    try:
        recipe = json.loads((adapter / "sftmix_run.json").read_text()).get("recipe")
    except (OSError, json.JSONDecodeError):
        return UNRECORDED
    return METHODS.get(recipe, f"LoRA fine-tuning ({recipe})")


def write_merged_card(
    output_dir: str, *, base: str, adapter: str, method: str, dtype: torch.dtype, lora: dict
) -> Path:
    """README.md of the merged model: what it is made of and how to load it."""
    from .hub import SFTMIX_CITATION, _is_local_model, redact

    name = Path(output_dir).name
    local = _is_local_model(base)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    front += [] if local else [f"base_model: {base}", "base_model_relation: finetune"]
    front += ["tags:", "- trl", "- sft", "- lora", "- merged"] + (["- sftmix"] if method == "SFTMix" else []) + ["---"]
    base_text = f"`{base}` (a local model)" if local else f"[{base}](https://huggingface.co/{base})"
    dtype_name = str(dtype).removeprefix("torch.")
    trained = (
        "The adapter folder does not record how it was trained (no sftmix_run.json)."
        if method == UNRECORDED
        else f"The adapter was trained with **{method}** using sftmix-trl on TRL's `SFTTrainer`."
    )
    body = f"""
# {name}

{base_text} with the LoRA adapter `{adapter}` merged into its weights ({dtype_name}): a standalone model, no PEFT
needed. {trained}
{SFTMIX_CITATION if method == "SFTMix" else ""}

| | |
| --- | --- |
| base | {base} |
| adapter | {adapter} |
| method | {method} |
| LoRA | r {lora.get("r")}, alpha {lora.get("lora_alpha")}, modules {lora.get("target_modules")} |
| merged dtype | {dtype_name} |

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
messages = [{{"role": "user", "content": "What are common symptoms of anaemia?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
print(tokenizer.decode(model.generate(inputs, max_new_tokens=128)[0][inputs.shape[1]:], skip_special_tokens=True))
```

or serve the folder: `vllm serve {name}`.
"""
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(front) + "\n" + redact(body))
    return path


def merge(args: MergeArguments) -> Path:
    """Merge `args.adapter_path` into its base and save the standalone model; return the output folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .configs import ModelArguments
    from .evaluation.modeling import check_adapter

    args.model_name_or_path = args.model_name_or_path or adapter_base(args.adapter_path)
    if not args.model_name_or_path:
        raise MergeError(f"{args.adapter_path} records no base model: set `model_name_or_path`")
    _check_output_dir(args)
    base_path = _check_model_path(args.model_name_or_path)
    lora = check_adapter(args.adapter_path, ModelArguments(model_name_or_path=args.model_name_or_path))
    dtype = _base_dtype(base_path, args)
    adapter = Path(os.path.expanduser(args.adapter_path))

    logger.info("loading %s in %s (unquantised)", args.model_name_or_path, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=args.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload(safe_merge=True)
    out = Path(os.path.expanduser(args.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)  # safetensors

    base_tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=args.trust_remote_code)
    has_own = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=args.trust_remote_code) if has_own else None
    tokenizer = tokenizer or base_tokenizer
    tokenizer.chat_template = serving_chat_template(tokenizer, tokenizer.chat_template, base_tokenizer.chat_template)
    tokenizer.save_pretrained(out)
    write_merged_card(
        str(out),
        base=args.model_name_or_path,
        adapter=args.adapter_path,
        method=_method(adapter),
        dtype=dtype,
        lora=lora,
    )
    logger.info("merged model saved to %s", out)
    if args.push_to_hub:
        from .hub import push_folder

        logger.info("pushed to %s", push_folder(str(out), args.hub_model_id, private=args.hub_private_repo))
    return out
