"""The model under evaluation: adapter checks, loading (with the bitsandbytes guard), and the log-probabilities of
continuations that held-out perplexity needs (lm-eval-harness scores every other task)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from ..configs import ModelArguments
from ..distributed import gather_by_index, shard
from ..model import ModelLoadError, _check_model_path, disable_bnb_cpu_repack, load_model
from .errors import EvalError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
)


# ----------------------------------------------------------------------------------------------------------------------
# Adapter checks


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    for name in ADAPTER_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        state = torch.load(path, map_location="meta", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise EvalError(f"adapter folder {folder} has no {' or '.join(ADAPTER_WEIGHTS)}: no adapter weights to load")


def _base_skeleton(model_args: ModelArguments, trust_remote_code: bool) -> tuple[Any, torch.nn.Module]:
    """The base's config and an empty (meta-device) copy of it: module names and shapes without loading weights."""
    path = _check_model_path(model_args.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise ModelLoadError(f"could not load the config of {model_args.model_name_or_path}: {error}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config, skeleton


def _module_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like or embedding module, as LoRA's A and B see them."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if hasattr(module, "nx") and hasattr(module, "nf"):  # GPT-2's Conv1D
        return module.nx, module.nf
    return None


def check_adapter(adapter_path: str, model_args: ModelArguments, trust_remote_code: bool = False) -> dict:
    """Check that a saved adapter fits the base model, without loading either's weights; return its config.

    Reads adapter_config.json and the shapes in the adapter's weights file, and compares them with an empty copy of
    the base: every adapted module must exist in the base with the sizes the adapter was trained on. An adapter made
    for another model fails here, in one line, instead of deep inside PEFT (or, worse, half-way through a run).
    """
    folder = Path(os.path.expanduser(adapter_path))
    if not folder.is_dir():
        raise EvalError(f"adapter folder not found: {adapter_path}")
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise EvalError(f"{folder} has no {ADAPTER_CONFIG}: not a saved PEFT adapter")
    try:
        adapter_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise EvalError(f"{config_path}: malformed JSON ({error.msg})") from None
    shapes = _adapter_shapes(folder)
    base_config, skeleton = _base_skeleton(model_args, trust_remote_code)
    trained_on = adapter_config.get("base_model_name_or_path") or "an unrecorded base"
    where = f"adapter {adapter_path} (trained on {trained_on}) does not match the base {model_args.model_name_or_path}"
    base_type = getattr(base_config, "model_type", None)

    # The base the adapter recorded, where it is a local folder: a different architecture is the clearest message
    recorded = Path(os.path.expanduser(str(adapter_config.get("base_model_name_or_path") or ""))) / "config.json"
    if recorded.is_file():
        try:
            recorded_config = json.loads(recorded.read_text())
        except json.JSONDecodeError:
            recorded_config = {}
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            theirs, ours = recorded_config.get(key), getattr(base_config, key, None)
            if theirs is not None and ours is not None and theirs != ours:
                raise EvalError(f"{where}: {key} is {theirs} in the adapter's base but {ours} in this base")

    modules = dict(skeleton.named_modules())
    targets = adapter_config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        if not any(re.fullmatch(targets, name) for name in modules):
            raise EvalError(
                f"{where}: its target_modules pattern {targets!r} matches no module of the {base_type} base"
            )
    elif isinstance(targets, list):
        leaves = {name.rsplit(".", 1)[-1] for name in modules} | set(modules)
        missing = sorted(t for t in targets if t not in leaves)
        if missing:
            raise EvalError(
                f"{where}: target module(s) {missing} do not exist in the {base_type} base "
                f"(it has e.g. {sorted(n for n in leaves if n and '.' not in n and not n.isdigit())[:8]})"
            )

    problems = []
    adapted = 0
    for key, shape in sorted(shapes.items()):
        match = _LORA_KEY.match(key)
        if not match:
            continue
        adapted += 1
        name, kind = match.group("module"), match.group("kind")
        module = modules.get(name)
        if module is None:
            problems.append(f"module {name} does not exist in the base")
            continue
        dims = _module_dims(module)
        if dims is None or len(shape) != 2:
            continue
        # A is (r, in) [embedding: (r, vocabulary)], B is (out, r) [embedding: (dim, r)]
        expected, found = (dims[0], shape[1]) if kind.endswith("A") else (dims[1], shape[0])
        if found != expected:
            side = "input" if kind.endswith("A") else "output"
            problems.append(f"{key} has {side} size {found} but {name} has {expected}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        hidden = getattr(base_config, "hidden_size", "?")
        raise EvalError(f"{where} (hidden size {hidden}): " + "; ".join(problems[:3]) + more)
    if not adapted:
        raise EvalError(
            f"{folder}: no LoRA weights found in the adapter file; only LoRA adapters are checked and loaded"
        )
    return adapter_config


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def load_eval_model(
    model_args: ModelArguments, adapter_path: str | None = None, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The base (4-bit or 16/32-bit, through `load_model`), with the adapter on top if given, in eval mode."""
    model = load_model(model_args, trust_remote_code)
    if model_args.load_in_4bit is False and model_args.load_in_8bit is False:
        model.to(PartialState().device)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.expanduser(adapter_path), is_trainable=False)
        disable_bnb_cpu_repack(model)  # PEFT wraps the 4-bit layers: keep the repack off on every one
    model.eval()
    return model


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
