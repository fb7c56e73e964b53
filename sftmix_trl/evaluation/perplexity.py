"""Held-out response perplexity: how well the model predicts the reference responses of a dataset.

Each example is rendered with the tokenizer's chat template as in training. The scored tokens of a reply are what
the template adds for it after the generation prompt before it (the reply and its end-of-turn token; for the last
reply, any text the template appends too): the tokens TRL's completion-only loss trains on. A multi-turn
conversation is scored on every assistant reply (`turns="all"`), as the recipes train it, in one forward pass when
it fits `max_length`; the user turns between replies are context. The rows are scored by the package's one
perplexity engine (`sftmix_trl.perplexity.score_perplexities`), as stage 1 scores its examples.
"""

from __future__ import annotations

import math

import numpy as np
from datasets import Dataset

from sftmix_trl.configs import ScriptArguments
from sftmix_trl.data.load import load_datasets
from sftmix_trl.errors import EvalError
from sftmix_trl.perplexity import score_perplexities
from sftmix_trl.run_record import read_run_record, run_script_arguments


def load_perplexity_data(
    path: str,
    fmt: str = "auto",
    split: str = "train",
    held_out: float = 0.0,
    seed: int = 42,
    limit: int | None = None,
    turns: str = "all",
) -> Dataset:
    """Examples read by `sftmix_trl.data.load` (any source and format it reads); with `held_out`, only that split.
    `turns`: "all" scores every assistant reply of a conversation, "last" only its last (earlier turns context)."""
    args = ScriptArguments(
        dataset_name=path,
        dataset_format=fmt,
        dataset_train_split=split,
        eval_split_size=held_out,
        dataset_seed=seed,
        assistant_turns=turns,
    )
    train, held = load_datasets(args)
    return _first(held if held_out else train, limit)


def load_run_held_out(config: dict, limit: int | None = None) -> Dataset | None:
    """The held-out split a training run evaluated on, re-read from the data settings it recorded (the `config` of
    its `sftmix_run.json`) through the same loader: the same sources, seed and split give the same examples. None
    when the run held none out. Relative data paths are read from the current folder, as the run read them."""

    args = run_script_arguments(config)
    if not args.eval_split_size:
        return None
    _, held = load_datasets(args)
    return _first(held, limit)


def recorded_held_out(adapter_path: str, limit: int | None = None) -> tuple[Dataset, str]:
    """The held-out split of the run that trained `adapter_path` (`load_run_held_out` on its `sftmix_run.json`) and a
    description of it. An `EvalError` says why there is none; the caller says what to give instead."""
    record = read_run_record(adapter_path)
    if record is None:
        raise EvalError(f"{adapter_path} records no run (no sftmix_run.json), so it has no held-out split")
    config = record.get("config") or {}
    try:
        dataset = load_run_held_out(config, limit)
    except (ValueError, OSError) as error:  # SFTMixError is a ValueError
        raise EvalError(
            f"the run's held-out split cannot be re-read from here ({str(error).splitlines()[0][:200]}): run from "
            "the folder the run was launched in"
        ) from None
    if dataset is None:
        raise EvalError("the run held no data out (eval_split_size 0)")
    size, seed = config.get("eval_split_size"), config.get("dataset_seed")
    return dataset, f"the run's held-out split ({len(dataset)} examples; eval_split_size {size}, dataset_seed {seed})"


def _first(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def render(tokenizer, example: dict) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a normalised {prompt, completion} example through the chat template, and the (start, end) token
    spans of its assistant replies (every one of the completion; the user turns between them are not scored)."""
    messages = example["prompt"] + example["completion"]
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    replies = [
        i for i, message in enumerate(messages) if i >= len(example["prompt"]) and message["role"] == "assistant"
    ]
    bounds = []  # character offsets: start and end of each reply
    for i in replies:
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = (
            full_text if i == len(messages) - 1 else tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        )
        if not (full_text.startswith(before) and full_text.startswith(through)):
            if i == replies[0]:
                raise EvalError("the chat template renders the prompt differently with and without the response")
            raise EvalError(
                "the chat template renders a conversation's earlier turns differently from the whole conversation: "
                "set `perplexity_turns: last` to score only its last reply"
            )
        bounds += [len(before), len(through)]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    prefixes = [  # the last reply usually ends the text: its end is the whole text, already tokenised
        full_ids if b == len(full_text) else tokenizer(full_text[:b], add_special_tokens=False)["input_ids"]
        for b in bounds
    ]
    if all(full_ids[: len(prefix)] == prefix for prefix in prefixes):
        cuts = [len(prefix) for prefix in prefixes]
    else:  # a token spans a boundary: tokenise the pieces between boundaries apart, so each reply keeps its tokens
        full_ids, cuts = [], []
        for start, end in zip([0, *bounds], [*bounds, len(full_text)]):
            full_ids += tokenizer(full_text[start:end], add_special_tokens=False)["input_ids"] if end > start else []
            cuts.append(len(full_ids))
        cuts = cuts[:-1]
    return full_ids, [(start, end) for start, end in zip(cuts[0::2], cuts[1::2]) if end > start]


def scoring_rows(ids: list[int], spans: list[tuple[int, int]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """The rows, (input_ids, labels) with -100 outside the scored tokens, that score the replies `spans` of one
    rendered example within `max_length` tokens a row.

    The replies that end within `max_length` share one row, the conversation up to the last of them (a conversation
    that fits is one row). Each later reply gets a row of its own: the reply, its end cut past `max_length - 1`
    tokens, after as much of the context before it as fits, the context's start cropped.
    """
    if spans and spans[0][0] == 0:
        raise EvalError("a reply at the very start of the rendered text has no token before it to be predicted from")
    fitting = [(start, end) for start, end in spans if end <= max_length]  # spans are in order: a prefix of them
    rows = []
    if fitting:
        last = fitting[-1][1]
        labels = [-100] * last
        for start, end in fitting:
            labels[start:end] = ids[start:end]
        rows.append((ids[:last], labels))
    for start, end in spans[len(fitting) :]:
        reply = ids[start:end][: max_length - 1]
        context = ids[max(0, start - (max_length - len(reply))) : start]
        rows.append((context + reply, [-100] * len(context) + reply))
    return rows


def response_perplexity(
    model, tokenizer, dataset, batch_size: int = 8, max_length: int = 2048, desc: str = "perplexity"
) -> tuple[dict[str, float], list[dict]]:
    """Token-level perplexity exp(sum NLL / response tokens) over the whole dataset, and per-example figures.

    `mean_example_perplexity` is the mean over examples of exp(mean NLL of that example's response tokens), which
    weighs short responses as much as long ones. `truncated` counts the examples longer than `max_length`.
    """
    rendered = [render(tokenizer, example) for example in dataset]
    empty = [index for index, (_, spans) in enumerate(rendered) if not spans]
    if empty:
        raise EvalError(f"{len(empty)} example(s) render no response token to score (e.g. example {empty[0]})")
    rows, owner = {"input_ids": [], "labels": []}, []  # owner: each row's example
    for index, (ids, spans) in enumerate(rendered):
        for input_ids, labels in scoring_rows(ids, spans, max_length):
            rows["input_ids"].append(input_ids)
            rows["labels"].append(labels)
            owner.append(index)
    perplexities, counts, _ = score_perplexities(
        model, Dataset.from_dict(rows), batch_size, tokenizer.pad_token_id, desc
    )
    # a row's perplexity is exp(its NLL sum / its count): the sums add up over an example's rows
    example_nll = np.bincount(owner, weights=np.log(perplexities) * counts, minlength=len(rendered))
    example_tokens = np.bincount(owner, weights=counts, minlength=len(rendered)).astype(np.int64)
    total_nll, tokens = float(example_nll.sum()), int(example_tokens.sum())
    samples = []
    for index, (nll, count) in enumerate(zip(example_nll.tolist(), example_tokens.tolist())):
        mean_nll = nll / count
        samples.append(
            {
                "index": index,
                "example_id": dataset[index].get("example_id"),
                "tokens": count,
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
        "truncated": sum(len(ids) > max_length for ids, _ in rendered),
    }
    return metrics, samples
