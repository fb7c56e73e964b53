"""The datasets of this package's lm-eval-harness tasks (the YAML files next to this one): local files read and checked.

lm-eval imports this file by its path (`!function loaders.<name>`) and calls a task's `custom_dataset` with the
task's `metadata` and `dataset_kwargs` as keyword arguments; `sftmix_trl.evaluation` puts the user's data path
(`data`) and the MMLU settings in `dataset_kwargs`. With lm-eval's own command line, pass them as `--metadata`:

    lm_eval --model hf --model_args pretrained=MODEL --include_path <this folder> --tasks sftmix_pubmedqa \
        --metadata '{"data": "path/to/pubmedqa"}'

The loaders are `sftmix_trl.evaluation`'s own: a malformed file stops the run with its name, record and field.
"""

from __future__ import annotations

from datasets import Dataset, DatasetDict

from sftmix_trl.errors import EvalError
from sftmix_trl.evaluation.args import MMLU_MEDICAL_SUBJECTS
from sftmix_trl.evaluation.choice import ChoiceItem, load_choice_file, load_mmlu, load_pubmedqa
from sftmix_trl.evaluation.ifeval import load_ifeval


def _required(data: str | None, task: str) -> str:
    if not data:
        raise EvalError(f"task sftmix_{task} needs its data path: pass `data` in the task's metadata")
    return data


def _choice_dataset(items: list[ChoiceItem]) -> DatasetDict:
    rows = [
        {"id": i.id, "context": i.context, "choices": i.choices, "answer": i.answer, "group": i.group} for i in items
    ]
    return DatasetDict({"test": Dataset.from_list(rows)})


def pubmedqa(data: str | None = None, **_) -> DatasetDict:
    """PubMedQA's 500-item test split from a local folder (see `choice.load_pubmedqa`)."""
    return _choice_dataset(load_pubmedqa(_required(data, "pubmedqa")))


def mmlu_medical(data: str | None = None, subjects: list[str] | None = None, split: str = "test", **_) -> DatasetDict:
    """MMLU's medical subjects (or `subjects`) from local `<subject>_<split>.csv` files; `group` names the subject."""
    return _choice_dataset(load_mmlu(_required(data, "mmlu_medical"), list(subjects or MMLU_MEDICAL_SUBJECTS), split))


def medqa(data: str | None = None, **_) -> DatasetDict:
    return _choice_dataset(load_choice_file(_required(data, "medqa"), "medqa"))


def medmcqa(data: str | None = None, **_) -> DatasetDict:
    return _choice_dataset(load_choice_file(_required(data, "medmcqa"), "medmcqa"))


def ifeval(data: str | None = None, **_) -> DatasetDict:
    """IFEval prompts from a local input_data.jsonl, checked, in the schema of the Hub's google/IFEval that lm-eval's
    ifeval task reads: Arrow gives every prompt's `kwargs` every other prompt's keys (as None), which lm-eval's
    `process_results` drops, as it does for the Hub copy."""
    rows = [
        {"key": p.key, "prompt": p.prompt, "instruction_id_list": p.instruction_id_list, "kwargs": p.kwargs}
        for p in load_ifeval(_required(data, "ifeval"))
    ]
    return DatasetDict({"test": Dataset.from_list(rows)})
