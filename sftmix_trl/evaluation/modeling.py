"""The model under evaluation: adapter checks, loading (with the bitsandbytes guard), and the log-probabilities of
continuations that held-out perplexity needs (lm-eval-harness scores every other task)."""

from __future__ import annotations

import logging

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from sftmix_trl.distributed import gather_by_index, shard

logger = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(iterable, desc: str, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, disable=not PartialState().is_local_main_process)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring continuations (held-out perplexity)


@torch.no_grad()
def continuation_log_probs(
    model,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int,
    max_length: int,
    pad_token_id: int,
    desc: str = "scoring",
) -> list[torch.Tensor]:
    """log p(token | everything before it) for every continuation token of each (context, continuation) pair.

    Returns one float64 tensor per request (length = continuation tokens kept). A pair longer than `max_length`
    loses the start of its context first, then the end of its continuation. One-token continuations of the same
    context (the options A/B/C/D of a question) share one forward pass of that context, as in lm-eval-harness; a
    request whose whole sequence starts the next request's (the replies of one conversation, listed in order) shares
    that request's forward pass. Rows are left-padded with explicit position ids, and the model computes logits only
    for the last positions (`logits_to_keep`), which keeps memory small with large vocabularies. Sharded over
    processes; every process returns all results.
    """
    kept = []  # (context, continuation) as scored
    for context, continuation in requests:
        if not continuation:
            raise ValueError("an empty continuation cannot be scored")
        continuation = continuation[: max_length - 1]
        context = context[-(max_length - len(continuation)) :] if context else []
        if not context:
            raise ValueError("a continuation needs at least one context token before it")
        kept.append((context, continuation))
    rows: list[list[int]] = []  # token sequences run through the model
    shared: dict[tuple[int, ...], int] = {}  # context -> its row, for one-token continuations
    # per request: (row, position predicting its first token, tokens)
    plan: list[tuple[int, int, list[int]]] = [None] * len(kept)
    waiting: list[int] = []  # multi-token requests whose sequence starts the next one's: they take its row
    for index, (context, continuation) in enumerate(kept):
        if len(continuation) == 1:
            if tuple(context) not in shared:
                shared[tuple(context)] = len(rows)
                rows.append(list(context))
            plan[index] = (shared[tuple(context)], len(context) - 1, continuation)
            continue
        sequence = context + continuation
        waiting.append(index)
        after = kept[index + 1] if index + 1 < len(kept) else None
        if after is not None and len(after[1]) > 1 and (after[0] + after[1])[: len(sequence)] == sequence:
            continue
        for waiter in waiting:
            plan[waiter] = (len(rows), len(kept[waiter][0]) - 1, kept[waiter][1])
        rows.append(sequence)
        waiting = []
    requests_of: list[list[int]] = [[] for _ in rows]
    for index, (row, _, _) in enumerate(plan):
        requests_of[row].append(index)
    # positions from the first one that predicts a scored token to the end of the row
    tail = [len(rows[r]) - min(plan[i][1] for i in requests_of[r]) for r in range(len(rows))]

    mine = shard(len(rows))
    mine.sort(key=lambda r: (-len(rows[r]), r))
    device = model_device(model)
    local = []
    for start in _progress(range(0, len(mine), batch_size), desc, total=-(-len(mine) // batch_size)):
        batch = mine[start : start + batch_size]
        width = max(len(rows[r]) for r in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            input_ids[j, width - len(rows[r]) :] = torch.tensor(rows[r])
            attention_mask[j, width - len(rows[r]) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(tail[r] for r in batch)
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=keep,
        ).logits
        logits = logits[:, -keep:, :]  # a model that ignores logits_to_keep returns them all
        log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        for j, r in enumerate(batch):
            for i in requests_of[r]:
                _, position, tokens = plan[i]
                first = keep - len(rows[r]) + position  # that position's column among the last `keep`
                predicting = log_probs[j, first : first + len(tokens)]
                target = torch.tensor(tokens, device=log_probs.device)[:, None]
                local.append((i, predicting.gather(1, target).squeeze(1).double().cpu()))
    return gather_by_index(local, len(plan))
