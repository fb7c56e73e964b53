"""The datasets of this package's lm-eval-harness tasks (the YAML files next to this one): local files read and checked.

lm-eval imports this file by its path (`!function loaders.<name>`) and calls a task's `custom_dataset` with the
task's `metadata` and `dataset_kwargs` as keyword arguments; `sftmix_trl.evaluation` puts the user's data path
(`data`) and the MMLU split in `dataset_kwargs`. With lm-eval's own command line, pass them as `--metadata`:

    lm_eval --model hf --model_args pretrained=MODEL --include_path <this folder> --tasks sftmix_pubmedqa \
        --metadata '{"data": "path/to/pubmedqa"}'

Every task but MedQA is lm-eval's own on these files: the loaders give the records in the schema lm-eval's task reads
from the Hub. A malformed file stops the run with its name, record and field.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict

from sftmix_trl.errors import EvalError
from sftmix_trl.evaluation.choice import load_medmcqa, load_medqa, load_mmlu, load_pubmedqa
from sftmix_trl.evaluation.ifeval import load_ifeval

MMLU_FEWSHOT_SPLIT = "dev"  # lm-eval's mmlu tasks take their few-shot examples from cais/mmlu's 5-question dev split


def _required(data: str | None, task: str) -> str:
    if not data:
        raise EvalError(f"task sftmix_{task} needs its data path: pass `data` in the task's metadata")
    return data


def pubmedqa(data: str | None = None, **_) -> DatasetDict:
    """PubMedQA-L from a local folder for lm-eval's pubmedqa task: the 500-item test split, and the other 500 labelled
    items as `train` (the few-shot examples, as lm-eval's bigbio copy has them)."""
    folder = _required(data, "pubmedqa")
    return DatasetDict({split: Dataset.from_list(load_pubmedqa(folder, split)) for split in ("test", "train")})


def mmlu(data: str | None = None, subject: str | None = None, split: str = "test", **_) -> DatasetDict:
    """One MMLU subject for lm-eval's mmlu_<subject> task: `<subject>_<split>.csv` as `test`, `<subject>_dev.csv` (if
    the folder has it: only few-shot runs need it) as `dev`."""
    folder = _required(data, "mmlu_medical")
    if not subject:
        raise EvalError("an sftmix_mmlu_<subject> task needs `subject` in its dataset_kwargs")
    scored = Dataset.from_list(load_mmlu(folder, subject, split))
    has_dev = (Path(folder).expanduser() / f"{subject}_{MMLU_FEWSHOT_SPLIT}.csv").is_file()
    fewshot = Dataset.from_list(load_mmlu(folder, subject, MMLU_FEWSHOT_SPLIT)) if has_dev else scored.select([])
    return DatasetDict({"test": scored, MMLU_FEWSHOT_SPLIT: fewshot})


def medqa(data: str | None = None, **_) -> DatasetDict:
    """MedQA (4 or 5 options) from a local file for this package's sftmix_medqa task: prompts built by the loader."""
    items = load_medqa(_required(data, "medqa"))
    rows = [{"id": i.id, "context": i.context, "choices": i.choices, "answer": i.answer} for i in items]
    return DatasetDict({"test": Dataset.from_list(rows)})


def medmcqa(data: str | None = None, **_) -> DatasetDict:
    """MedMCQA from a local file for lm-eval's medmcqa task."""
    return DatasetDict({"test": Dataset.from_list(load_medmcqa(_required(data, "medmcqa")))})


def ifeval(data: str | None = None, **_) -> DatasetDict:
    """IFEval prompts from a local input_data.jsonl, checked, in the schema of the Hub's google/IFEval that lm-eval's
    ifeval task reads: Arrow gives every prompt's `kwargs` every other prompt's keys (as None), which lm-eval's
    `process_results` drops, as it does for the Hub copy."""
    rows = [
        {"key": p.key, "prompt": p.prompt, "instruction_id_list": p.instruction_id_list, "kwargs": p.kwargs}
        for p in load_ifeval(_required(data, "ifeval"))
    ]
    return DatasetDict({"test": Dataset.from_list(rows)})
