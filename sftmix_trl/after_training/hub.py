"""Model cards and Hub publishing of a trained adapter.

Recipes train with `push_to_hub` off in the trainer (transformers would create the Hub repository before training
starts, so an offline machine would fail before doing any work) and publish here once everything is saved locally.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from enum import Enum
from pathlib import Path

from sftmix_trl import __version__
from sftmix_trl.errors import SFTMixError
from sftmix_trl.run_record import UNRECORDED
from sftmix_trl.runs import redact

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
SFTMIX_CITATION = (
    'SFTMix adds a confidence-aware Mixup regulariser to next-token prediction: Xiao et al., "SFTMix: Elevating '
    'Language Model Instruction Tuning with Mixup Recipe", [arXiv:2410.05248](https://arxiv.org/abs/2410.05248).'
)
UPLOAD_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.model", "*.txt", "README.md", "*.png"]


class PublishError(SFTMixError, RuntimeError):
    """The Hub refused or could not take the upload; the message says why."""


def _is_local_model(base_model: str) -> bool:
    """A local folder (or anything that is not a Hub id) is no valid `base_model`: the Hub refuses the card's commit."""
    return os.path.isdir(os.path.expanduser(base_model)) or not _REPO_ID.fullmatch(base_model)


def _front_matter(base_model: str, datasets: list[str], tags: list[str]) -> str:
    lines = ["---", "library_name: peft"]
    if not _is_local_model(base_model):
        lines.append(f"base_model: {base_model}")
    lines.append("pipeline_tag: text-generation")
    if datasets:
        lines += ["datasets:"] + [f"- {d}" for d in datasets]
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    return "\n".join(lines)


def usage_section(extra_import: str, model_class: str, name: str) -> str:
    """A card's "Use" block: load `name` with `model_class` and answer one chat turn through its template."""
    imports = (
        f"{extra_import}\nfrom transformers import AutoTokenizer"
        if extra_import
        else (f"from transformers import {model_class}, AutoTokenizer")
    )
    return f"""## Use

```python
{imports}

model = {model_class}.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
messages = [{{"role": "user", "content": "What are common symptoms of anaemia?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
print(tokenizer.decode(model.generate(inputs, max_new_tokens=128)[0][inputs.shape[1]:], skip_special_tokens=True))
```
"""


def write_model_card(
    output_dir: str,
    *,
    base_model: str,
    datasets: list[str],
    method: str,
    settings: dict,
    launch_line: str,
    sections: list[str] = (),
    hub_model_id: str | None = None,
) -> Path:
    """Write `README.md` for the adapter in `output_dir`: what it is, how it was trained, how to use it."""

    repo = hub_model_id or Path(output_dir).name
    tags = ["trl", "peft", "lora", "qlora", "sft"] + (["sftmix"] if method == "SFTMix" else [])
    settings_rows = "\n".join(f"| `{k}` | `{_plain(v)}` |" for k, v in settings.items())
    repository = repository_url()
    package = f"[sftmix-trl]({repository}) {__version__}" if repository else f"sftmix-trl {__version__}"
    if _is_local_model(base_model):
        base = f"`{base_model}` (a local model)"
    else:
        base = f"[{base_model}](https://huggingface.co/{base_model})"
    body = f"""# {repo}

A LoRA adapter for {base} fine-tuned with **{method}**
using the Python package {package} on TRL's `SFTTrainer`.
{SFTMIX_CITATION if method == "SFTMix" else ""}

## Training settings

| setting | value |
| --- | --- |
{settings_rows}

{chr(10).join(sections)}

## Reproduce

```bash
pip install "sftmix-trl=={__version__}"
{redact(launch_line)}
```

{usage_section("from peft import AutoPeftModelForCausalLM", "AutoPeftModelForCausalLM", repo)}"""
    path = Path(output_dir) / "README.md"
    path.write_text(_front_matter(base_model, datasets, tags) + redact(body))
    return path


def push_folder(
    output_dir: str,
    repo_id: str | None,
    *,
    private: bool | None = None,
    token: str | None = None,
    extra_patterns: list[str] = (),
    api=None,
) -> str:
    """Upload the adapter, tokenizer, card and plots of `output_dir` to `repo_id`; return the repository URL.

    Raises `PublishError` with one readable line when there is no repository id, no token or no network; the local
    folder is complete before this is called, so nothing is lost.
    """
    if not repo_id:
        raise PublishError("push_to_hub is set but `hub_model_id` is not: name the repository (user/name)")
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    token = token or get_token()
    if token is None and api is None:
        raise PublishError(
            f"push_to_hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN); the adapter is saved in "
            f"{output_dir} and can be pushed later"
        )
    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            allow_patterns=UPLOAD_PATTERNS + list(extra_patterns),
            ignore_patterns=["checkpoint-*", "confidence/snapshots/*", "*.tmp"],
            commit_message="Upload adapter trained with sftmix-trl",
        )
    except Exception as error:
        raise PublishError(
            f"push_to_hub to {repo_id} failed ({type(error).__name__}: {redact(str(error))[:300]}); the adapter "
            f"is saved in {output_dir} and can be pushed later"
        ) from None
    return str(getattr(url, "url", url))


def _plain(value):
    """An enum setting as the value a user writes in the YAML (`cosine`, not `SchedulerType.COSINE`)."""
    return value.value if isinstance(value, Enum) else value


def repository_url() -> str | None:
    """The source repository to link from model cards: the installed package's `Repository` project URL
    (`[project.urls]` in pyproject.toml), or None. A card never links a repository that is not configured."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("sftmix-trl").get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("repository", "source") and url.strip():
            return url.strip()
    return None


def _accelerate_launcher_args() -> list[str] | None:
    """The arguments of the `accelerate launch` that started this process (its parent), or None.

    `accelerate launch` passes neither its config file nor its command line to the processes it starts, so the
    launcher's own command line is read from /proc (Linux); elsewhere the card falls back to this process's arguments.
    """
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]
    for i, arg in enumerate(argv):
        if arg == "accelerate.commands.launch" or (
            arg == "launch" and i > 0 and Path(argv[i - 1]).name == "accelerate"
        ):
            return argv[i + 1 :]
    return None


def launch_line(recipe: str) -> str:
    """The exact command that started this run: the `accelerate launch` line with its options (config file,
    processes, ranks) when accelerate launched it, else the command of this process."""
    launcher = _accelerate_launcher_args()
    if launcher is not None:
        line = "accelerate launch " + shlex.join(launcher)
        if "--config_file" not in launcher:
            from accelerate.commands.config import default_config_file

            if os.path.isfile(default_config_file):  # what accelerate read instead: a file of this machine only
                line += f"  # accelerate config: {default_config_file}"
        return line
    program, command = Path(sys.argv[0]), Path(recipe).stem
    if program.name == "sftmix-trl":  # `sftmix_trl.cli` took the command out of sys.argv
        line = f"sftmix-trl {command}"
    elif program.name == "cli.py" and program.parent.name == "sftmix_trl":
        line = f"python -m sftmix_trl.cli {command}"
    else:
        line = f"python {shlex.quote(sys.argv[0]) if sys.argv[0] else f'recipes/{recipe}'}"
    return f"{line} {shlex.join(sys.argv[1:])}".rstrip()


def dataset_names(script_args) -> list[str]:
    if script_args.dataset_mixture:
        return [entry["path"] for entry in script_args.dataset_mixture["datasets"]]
    return [script_args.dataset_name]


CARD_FIELDS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "seed",
    "mixup_alpha",
    "mixup_weight",
    "mixup_lambda_per",
    "confident_fraction",
    "reference_epochs",
    "num_confidence_checkpoints",
)


def card_settings(training_args, model_args) -> dict:
    settings = {name: _plain(getattr(training_args, name)) for name in CARD_FIELDS if hasattr(training_args, name)}
    settings["world_size"] = training_args.world_size
    settings.update(
        load_in_4bit=model_args.load_in_4bit,
        lora_r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        lora_target_modules=model_args.lora_target_modules,
    )
    return settings


def merge_figures_table(merged) -> str:
    """The merge's figures as a small markdown table (a `merge.MergedModel` with figures): what the card shows and
    `sftmix-trl merge` prints."""
    figures = merged.figures
    relative = figures.difference / figures.trained_perplexity if figures.trained_perplexity else float("nan")
    return (
        f"| target | merged | base + adapter as trained ({merged.trained_as}) | difference |\n"
        "| --- | --- | --- | --- |\n"
        f"| {merged.target} ({merged.dtype}) | {figures.merged_perplexity:.4f} | {figures.trained_perplexity:.4f} | "
        f"{figures.difference:+.4f} ({relative:+.2%}) |"
    )


def _merge_target_text(merged) -> str:
    if not merged.quantised:
        return f"The run trained on the unquantised base ({merged.trained_as}): this merge is the trained model."
    if merged.target == "dequantized":
        return (
            f"Merged into the weights the adapter was trained against: the base quantised as the run loaded it "
            f"({merged.trained_as}), dequantised to {merged.dtype}. This is the trained model, quantisation error "
            "included."
        )
    return (
        f"Merged into the base's original weights ({merged.dtype}). The adapter was trained against their "
        f"quantised form ({merged.trained_as}), so this model differs from the trained one by the quantisation "
        "error; `sftmix-trl merge --target dequantized` ships the trained model itself."
    )


def merge_card_section(merged) -> str:
    """What the merged folder ships (its target) and, when measured, what that costs in held-out perplexity."""
    text = f"## What this merge ships\n\n{_merge_target_text(merged)}\n"
    figures = merged.figures
    if figures is None:
        return text + "\nHeld-out perplexity not measured (`sftmix-trl merge` measures it unless `--measure false`).\n"
    return (
        f"{text}\nHeld-out response perplexity (lower is better) on {figures.data}, {figures.tokens} response "
        f"tokens:\n\n{merge_figures_table(merged)}\n"
    )


def write_merged_card(output_dir: str, merged) -> Path:
    """README.md of a merged model (a `merge.MergedModel`): what it is made of, which weights it ships and what that
    costs, how to load it."""

    name = Path(output_dir).name
    local = _is_local_model(merged.base)
    sftmix = merged.method == "SFTMix"
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    front += [] if local else [f"base_model: {merged.base}", "base_model_relation: finetune"]
    front += ["tags:", "- trl", "- sft", "- lora", "- merged"] + (["- sftmix"] if sftmix else []) + ["---"]
    base_text = (
        f"`{merged.base}` (a local model)" if local else f"[{merged.base}](https://huggingface.co/{merged.base})"
    )
    trained = (
        "The adapter folder does not record how it was trained (no sftmix_run.json)."
        if merged.method == UNRECORDED
        else f"The adapter was trained with **{merged.method}** using sftmix-trl on TRL's `SFTTrainer`."
    )
    lora = merged.lora
    body = f"""
# {name}

{base_text} with the LoRA adapter `{merged.adapter}` merged into its weights ({merged.dtype}): a standalone model, no
PEFT needed. {trained}
{SFTMIX_CITATION if sftmix else ""}

| | |
| --- | --- |
| base | {merged.base} |
| adapter | {merged.adapter} |
| method | {merged.method} |
| LoRA | r {lora.get("r")}, alpha {lora.get("lora_alpha")}, modules {lora.get("target_modules")} |
| trained against | {merged.trained_as} |
| merge target | {merged.target} |
| merged dtype | {merged.dtype} |

{merge_card_section(merged)}
{usage_section("", "AutoModelForCausalLM", name)}
or serve the folder: `vllm serve {name}`.
"""
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(front) + "\n" + redact(body))
    return path
