"""A quick look at what a model (or base + adapter) answers: replies to prompts through the chat template the run
trained with (the tokenizer saved beside the adapter), or `chat_template_path`.

For a user's first "did it learn anything" check after training; figures come from `evaluate`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from sftmix_trl.adapter import adapter_base, check_adapter, load_with_adapter
from sftmix_trl.model import ModelLoadError, load_tokenizer

logger = logging.getLogger(__name__)


class GenerateError(ModelLoadError):
    """Bad `generate` input (no prompt, unreadable prompts file); the message says what to change."""


@dataclass
class GenerateArguments:
    """What `sftmix-trl generate` answers and how (the base itself comes from `ModelArguments`)."""

    adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a saved LoRA adapter to put on the base (unset: the base alone). Without "
            "`model_name_or_path`, the base the adapter records is used."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A .jinja chat template to render the prompts with. Default: the template saved in "
            "`adapter_path` with the run's tokenizer (the one it trained with), else the base's."
        },
    )
    prompt: list[str] = field(
        default_factory=list, metadata={"help": "Prompts to answer, each one user turn (several: repeat the value)."}
    )
    prompts_file: str | None = field(
        default=None,
        metadata={"help": 'More prompts: a .txt file (one per line) or a .json/.jsonl file of {"prompt": ...}.'},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "A system message before every prompt."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest reply, in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding (the default)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (with `do_sample`)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass (with `do_sample`)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling (with `do_sample`)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts answered together."})
    output_file: str | None = field(
        default=None, metadata={"help": "Also write {prompt, reply} records to this .jsonl file."}
    )

    def __post_init__(self):
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if not self.prompt and not self.prompts_file:
            raise GenerateError('nothing to answer: pass `--prompt "..."` or `--prompts_file FILE`')
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise GenerateError(f"`{name}` must be >= 1, got {getattr(self, name)}")


def read_prompts(args: GenerateArguments) -> list[str]:
    """`--prompt` values, then the prompts of `--prompts_file`."""
    prompts = list(args.prompt)
    if not args.prompts_file:
        return prompts
    path = Path(os.path.expanduser(args.prompts_file))
    if not path.is_file():
        raise GenerateError(f"prompts file not found: {args.prompts_file}")
    if path.suffix == ".txt":
        return prompts + [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in (".json", ".jsonl"):
        raise GenerateError(f"{path}: expected a .txt, .json or .jsonl prompts file")
    text = path.read_text(encoding="utf-8")
    try:
        records = (
            json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as error:
        raise GenerateError(f"{path}: malformed JSON ({error.msg}, line {error.lineno})") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise GenerateError(f"{path}, record {number}: missing field 'prompt' (a string)")
        prompts.append(record["prompt"])
    return prompts


def _stop_ids(model, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


@torch.no_grad()
def generate_replies(
    model,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    **sampling,
) -> list[str]:
    """Replies to chat conversations, rendered with the tokenizer's chat template, in batches; greedy unless
    `sampling` says `do_sample=True` (with `temperature`, `top_p`).

    Batches are left-padded, so that every row's reply starts at the same column; the tokenizer's own padding side
    (right, for training) is restored afterwards. Generation stops at the tokenizer's and the model's end tokens.
    """
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))  # similar lengths together: less padding
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=bool(sampling.get("do_sample")),
        temperature=sampling.get("temperature") if sampling.get("do_sample") else None,
        top_p=sampling.get("top_p") if sampling.get("do_sample") else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_stop_ids(model, tokenizer),
    )
    device = next(model.parameters()).device
    replies: list[str] = [""] * len(texts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=len(order) <= batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(**batch.to(device), generation_config=config)
            decoded = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, reply in zip(rows, decoded):
                replies[i] = reply
    finally:
        tokenizer.padding_side = side
    return replies


def generate(args: GenerateArguments, model_args) -> list[dict]:
    """Load the base (and adapter) as `evaluate` does, answer every prompt, print and return the replies."""

    prompts = read_prompts(args)
    if args.adapter_path and not model_args.model_name_or_path:
        model_args.model_name_or_path = adapter_base(args.adapter_path)
    trust = bool(getattr(model_args, "trust_remote_code", False))
    if args.adapter_path:
        check_adapter(args.adapter_path, model_args, trust)
    tokenizer = load_tokenizer(model_args, trust, args.chat_template_path, adapter_path=args.adapter_path)
    model = load_with_adapter(model_args, args.adapter_path, trust)
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    conversations = [[*system, {"role": "user", "content": p}] for p in prompts]
    torch.manual_seed(args.seed)
    replies = generate_replies(
        model,
        tokenizer,
        conversations,
        args.max_new_tokens,
        args.batch_size,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    records = [{"prompt": p, "reply": r} for p, r in zip(prompts, replies)]
    for record in records:
        print(f"### {record['prompt']}\n{record['reply']}\n", flush=True)
    if args.output_file:
        Path(args.output_file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records
