"""Tasks scored by lm-eval-harness: this package's own (YAML files in `tasks/`, reading the user's local files) and
any task, group or tag lm-eval knows.

The model is built here (4-bit or not, plus the adapter) and handed to lm-eval's `HFLM`, so lm-eval computes the
log-likelihoods and generations and applies its metrics; this module chooses the items, runs lm-eval and turns its
output into `eval_results.json`'s figures and the per-sample files.
"""

from __future__ import annotations

import difflib
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml
from accelerate import Accelerator, PartialState

from sftmix_trl.errors import EvalError

if TYPE_CHECKING:  # `args` validates task names through this module: a type-only import keeps the graph acyclic
    from lm_eval.api.group import Group

    from sftmix_trl.evaluation.args import EvalArguments

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
# This package's task -> its lm-eval task (the YAML of that name in TASKS_DIR)
PACKAGE_TASKS = {
    "ifeval": "sftmix_ifeval",
    "pubmedqa": "sftmix_pubmedqa",
    "mmlu_medical": "sftmix_mmlu_medical",
    "medqa": "sftmix_medqa",
    "medmcqa": "sftmix_medmcqa",
}
CHAT_TASKS = ("ifeval",)  # always through the chat template; the multiple-choice ones never
STOCK_PREFIX = "lm_eval:"  # `lm_eval:pubmedqa`: lm-eval's own task of a name this package also uses
_NOT_FIGURES = ("alias", "name", "sample_len", "samples")
# lm-eval's warnings that do not apply here: the model is built by this package on purpose (and sharded over
# processes by `make_lm`), and the data paths of this package's tasks are passed for the user
_IRRELEVANT = (
    (
        "lm_eval.models.huggingface",
        lambda m: m.startswith(("`pretrained` model kwarg is not of type", "Passed an already-initialized model")),
    ),
    ("lm_eval.api.task", lambda m: m.startswith("sftmix_") and "Custom kwargs" in m),
)
for _name, _irrelevant in _IRRELEVANT:
    logging.getLogger(_name).addFilter(lambda record, drop=_irrelevant: not drop(str(record.msg)))


@functools.cache
def task_manager(stock: bool = True):
    """lm-eval's task index with this package's tasks; `stock=False`: this package's alone. The whole index is built
    once per process, only when a stock task is asked for: it reads the ~15,000 task YAMLs lm-eval ships (half a
    minute on a busy 2-core CPU)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=stock)


def lm_eval_name(task: str) -> str:
    """The lm-eval name of a task as the user wrote it."""
    return PACKAGE_TASKS.get(task, task.removeprefix(STOCK_PREFIX))


def chat(task: str, eval_args: EvalArguments) -> bool:
    """Whether a task's prompts go through the chat template."""
    if task in PACKAGE_TASKS:
        return task in CHAT_TASKS
    return eval_args.apply_chat_template


def is_task_file(task: str) -> bool:
    """A task given as the path of an lm-eval task YAML (a task of the user's own, in lm-eval's format)."""
    return task.endswith((".yaml", ".yml")) and Path(task).expanduser().is_file()


def check_task_names(tasks: list[str], package_tasks: tuple[str, ...]) -> None:
    """Every task not in `package_tasks` (this package's) must be an lm-eval task YAML file or a task, group or tag
    lm-eval knows (a one-line error if not)."""
    stock = [t for t in tasks if t not in package_tasks and not is_task_file(t)]
    if not stock:
        return
    known = set(task_manager().all_tasks)
    for task in stock:
        if lm_eval_name(task) not in known:
            close = difflib.get_close_matches(lm_eval_name(task), sorted(known | set(package_tasks)), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EvalError(
                f"unknown task {task!r}; available tasks: {', '.join(package_tasks)}, any lm-eval-harness task, group or "
                f"tag (`lm_eval ls tasks` lists them) or the path of an lm-eval task YAML file{hint}"
            )


def _spec(task: str, eval_args: EvalArguments) -> str | dict | Group:
    """What lm-eval loads for a task: this package's YAML pointed at the user's files (for `mmlu_medical`, the group
    of the `mmlu_subjects` tasks), or the stock name."""
    if is_task_file(task):
        return str(Path(task).expanduser())
    if task not in PACKAGE_TASKS:
        return lm_eval_name(task)
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TASKS_DIR / f"{PACKAGE_TASKS[task]}.yaml", resolve_func=True)
    if task == "mmlu_medical":
        return _mmlu_group(config, eval_args)
    if task == "ifeval":
        config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": eval_args.max_new_tokens}
    return {**config, "dataset_kwargs": {"data": getattr(eval_args, f"{task}_data")}}


def _mmlu_group(config: dict, eval_args: EvalArguments):
    """The sftmix_mmlu_medical group (its YAML's aggregation) of the `mmlu_subjects` tasks on the user's files. Built
    here, not from a dict spec: lm-eval passes a group dict's own keys on to its tasks as overrides."""
    from lm_eval.api.group import Group

    kwargs = {"data": eval_args.mmlu_medical_data, "split": eval_args.mmlu_split}
    members = []
    for subject in eval_args.mmlu_subjects:
        member = _mmlu_subject_task(subject)
        members.append({**member, "dataset_kwargs": {**member["dataset_kwargs"], **kwargs}})
    group = Group.from_config({k: v for k, v in config.items() if k != "task"})
    for task_obj in task_manager(stock=False).load(members)["tasks"].values():
        group.add(task_obj)
    return group


def _mmlu_subject_task(subject: str) -> dict:
    """lm-eval's mmlu_<subject> task on the local CSVs: this package's YAML for the six medical subjects; any other
    subject lm-eval knows is built from the same template with lm-eval's own description of it."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = TASKS_DIR / f"sftmix_mmlu_{subject}.yaml"
    if ours.is_file():
        return load_yaml(ours, resolve_func=True)
    theirs = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default" / f"mmlu_{subject}.yaml"
    if not theirs.is_file():
        known = sorted(p.stem.removeprefix("mmlu_") for p in theirs.parent.glob("mmlu_*.yaml"))
        close = difflib.get_close_matches(subject, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EvalError(f"`mmlu_subjects`: MMLU has no subject {subject!r} (lm-eval's mmlu lists {len(known)}){hint}")
    return {
        **load_yaml(TASKS_DIR / "_sftmix_mmlu_template.yaml", resolve_func=True),
        "task": f"sftmix_mmlu_{subject}",
        "task_alias": subject,
        "description": yaml.safe_load(theirs.read_text())["description"],
        "dataset_kwargs": {"subject": subject},
    }


def _check_fewshot(name: str, task_obj, eval_args: EvalArguments) -> None:
    """A few-shot run needs that many examples apart from the scored ones (MMLU's from `<subject>_dev.csv`)."""
    shots = eval_args.num_fewshot or 0
    if shots and len(task_obj.fewshot_docs()) < shots:
        subject = name.removeprefix("sftmix_mmlu_")
        raise EvalError(
            f"`num_fewshot` {shots}: {name} has {len(task_obj.fewshot_docs())} few-shot examples; MMLU's come from "
            f"{subject}_dev.csv in `mmlu_medical_data`"
        )


def load_tasks(eval_args: EvalArguments, sample) -> dict[str, dict]:
    """lm-eval's tasks for every task of `eval_args` but perplexity, their data read and checked now (before any
    model is loaded), and the items each one scores.

    Returns {task as the user wrote it: {"tasks": {lm-eval task name: Task}, "groups": {...}, "top": [the groups and
    tasks that no group holds], "samples": {lm-eval task name: item indices}}}. `sample(docs)` chooses a task's items
    (a seeded sample when `limit` is set).
    """
    loaded = {}
    for task in eval_args.tasks:
        if task == "perplexity":
            continue
        try:
            stock = task not in PACKAGE_TASKS and not is_task_file(task)
            built = task_manager(stock=stock).load([_spec(task, eval_args)])
        except EvalError:
            raise
        except Exception as error:  # a stock task's dataset that cannot be reached, a broken YAML
            raise EvalError(f"lm-eval could not load task {task!r}: {type(error).__name__}: {error}") from None
        samples = {}
        for name, task_obj in built["tasks"].items():
            if task == "mmlu_medical":
                _check_fewshot(name, task_obj, eval_args)
            docs = task_obj.eval_docs
            samples[name] = sample(docs)
            logger.info("%s: %d of %d items", name, len(samples[name]), len(docs))
        groups = built.get("groups", {})
        members = {child for children in built.get("group_map", {}).values() for child in children}
        top = [obj for name, obj in [*groups.items(), *built["tasks"].items()] if name not in members]
        loaded[task] = {"tasks": built["tasks"], "groups": groups, "top": top, "samples": samples}
    return loaded


def make_lm(model, tokenizer, eval_args: EvalArguments):
    """lm-eval's `HFLM` around the model built here. Under `accelerate launch`, every process takes its share of
    the items and rank 0 gathers them (lm-eval assumes one process when handed a model, so its ranks are set here)."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=eval_args.batch_size, max_length=eval_args.max_length)
    state = PartialState()
    if state.num_processes > 1:
        lm.accelerator = Accelerator(cpu=state.device.type == "cpu")
        lm._rank, lm._world_size = state.process_index, state.num_processes
    return lm


def run(lm, loaded: dict[str, dict], eval_args: EvalArguments, chat_template: bool) -> dict | None:
    """One lm-eval run over the loaded tasks (all with or all without the chat template); lm-eval's output on the
    main process, None on the others."""
    from lm_eval import simple_evaluate

    # The top-level groups, not only their tasks: lm-eval aggregates a group only when it is handed the group
    top = [obj for entry in loaded.values() for obj in entry["top"]]
    tasks = [t for entry in loaded.values() for t in entry["tasks"].values()]
    samples = {name: indices for entry in loaded.values() for name, indices in entry["samples"].items()}
    generating = any(t.get_config("output_type") == "generate_until" for t in tasks)
    # A prompt keeps up to `max_length` tokens while the reply grows: lm-eval would cut the prompt to leave room
    lm._max_length = eval_args.max_length + (eval_args.max_new_tokens if generating else 0)
    return simple_evaluate(
        lm,
        tasks=top,
        samples=samples,
        num_fewshot=eval_args.num_fewshot,
        apply_chat_template=chat_template,
        fewshot_as_multiturn=chat_template,
        log_samples=True,
        bootstrap_iters=0,
        confirm_run_unsafe_code=False,
    )


# ----------------------------------------------------------------------------------------------------------------------
# lm-eval's output -> this package's figures and samples


def _choice_samples(logged: list[dict], task_obj, group: str) -> list[dict]:
    """One row per question: its id, the right option, the prediction, every option's log-likelihood and lm-eval's
    per-question metrics (acc, and acc_norm where the task reports it)."""
    metrics = list(task_obj.aggregation())
    rows = []
    for s in sorted(logged, key=lambda s: s["doc_id"]):
        doc = s["doc"]
        scores = [float(r[0]) for r in s["filtered_resps"]]
        answer = task_obj.doc_to_target(doc)
        if isinstance(answer, str):  # PubMedQA's target is the option's text
            answer = task_obj.doc_to_choice(doc).index(answer)
        rows.append(
            {
                "id": doc["id"],
                "group": group,
                "answer": answer,
                "prediction": int(np.argmax(scores)),
                "loglikelihoods": scores,
                **{metric: float(s[metric]) for metric in metrics},
            }
        )
    return rows


def _ifeval_samples(logged: list[dict]) -> list[dict]:
    rows = []
    for s in sorted(logged, key=lambda s: s["doc_id"]):
        doc = s["doc"]
        row = {"key": doc["key"], "prompt": doc["prompt"], "response": s["filtered_resps"][0]}
        row["instruction_id_list"] = list(doc["instruction_id_list"])
        for mode in ("strict", "loose"):
            row[f"follow_all_instructions_{mode}"] = bool(s[f"prompt_level_{mode}_acc"])
            row[f"follow_instruction_list_{mode}"] = [bool(v) for v in s[f"inst_level_{mode}_acc"]]
        rows.append(row)
    return rows


def _figures(entry: dict) -> dict:
    """lm-eval's figures of one task or group: `metric` (`metric,filter` unless the filter is `none`)."""
    figures = {}
    for key, value in entry.items():
        metric, _, filtered = key.partition(",")
        if key in _NOT_FIGURES or "_stderr" in metric or not isinstance(value, (int, float)):
            continue
        figures[metric if filtered in ("", "none") else key] = value
    return figures


def collect(task: str, output: dict, loaded: dict) -> tuple[dict, dict[str, list[dict]]]:
    """This package's figures and per-sample rows for one task as the user wrote it.

    Returns (figures, {samples file suffix: rows}): this package's tasks give lm-eval's figures and `n` (MMLU: the
    group's, and each subject's under `subjects`; IFEval's four accuracies and its counts); an lm-eval task gives
    every figure lm-eval reports, per task and group, and its own per-sample records.
    """
    names = list(loaded["tasks"])
    if task == "ifeval":
        (name,) = names
        rows = _ifeval_samples(output["samples"][name])
        figures = _figures(output["results"][name])
        figures["n_prompts"] = len(rows)
        figures["n_instructions"] = sum(len(r["instruction_id_list"]) for r in rows)
        return figures, {task: rows}
    if task == "mmlu_medical":
        subjects, rows = {}, []
        for name in names:
            subject = name.removeprefix("sftmix_mmlu_")
            rows += _choice_samples(output["samples"][name], loaded["tasks"][name], f"mmlu_{subject}")
            subjects[subject] = {**_figures(output["results"][name]), "n": len(output["samples"][name])}
        (group,) = loaded["groups"]
        return {**_figures(output["results"][group]), "n": len(rows), "subjects": subjects}, {task: rows}
    if task in PACKAGE_TASKS:
        (name,) = names
        rows = _choice_samples(output["samples"][name], loaded["tasks"][name], task)
        return {**_figures(output["results"][name]), "n": len(rows)}, {task: rows}
    figures, samples = {}, {}
    for name in [*loaded["groups"], *names]:
        if name in output["results"]:
            figures[name] = {**_figures(output["results"][name]), "n": len(output["samples"].get(name, []))}
    for name in names:
        samples[name] = [
            {k: v for k, v in s.items() if not k.endswith("_hash") and k not in ("arguments", "resps")}
            for s in sorted(output["samples"][name], key=lambda s: s["doc_id"])
        ]
    return (next(iter(figures.values())) if len(figures) == 1 else figures), samples
