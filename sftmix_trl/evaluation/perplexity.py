"""Held-out response perplexity: how well the model predicts the reference responses of a dataset.

Each example is rendered with the tokenizer's chat template as in training; the response tokens are everything the
template adds after the generation prompt (the reply, its end-of-turn token and any text the template appends), the
tokens TRL's completion-only loss trains on.
"""

from __future__ import annotations

import math

from datasets import Dataset

from ..configs import ScriptArguments
from ..data import load_datasets
from .errors import EvalError
from .modeling import continuation_log_probs


def load_perplexity_data(
    path: str,
    fmt: str = "auto",
    split: str = "train",
    held_out: float = 0.0,
    seed: int = 42,
    limit: int | None = None,
) -> Dataset:
    """Examples read by `sftmix_trl.data` (any source and format it reads); with `held_out`, only that split."""
    # `render` scores the completion after one prompt: a conversation is scored on its last assistant turn
    args = ScriptArguments(
        dataset_name=path,
        dataset_format=fmt,
        dataset_train_split=split,
        eval_split_size=held_out,
        dataset_seed=seed,
        assistant_turns="last",
    )
    train, held = load_datasets(args)
    dataset = held if held_out else train
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def render(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a normalised {prompt, completion} example, through the chat template."""
    prompt_text = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise EvalError("the chat template renders the prompt differently with and without the response")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        return prompt_ids, tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return prompt_ids, full_ids[len(prompt_ids) :]


def response_perplexity(
    model, tokenizer, dataset, batch_size: int = 8, max_length: int = 2048, desc: str = "perplexity"
) -> tuple[dict[str, float], list[dict]]:
    """Token-level perplexity exp(sum NLL / response tokens) over the whole dataset, and per-example figures.

    `mean_example_perplexity` is the mean over examples of exp(mean NLL of that example's response tokens), which
    weighs short responses as much as long ones.
    """
    requests = [render(tokenizer, example) for example in dataset]
    log_probs = continuation_log_probs(model, requests, batch_size, max_length, tokenizer.pad_token_id, desc)
    total_nll = sum(-float(lp.sum()) for lp in log_probs)
    tokens = sum(len(lp) for lp in log_probs)
    samples = []
    for index, lp in enumerate(log_probs):
        mean_nll = -float(lp.mean())
        samples.append(
            {
                "index": index,
                "example_id": dataset[index].get("example_id"),
                "tokens": len(lp),
                "mean_nll": mean_nll,
                "perplexity": math.exp(mean_nll),
            }
        )
    n = len(samples)
    metrics = {
        "perplexity": math.exp(total_nll / tokens) if tokens else float("nan"),
        "mean_nll": total_nll / tokens if tokens else float("nan"),
        "mean_example_perplexity": sum(s["perplexity"] for s in samples) / n if n else float("nan"),
        "mean_example_nll": sum(s["mean_nll"] for s in samples) / n if n else float("nan"),
        "n": n,
        "tokens": tokens,
        "truncated": sum(len(c) + len(r) > max_length for c, r in requests),
    }
    return metrics, samples
