"""Does the exported GGUF answer like the model that was trained? The merged model and the GGUF (read back through
transformers' GGUF loader, dequantised) side by side: held-out response perplexity of each, the GGUF tokenizer's
rendering of the prompts against the trained template's, and greedy agreement on a few prompts."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from sftmix_trl.evaluation.perplexity import response_perplexity

logger = logging.getLogger(__name__)


@torch.no_grad()
def greedy_tokens(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids) of each conversation rendered with the tokenizer's chat template."""
    stop = sorted({i for i in (tokenizer.eos_token_id, model.generation_config.eos_token_id) if isinstance(i, int)})
    replies = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        replies.append(output[0, ids.shape[1] :].tolist())
    return replies


def agreement(reference: list[int], other: list[int]) -> float:
    """Length of the common start of two continuations over the longer one's (1: identical)."""
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / max(len(reference), len(other), 1)


def _free(model) -> None:
    del model
    gc.collect()


def compare_export(
    merged_dir: Path, gguf_file: Path, dataset, max_new_tokens: int = 32, num_prompts: int = 4, batch_size: int = 8,
    max_length: int = 2048,
) -> dict:  # fmt: skip
    """Figures of the merged model and of the GGUF on the same held-out examples; the greedy prompts are the prompts
    of the first `num_prompts` examples, rendered with the merged folder's (trained) template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    conversations = [example["prompt"] for example in dataset.select(range(min(num_prompts, len(dataset))))]
    figures = {}
    logger.info("check: the merged model on %d held-out examples", len(dataset))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    figures["merged"], _ = response_perplexity(merged, tokenizer, dataset, batch_size, max_length, "merged model")
    reference = greedy_tokens(merged, tokenizer, conversations, max_new_tokens)
    _free(merged)

    logger.info("check: the GGUF through transformers' GGUF loader (dequantised)")
    folder, name = str(gguf_file.parent), gguf_file.name
    exported = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    figures["gguf"], _ = response_perplexity(exported, tokenizer, dataset, batch_size, max_length, "GGUF")
    others = greedy_tokens(exported, tokenizer, conversations, max_new_tokens)
    _free(exported)

    rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    gguf_rendered = [
        gguf_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations
    ]
    same_ids = [
        tokenizer(text, add_special_tokens=False)["input_ids"] == gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in rendered
    ]  # fmt: skip
    shares = [agreement(a, b) for a, b in zip(reference, others)]
    return {
        "perplexity_merged": figures["merged"]["perplexity"],
        "perplexity_gguf": figures["gguf"]["perplexity"],
        "perplexity_increase": figures["gguf"]["perplexity"] / figures["merged"]["perplexity"] - 1,
        "examples": figures["merged"]["n"],
        "response_tokens": figures["merged"]["tokens"],
        "template_renders_same": rendered == gguf_rendered,
        "tokenizer_encodes_same": all(same_ids),
        "greedy_identical": sum(a == b for a, b in zip(reference, others)),
        "greedy_prompts": len(reference),
        "greedy_agreement": sum(shares) / len(shares) if shares else float("nan"),
        "greedy": [
            {"prompt": rendered[i], "merged": tokenizer.decode(reference[i]), "gguf": tokenizer.decode(others[i])}
            for i in range(len(reference))
        ],
    }
