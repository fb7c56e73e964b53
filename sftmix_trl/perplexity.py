"""The one perplexity engine: response perplexity of every prepared row (`input_ids`, `labels` with -100 outside
the scored tokens) under the model as it stands, sharded over the processes and gathered back whole.

Stage 1 scores its reference snapshots and the prompt fit with it; held-out perplexity (evaluate, merge's
measurement, export's check) plans its rows and scores them with it too."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm

from sftmix_trl.distributed import gather_by_index
from sftmix_trl.sharded import causal_lm, lm_head


@dataclass
class ScoringStats:
    seconds: float = 0.0
    tokens: int = 0  # real (non-padding) tokens through the model
    padded_tokens: int = 0  # batch slots, padding included

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def length_grouped_batches(lengths: list[int], batch_size: int, max_padding: float = 0.1) -> list[list[int]]:
    """Rows sorted by length (longest first, ties by row), cut into batches of at most `batch_size` whose every
    row is at least (1 - max_padding) of the batch's longest: padding stays under `max_padding` of the slots."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for row in order:
        if current and (len(current) == batch_size or lengths[row] < (1 - max_padding) * lengths[current[0]]):
            batches.append(current)
            current = []
        current.append(row)
    return batches + [current] if current else batches


def _response_log_probs(
    model, input_ids, attention_mask, labels, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) at each response-predicting position (B, T-1), zero elsewhere, and that mask.

    One forward of `model` itself, so that a sharding wrapper (FSDP, DeepSpeed) gathers the parameters and casts as
    it does in training. A hook on the backbone takes the final hidden states and runs the LM head on the response
    positions only, in chunks, inside that forward (while the wrapper holds the head whole): prompts and padding cost
    no vocabulary projection, and the full (B, T, V) logits never exist (the model's own head sees 1 position).
    """
    targets = labels[:, 1:]
    mask = targets != -100  # (B, T-1)
    found = {}

    def score(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        selected, wanted = hidden[:, :-1][mask], targets[mask]  # (M, D), (M,)
        chunks = []
        with lm_head(model) as (weight, bias):
            for start in range(0, len(wanted), chunk_size):
                logits = torch.nn.functional.linear(selected[start : start + chunk_size], weight, bias)
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                chunks.append(logits.log_softmax(-1).gather(1, wanted[start : start + chunk_size, None]).squeeze(1))
        log_probs = torch.zeros(mask.shape, dtype=torch.float64, device=hidden.device)
        log_probs[mask] = torch.cat(chunks).double() if chunks else log_probs.new_zeros(0)
        found["log_probs"] = log_probs

    handle = causal_lm(model).base_model.register_forward_hook(score)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return found["log_probs"], mask


@torch.no_grad()
def score_perplexities(
    model, dataset: Dataset, batch_size: int, pad_token_id: int, desc: str = "scoring"
) -> tuple[np.ndarray, np.ndarray, ScoringStats]:
    """Response perplexity of every row of a prepared dataset (`input_ids`, `labels`), sharded over all processes.

    Batches are grouped by length and dealt round-robin to the processes; the results are gathered so that every
    process returns all N perplexities (float64) and response-token counts, each row scored exactly once. `model` may
    be a sharding wrapper (FSDP, DeepSpeed): every process then runs the same number of forwards, those short of
    batches scoring a dummy one whose result is dropped, so that the wrapper's collectives line up.
    """
    state = PartialState()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    every_batch = length_grouped_batches(lengths, batch_size)
    batches = every_batch[state.process_index :: state.num_processes]
    num_forwards = math.ceil(len(every_batch) / state.num_processes)
    dummy = [every_batch[-1][0]] if every_batch else []  # the shortest row: padding forwards, never counted
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    stats, results = ScoringStats(), []
    start = time.perf_counter()
    for index in tqdm(range(num_forwards), desc=desc, disable=not state.is_local_main_process):
        real = index < len(batches)
        rows = batches[index] if real else dummy
        examples = dataset.select(rows)
        width = max(lengths[i] for i in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (ids, lab) in enumerate(zip(examples["input_ids"], examples["labels"])):
            input_ids[j, : len(ids)], labels[j, : len(lab)], attention_mask[j, : len(ids)] = (
                torch.tensor(ids),
                torch.tensor(lab),
                1,
            )
        log_probs, mask = _response_log_probs(
            model, input_ids.to(device), attention_mask.to(device), labels.to(device)
        )
        if not real:
            continue
        counts = mask.sum(1)
        mean_nll = -(log_probs.sum(1) / counts.clamp(min=1))
        results += [
            (row, (ppl, count)) for row, ppl, count in zip(rows, torch.exp(mean_nll).tolist(), counts.tolist())
        ]
        stats.tokens += int(attention_mask.sum())
        stats.padded_tokens += attention_mask.numel()
    stats.seconds = time.perf_counter() - start
    model.train(was_training)

    gathered = gather_by_index(results, len(lengths), "rows")
    perplexities = np.array([ppl for ppl, _ in gathered], dtype=np.float64)
    counts = np.array([count for _, count in gathered], dtype=np.int64)
    if state.num_processes > 1:  # each process timed its own shard; report the slowest and the total work
        all_stats = gather_object([(stats.seconds, stats.tokens, stats.padded_tokens)])
        stats = ScoringStats(max(s[0] for s in all_stats), sum(s[1] for s in all_stats), sum(s[2] for s in all_stats))
    return perplexities, counts, stats
