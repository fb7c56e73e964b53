"""`evaluate`: check every input, load the model once, run the tasks, write the results."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import torch
from accelerate import PartialState

from sftmix_trl.adapter import adapter_base, check_adapter, load_with_adapter
from sftmix_trl.configs import ModelArguments
from sftmix_trl.errors import EvalError
from sftmix_trl.evaluation import harness
from sftmix_trl.evaluation.args import MULTIPLE_CHOICE_TASKS, EvalArguments, validate_tasks
from sftmix_trl.evaluation.ifeval import check_punkt
from sftmix_trl.evaluation.perplexity import load_perplexity_data, recorded_held_out, response_perplexity
from sftmix_trl.evaluation.report import device_name, package_versions, write_outputs
from sftmix_trl.model import load_tokenizer, saved_tokenizer_folder
from sftmix_trl.runs import run_config

logger = logging.getLogger(__name__)
ADAPTER_KEYS = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "use_dora", "use_rslora")


def sample_items(items: Sequence, limit: int | None, seed: int) -> list[int]:
    """Indices of `limit` items, drawn at random with `seed`, in their original order.

    Not the first `limit`: files are often sorted, and PubMedQA's test labels are (its first 276 answers are all
    "yes"), so a prefix measures one answer's rate. The draw depends only on the file and the seed, so every model
    evaluated with the same `limit` and `limit_seed` sees the same items.
    """
    if limit is None:
        return list(range(len(items)))
    return sorted(random.Random(seed).sample(range(len(items)), min(limit, len(items))))


def load_task_data(eval_args: EvalArguments) -> dict:
    """Every task's items (a seeded sample of `limit` per task), read and validated before any model is loaded.

    Perplexity data is this package's (a `datasets.Dataset`); every other task is lm-eval's (`harness.load_tasks`:
    the lm-eval tasks and the item indices each scores).
    """
    data = {}
    if "perplexity" in eval_args.tasks:
        if eval_args.perplexity_data:
            items = load_perplexity_data(
                eval_args.perplexity_data,
                eval_args.perplexity_format,
                eval_args.perplexity_split,
                eval_args.perplexity_held_out,
                eval_args.perplexity_seed,
                turns=eval_args.perplexity_turns,
            )
            source = eval_args.perplexity_data
        else:
            try:
                items, source = recorded_held_out(eval_args.adapter_path)
            except EvalError as error:
                raise EvalError(f"task 'perplexity': {error}. Instead: `perplexity_data`, where its data is") from None
        data["perplexity"] = items.select(sample_items(items, eval_args.limit, eval_args.limit_seed))
        logger.info("perplexity: %d items of %s", len(data["perplexity"]), source)
    data.update(harness.load_tasks(eval_args, lambda docs: sample_items(docs, eval_args.limit, eval_args.limit_seed)))
    return data


def broadcast(value):
    """The main process's value on every process (lm-eval returns its output on rank 0 only)."""
    state = PartialState()
    if state.num_processes == 1:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def medical_average(results: dict) -> dict | None:
    """Unweighted mean accuracy over the medical benchmarks run, each MMLU subject counting as one benchmark."""
    scores = {}
    for task in MULTIPLE_CHOICE_TASKS:
        if task == "mmlu_medical" and task in results:
            scores.update({f"mmlu_{s}": v["acc"] for s, v in results[task]["subjects"].items()})
        elif task in results:
            scores[task] = results[task]["acc"]
    if not scores:
        return None
    return {"acc": sum(scores.values()) / len(scores), "benchmarks": sorted(scores), "n": len(scores)}


def evaluate(eval_args: EvalArguments, model_args: ModelArguments) -> dict:
    """Evaluate the base (and adapter) on every task; write and return the results payload."""
    start = time.perf_counter()
    # One process per item shard under `accelerate launch` (gloo workers on a CPU), else a single process
    state = PartialState(cpu=not torch.cuda.is_available())
    validate_tasks(eval_args.tasks)
    trust = bool(getattr(model_args, "trust_remote_code", False))
    # Everything that can fail fails here, before a model is loaded or a token generated
    if "ifeval" in eval_args.tasks:
        check_punkt()
    data = load_task_data(eval_args)
    if eval_args.adapter_path and not model_args.model_name_or_path:  # the base the adapter records, as generate
        model_args.model_name_or_path = adapter_base(eval_args.adapter_path)
    adapter_config = check_adapter(eval_args.adapter_path, model_args, trust) if eval_args.adapter_path else None
    tokenizer = load_tokenizer(model_args, trust, eval_args.chat_template_path, adapter_path=eval_args.adapter_path)
    model = load_with_adapter(model_args, eval_args.adapter_path, trust)

    results, samples, seconds = {}, {}, {}
    if "perplexity" in data:
        task_start = time.perf_counter()
        results["perplexity"], samples["perplexity"] = response_perplexity(
            model, tokenizer, data["perplexity"], eval_args.batch_size, eval_args.max_length
        )
        results["perplexity"]["data"] = eval_args.perplexity_data or "the held-out split of the adapter's run"
        seconds["perplexity"] = round(time.perf_counter() - task_start, 2)
    lm = harness.make_lm(model, tokenizer, eval_args) if len(data) > ("perplexity" in data) else None
    for chat in (False, True):  # the tasks of one lm-eval run share its chat-template setting
        run = {t: entry for t, entry in data.items() if t != "perplexity" and harness.chat(t, eval_args) == chat}
        if not run:
            continue
        task_start = time.perf_counter()
        output = broadcast(harness.run(lm, run, eval_args, chat))
        for task in run:
            results[task], rows = harness.collect(task, output, run[task])
            samples.update(rows)
        seconds[" ".join(run)] = round(time.perf_counter() - task_start, 2)
    results = {task: results[task] for task in eval_args.tasks}
    for task, figures in results.items():
        logger.info("%s: %s", task, {k: v for k, v in figures.items() if k != "subjects"})
    average = medical_average(results)
    if average is not None:
        results["medical_average"] = average

    payload = {
        "model": {
            "model_name_or_path": model_args.model_name_or_path,
            "load_in_4bit": model_args.load_in_4bit,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "adapter_path": eval_args.adapter_path,
            "adapter_config": {k: adapter_config.get(k) for k in ADAPTER_KEYS} if adapter_config else None,
            "tokenizer": str(saved_tokenizer_folder(eval_args.adapter_path) or model_args.model_name_or_path),
            "chat_template": tokenizer.chat_template,
        },
        "results": results,
        "config": run_config(eval_args, model_args),
        "versions": package_versions(),
        "device": device_name(),
        "num_processes": state.num_processes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task_seconds": seconds,
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    if state.is_main_process:
        written = write_outputs(eval_args.output_dir, payload, samples)
        logger.info("results written to %s", ", ".join(str(p) for p in written[:2]))
    state.wait_for_everyone()
    return payload
