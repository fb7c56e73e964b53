"""Medical multiple-choice questions from local files, for this package's lm-eval-harness tasks (`tasks/`).

Each item is a prompt, its options and the right option's index; lm-eval scores each option as a continuation of the
prompt after one space (`acc`: the highest log-likelihood; `acc_norm`: divided by the option's length in
characters). Prompts are plain text, without a chat template, in the formats of lm-eval-harness's pubmedqa, mmlu,
medqa_4options and medmcqa tasks.

Local data (the Hub copies are not used: MedQA and MedMCQA are read only from files):

- PubMedQA: a folder with `pubmedqa_ori_pqal.json` (or `ori_pqal.json`: {pmid: {QUESTION, CONTEXTS, final_decision}})
  and `pubmedqa_test_ground_truth.json` (or `test_ground_truth.json`: {pmid: label}), the 500-item test split.
- MMLU: `<subject>_<split>.csv` files without header: question, A, B, C, D, answer letter.
- MedQA / MedMCQA: a .json or .jsonl file of records ``{"question": str, "options": {"A": str, ...} or [str, ...],
  "answer": "B" | 1 | "<the option's text>"}``; MedQA's own files (with `answer_idx`) are read as they are.
"""

from __future__ import annotations

import csv
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

from sftmix_trl.data.load import DataSource, read_source
from sftmix_trl.errors import EvalError

logger = logging.getLogger(__name__)

PUBMEDQA_CHOICES = ("yes", "no", "maybe")
PUBMEDQA_FILES = (
    ("pubmedqa_ori_pqal.json", "ori_pqal.json"),
    ("pubmedqa_test_ground_truth.json", "test_ground_truth.json"),
)
LETTERS = string.ascii_uppercase


@dataclass
class ChoiceItem:
    """One question: the prompt, its options (continuations, without the delimiter) and the right one's index."""

    id: str
    context: str
    choices: list[str]
    answer: int
    group: str  # the task, or the MMLU subject (mmlu_<subject>)


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EvalError(f"{path}: malformed JSON at line {error.lineno} ({error.msg})") from None


def load_pubmedqa(folder: str, limit: int | None = None) -> list[ChoiceItem]:
    """The PubMedQA-L test split (500 items, in the ground-truth file's order), prompts as lm-eval-harness's."""
    base = Path(folder).expanduser()
    if not base.is_dir():
        raise EvalError(f"PubMedQA folder not found: {folder}")
    paths = []
    for names in PUBMEDQA_FILES:
        found = next((base / name for name in names if (base / name).is_file()), None)
        if found is None:
            raise EvalError(f"PubMedQA folder {folder} has no {' or '.join(names)}")
        paths.append(found)
    records, truth = _read_json(paths[0]), _read_json(paths[1])
    if not isinstance(records, dict) or not isinstance(truth, dict):
        raise EvalError(f"{paths[0]} and {paths[1]} must each hold a JSON object keyed by PubMed id")
    items = []
    for pmid, label in list(truth.items())[:limit]:
        where = f"{paths[0]}, record {pmid}"
        record = records.get(pmid)
        if record is None:
            raise EvalError(f"{paths[1]}: test id {pmid} is not in {paths[0]}")
        for name in ("QUESTION", "CONTEXTS"):
            if record.get(name) is None:
                raise EvalError(f"{where}: missing field '{name}'")
        if label not in PUBMEDQA_CHOICES:
            raise EvalError(f"{paths[1]}, record {pmid}: label {label!r} is not one of {', '.join(PUBMEDQA_CHOICES)}")
        contexts = record["CONTEXTS"] if isinstance(record["CONTEXTS"], list) else [record["CONTEXTS"]]
        context = "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(contexts), record["QUESTION"])
        items.append(ChoiceItem(pmid, context, list(PUBMEDQA_CHOICES), PUBMEDQA_CHOICES.index(label), "pubmedqa"))
    return items


def load_mmlu(folder: str, subjects: list[str], split: str = "test", limit: int | None = None) -> list[ChoiceItem]:
    """MMLU questions of the given subjects (the first `limit` of each), prompts as lm-eval-harness's mmlu."""
    base = Path(folder).expanduser()
    if not base.is_dir():
        raise EvalError(f"MMLU folder not found: {folder}")
    items = []
    for subject in subjects:
        path = base / f"{subject}_{split}.csv"
        if not path.is_file():
            present = sorted(p.name for p in base.glob("*.csv"))[:12]
            raise EvalError(f"MMLU file not found: {path} (the folder has {present}); check `mmlu_split`")
        description = (
            f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        )
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        for number, row in enumerate(rows[:limit], start=1):
            where = f"{path}, row {number}"
            if len(row) != 6:
                fields = ("question", "A", "B", "C", "D", "answer")
                missing = f"missing field '{fields[len(row)]}'" if len(row) < 6 else f"{len(row)} fields"
                raise EvalError(f"{where}: {missing}; expected 6 columns: question, A, B, C, D, answer letter")
            answer = row[5].strip()
            if answer not in LETTERS[:4]:
                raise EvalError(f"{where}: field 'answer' is {answer!r}, expected one of A, B, C, D")
            question, options = row[0].strip(), row[1:5]
            text = question + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, options))
            items.append(
                ChoiceItem(
                    f"{subject}/{number}",
                    description + text + "\nAnswer:",
                    list(LETTERS[:4]),
                    LETTERS.index(answer),
                    f"mmlu_{subject}",
                )
            )
    return items


def _options(record: dict, where: str) -> tuple[list[str], list[str]]:
    """(letters, texts) of a record's options."""
    options = record["options"]
    if isinstance(options, dict):
        letters = sorted(options)
        if not all(isinstance(k, str) and len(k) == 1 and k in LETTERS for k in letters):
            raise EvalError(f"{where}: field 'options' must be keyed by capital letters, got {letters}")
        texts = [options[k] for k in letters]
    elif isinstance(options, list):
        letters, texts = list(LETTERS[: len(options)]), options
    else:
        raise EvalError(f"{where}: field 'options' must be a {{letter: text}} mapping or a list of texts")
    if len(texts) < 2 or not all(isinstance(t, str) for t in texts):
        raise EvalError(f"{where}: field 'options' must hold at least two option texts (strings)")
    return letters, texts


def _answer(record: dict, letters: list[str], texts: list[str], where: str) -> int:
    answer = record.get("answer_idx", record["answer"])
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int) and 0 <= answer < len(texts):
        return answer
    if isinstance(answer, str) and answer.strip() in letters:
        return letters.index(answer.strip())
    if isinstance(answer, str) and answer in texts:
        return texts.index(answer)
    raise EvalError(
        f"{where}: field 'answer' is {answer!r}: expected one of the option letters {letters}, a 0-based index "
        "or an option's text"
    )


def load_choice_file(path: str, task: str, limit: int | None = None) -> list[ChoiceItem]:
    """MedQA or MedMCQA from a local .json/.jsonl file (schema in this module's docstring)."""
    if not Path(path).expanduser().exists():
        raise EvalError(f"{task} data file not found: {path}")
    records = read_source(DataSource(path=str(Path(path).expanduser())))  # a DataError names the file and record
    if not records:
        raise EvalError(f"{path}: no {task} question in it")
    items = []
    for where, record in records[:limit]:
        if not isinstance(record, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in ("question", "options", "answer"):
            if record.get(name) is None and not (name == "answer" and record.get("answer_idx") is not None):
                raise EvalError(f"{where}: missing field '{name}' (a {task} record needs question, options, answer)")
        if not isinstance(record["question"], str):
            raise EvalError(f"{where}: field 'question' must be a string")
        letters, texts = _options(record, where)
        answer = _answer(record, letters, texts, where)
        listed = "".join(f"{letter}. {text}\n" for letter, text in zip(letters, texts))
        if task == "medmcqa":
            context = f"Question: {record['question']}\nChoices:\n{listed}Answer:"
        else:
            context = f"Question: {record['question']}\n{listed}Answer:"
        items.append(ChoiceItem(str(record.get("id", where)), context, letters, answer, task))
    return items
