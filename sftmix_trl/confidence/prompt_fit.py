"""Prompt fit: how much an example's prompt helps a model predict its response (the IFD score of Li et al., 2024,
"From Quantity to Quality").

    prompt_fit = PPL(response | prompt) / PPL(response alone)

Below 1 the prompt makes the response more likely, as it should; near or above 1 the response does not follow from its
prompt: a response pasted under the wrong question, a truncated or off-topic answer. Perplexity alone mostly measures
how hard a response is; dividing by the response's own perplexity cancels that.

"Alone" keeps the chat frame and empties the prompt: the response is scored after the tokens the chat template writes
for one empty user turn and the assistant header (`response_frame_ids`), so that both perplexities cover the same
response tokens in the same assistant turn, and a template's default system prompt is in both.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
from accelerate.utils import extract_model_from_parallel
from datasets import Dataset

from sftmix_trl.perplexity import score_perplexities


def response_frame_ids(tokenizer) -> list[int]:
    """The tokens a response alone is scored after: the template's rendering of one empty user turn, with the
    assistant header (the generation prompt), as TRL tokenises a prompt."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def strip_prompts(prepared: Dataset, frame_ids: list[int]) -> Dataset:
    """The prepared rows (`input_ids`, `labels`) with everything before the first response token replaced by
    `frame_ids`. The response tokens, and any later turns, stay as they are, with the same labels."""
    if not frame_ids:
        raise ValueError("the response frame is empty: a response alone needs at least one token before it")

    def strip(example):
        labels = example["labels"]
        first = next((t for t, label in enumerate(labels) if label != -100), None)
        if first is None:
            raise ValueError("a prepared row has no response token")
        tail = list(labels[first:])
        if first == 0:  # a first token is never predicted in the prompted row: do not score it alone either
            tail[0] = -100
        return {"input_ids": frame_ids + list(example["input_ids"][first:]), "labels": [-100] * len(frame_ids) + tail}

    return prepared.select_columns(["input_ids", "labels"]).map(strip, desc="response alone")


def prompt_fit(ppl_given_prompt: np.ndarray, ppl_alone: np.ndarray) -> np.ndarray:
    """PPL(response | prompt) / PPL(response alone), per example."""
    given, alone = np.asarray(ppl_given_prompt, dtype=np.float64), np.asarray(ppl_alone, dtype=np.float64)
    if given.shape != alone.shape:
        raise ValueError(f"{given.shape} perplexities given the prompt but {alone.shape} alone")
    return given / alone


@contextmanager
def adapter_disabled(model):
    """Score through the base model: the LoRA adapter of a PEFT model (possibly inside a DDP/FSDP wrapper) off."""
    inner = extract_model_from_parallel(model)
    with inner.disable_adapter() if hasattr(inner, "disable_adapter") else nullcontext():
        yield


@dataclass
class PromptFitScores:
    ppl_given_prompt: np.ndarray
    ppl_alone: np.ndarray
    seconds: float  # forward time of the passes run here (a perplexity passed in costs nothing)

    @property
    def prompt_fit(self) -> np.ndarray:
        return prompt_fit(self.ppl_given_prompt, self.ppl_alone)


def score_prompt_fit(
    model,
    prepared: Dataset,
    frame_ids: list[int],
    batch_size: int,
    pad_token_id: int,
    ppl_given_prompt: np.ndarray | None = None,
    desc: str = "prompt fit",
) -> PromptFitScores:
    """Both perplexities of every prepared row under `model` as it is (wrap the call in `adapter_disabled` for the
    base model), sharded like `score_perplexities`. `ppl_given_prompt` already known (the reference's last snapshot
    scored it) saves that pass."""
    seconds = 0.0
    if ppl_given_prompt is None:
        ppl_given_prompt, _, stats = score_perplexities(model, prepared, batch_size, pad_token_id, f"{desc}: prompted")
        seconds += stats.seconds
    alone, _, stats = score_perplexities(
        model, strip_prompts(prepared, frame_ids), batch_size, pad_token_id, f"{desc}: response alone"
    )
    return PromptFitScores(np.asarray(ppl_given_prompt, dtype=np.float64), alone, seconds + stats.seconds)
