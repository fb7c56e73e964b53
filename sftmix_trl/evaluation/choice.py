"""Medical multiple-choice questions from local files, read and checked for this package's lm-eval-harness tasks.

PubMedQA, MMLU and MedMCQA are lm-eval's own tasks (`pubmedqa`, `mmlu_<subject>`, `medmcqa`: their prompts, options,
targets and metrics), so their readers give records in the schema those tasks read from the Hub (bigbio/pubmed_qa,
cais/mmlu, openlifescienceai/medmcqa), plus an `id`. MedQA stays this package's task: lm-eval's `medqa_4options`
hard-codes four options, and MedQA is also published with five; its reader gives the prompt itself (`ChoiceItem`),
in lm-eval's medqa format.

Local data (MedQA and MedMCQA are read only from files):

- PubMedQA: a folder with `pubmedqa_ori_pqal.json` (or `ori_pqal.json`: {pmid: {QUESTION, CONTEXTS, final_decision}})
  and `pubmedqa_test_ground_truth.json` (or `test_ground_truth.json`: {pmid: label}), the 500-item test split.
- MMLU: `<subject>_<split>.csv` files without header: question, A, B, C, D, answer letter.
- MedQA / MedMCQA: a .json or .jsonl file of records ``{"question": str, "options": {"A": str, ...} or [str, ...],
  "answer": "B" | 1 | "<the option's text>"}``; MedQA's own files (with `answer_idx`) are read as they are.
"""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass
from pathlib import Path

from sftmix_trl.data.load import DataSource, read_source
from sftmix_trl.errors import EvalError

PUBMEDQA_CHOICES = ("yes", "no", "maybe")
PUBMEDQA_FILES = (
    ("pubmedqa_ori_pqal.json", "ori_pqal.json"),
    ("pubmedqa_test_ground_truth.json", "test_ground_truth.json"),
)
PUBMEDQA_SPLITS = ("test", "train")
MEDMCQA_OPTION_FIELDS = ("opa", "opb", "opc", "opd")
LETTERS = string.ascii_uppercase


@dataclass
class ChoiceItem:
    """One MedQA question: the prompt, its options (continuations, without the delimiter) and the right one's index."""

    id: str
    context: str
    choices: list[str]
    answer: int


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EvalError(f"{path}: malformed JSON at line {error.lineno} ({error.msg})") from None


def load_pubmedqa(folder: str, split: str = "test", limit: int | None = None) -> list[dict]:
    """PubMedQA-L in the schema of lm-eval's `pubmedqa` (QUESTION, CONTEXTS, final_decision; `id`: the PubMed id).

    `test`: the standard 500-item test split, in the ground-truth file's order, its label from that file. `train`: the
    other 500 expert-labelled items (lm-eval's bigbio fold 0 splits them 450 / 50 into train and validation), the
    few-shot examples of a `num_fewshot` run.
    """
    if split not in PUBMEDQA_SPLITS:
        raise EvalError(f"PubMedQA split {split!r}: expected one of {', '.join(PUBMEDQA_SPLITS)}")
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
    for pmid in truth:
        if pmid not in records:
            raise EvalError(f"{paths[1]}: test id {pmid} is not in {paths[0]}")
    if split == "test":
        labelled = [(pmid, label, f"{paths[1]}, record {pmid}") for pmid, label in truth.items()]
    else:
        labelled = [
            (pmid, record.get("final_decision") if isinstance(record, dict) else None, f"{paths[0]}, record {pmid}")
            for pmid, record in records.items()
            if pmid not in truth
        ]
    items = []
    for pmid, label, label_where in labelled[:limit]:
        record, where = records[pmid], f"{paths[0]}, record {pmid}"
        if not isinstance(record, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in ("QUESTION", "CONTEXTS"):
            if record.get(name) is None:
                raise EvalError(f"{where}: missing field '{name}'")
        if label not in PUBMEDQA_CHOICES:
            raise EvalError(f"{label_where}: label {label!r} is not one of {', '.join(PUBMEDQA_CHOICES)}")
        contexts = record["CONTEXTS"] if isinstance(record["CONTEXTS"], list) else [record["CONTEXTS"]]
        items.append({"id": pmid, "QUESTION": record["QUESTION"], "CONTEXTS": contexts, "final_decision": label})
    return items


def load_mmlu(folder: str, subject: str, split: str = "test", limit: int | None = None) -> list[dict]:
    """One MMLU subject's `<subject>_<split>.csv` in cais/mmlu's schema (question, subject, choices, answer index;
    `id`: `<subject>/<row>`), the first `limit` rows."""
    base = Path(folder).expanduser()
    if not base.is_dir():
        raise EvalError(f"MMLU folder not found: {folder}")
    path = base / f"{subject}_{split}.csv"
    if not path.is_file():
        present = sorted(p.name for p in base.glob("*.csv"))[:12]
        raise EvalError(f"MMLU file not found: {path} (the folder has {present}); check `mmlu_split`")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    items = []
    for number, row in enumerate(rows[:limit], start=1):
        where = f"{path}, row {number}"
        if len(row) != 6:
            fields = ("question", "A", "B", "C", "D", "answer")
            missing = f"missing field '{fields[len(row)]}'" if len(row) < 6 else f"{len(row)} fields"
            raise EvalError(f"{where}: {missing}; expected 6 columns: question, A, B, C, D, answer letter")
        answer = row[5].strip()
        if answer not in LETTERS[:4]:
            raise EvalError(f"{where}: field 'answer' is {answer!r}, expected one of A, B, C, D")
        items.append(
            {
                "id": f"{subject}/{number}",
                "question": row[0],
                "subject": subject,
                "choices": row[1:5],
                "answer": LETTERS.index(answer),
            }
        )
    return items


# ----------------------------------------------------------------------------------------------------------------------
# MedQA and MedMCQA: {question, options, answer} records


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


def _read_questions(path: str, task: str, limit: int | None) -> list[tuple[str, dict, list[str], list[str], int]]:
    """(location, record, option letters, option texts, answer index) of each of the first `limit` records."""
    if not Path(path).expanduser().exists():
        raise EvalError(f"{task} data file not found: {path}")
    records = read_source(DataSource(path=str(Path(path).expanduser())))  # a DataError names the file and record
    if not records:
        raise EvalError(f"{path}: no {task} question in it")
    questions = []
    for where, record in records[:limit]:
        if not isinstance(record, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in ("question", "options", "answer"):
            if record.get(name) is None and not (name == "answer" and record.get("answer_idx") is not None):
                raise EvalError(f"{where}: missing field '{name}' (a {task} record needs question, options, answer)")
        if not isinstance(record["question"], str):
            raise EvalError(f"{where}: field 'question' must be a string")
        letters, texts = _options(record, where)
        questions.append((where, record, letters, texts, _answer(record, letters, texts, where)))
    return questions


def load_medqa(path: str, limit: int | None = None) -> list[ChoiceItem]:
    """MedQA (any number of options) from a local .json/.jsonl file, prompts as lm-eval-harness's medqa task."""
    items = []
    for where, record, letters, texts, answer in _read_questions(path, "medqa", limit):
        listed = "".join(f"{letter}. {text}\n" for letter, text in zip(letters, texts))
        context = f"Question: {record['question']}\n{listed}Answer:"
        items.append(ChoiceItem(str(record.get("id", where)), context, letters, answer))
    return items


def load_medmcqa(path: str, limit: int | None = None) -> list[dict]:
    """MedMCQA from a local .json/.jsonl file in the schema of lm-eval's `medmcqa` (question, opa-opd, cop: the right
    option's 0-based index; `id`). Every question needs exactly four options, as MedMCQA's have."""
    items = []
    for where, record, _, texts, answer in _read_questions(path, "medmcqa", limit):
        if len(texts) != len(MEDMCQA_OPTION_FIELDS):
            raise EvalError(f"{where}: a MedMCQA question has 4 options (A-D), this one {len(texts)}")
        options = dict(zip(MEDMCQA_OPTION_FIELDS, texts))
        items.append({"id": str(record.get("id", where)), "question": record["question"], **options, "cop": answer})
    return items
