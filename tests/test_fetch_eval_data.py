"""`scripts/fetch_eval_data.py` writes the layout the evaluation tasks read: its writers, fed rows shaped as the public
sources give them, produce files that this package's loaders read back. (Fetching itself needs the network.)"""

import importlib.util
import json
import shlex

import pytest
from conftest import ROOT
from test_evaluation import nltk_data  # noqa: F401  (IFEval's loader checks its rules' punkt_tab)

from sftmix_trl.configs import ModelArguments, parse_args
from sftmix_trl.evaluation import EvalArguments, load_ifeval, load_mmlu, load_pubmedqa
from sftmix_trl.evaluation.args import MMLU_MEDICAL_SUBJECTS

spec = importlib.util.spec_from_file_location("fetch_eval_data", ROOT / "scripts" / "fetch_eval_data.py")
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)


def hub_ifeval_row(key, prompt, ids, used):
    """A google/IFEval row: every instruction gets every argument, the unused ones null."""
    names = ("num_words", "relation", "keywords", "num_highlights")
    return {
        "key": key,
        "prompt": prompt,
        "instruction_id_list": ids,
        "kwargs": [{n: k.get(n) for n in names} for k in used],
    }


@pytest.mark.usefixtures("nltk_data")
def test_ifeval_rows_from_the_hub_become_input_data_jsonl(tmp_path):
    rows = [
        hub_ifeval_row(1000, "Write a poem.", ["punctuation:no_comma"], [{}]),
        hub_ifeval_row(
            1001,
            "Describe a cat.",
            ["length_constraints:number_words", "detectable_format:number_highlighted_sections"],
            [{"relation": "at least", "num_words": 50}, {"num_highlights": 2}],
        ),
    ]
    path = fetch.write_ifeval(rows, tmp_path / "ifeval")
    assert json.loads(path.read_text().splitlines()[1])["kwargs"] == [
        {"num_words": 50, "relation": "at least"},
        {"num_highlights": 2},
    ]
    prompts = load_ifeval(str(path))
    assert [(p.key, p.prompt, p.instruction_id_list) for p in prompts] == [
        (1000, "Write a poem.", ["punctuation:no_comma"]),
        (1001, "Describe a cat.", rows[1]["instruction_id_list"]),
    ]
    assert prompts[0].kwargs == [{}]


def test_mmlu_rows_from_the_hub_become_the_csv_files_the_task_reads(tmp_path):
    assert fetch.MMLU_MEDICAL_SUBJECTS == MMLU_MEDICAL_SUBJECTS
    rows = [
        {
            "question": "Which bone, of the arm?",
            "subject": "anatomy",
            "choices": ["Femur", "Humerus", "Tibia", "Ulna, radius"],
            "answer": 1,
        },
        {"question": "Second?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 3},
    ]
    for subject in MMLU_MEDICAL_SUBJECTS:
        fetch.write_mmlu(rows, tmp_path / "mmlu_medical", subject, "val")
    for subject in MMLU_MEDICAL_SUBJECTS:  # cais/mmlu's schema, which lm-eval's mmlu tasks read
        items = load_mmlu(str(tmp_path / "mmlu_medical"), subject, "val")
        assert [{k: v for k, v in item.items() if k != "id"} for item in items] == [
            {**r, "subject": subject} for r in rows
        ]


def test_pubmedqa_files_land_where_the_task_reads_them(tmp_path):
    records = {
        "1": {"QUESTION": "Does it help?", "CONTEXTS": ["One.", "Two."], "final_decision": "yes"},
        "2": {"QUESTION": "Is it bad?", "CONTEXTS": ["Three."], "final_decision": "no"},
    }
    files = {"ori_pqal.json": json.dumps(records).encode(), "test_ground_truth.json": json.dumps({"2": "no"}).encode()}
    fetch.write_pubmedqa(files, tmp_path / "pubmedqa")
    assert load_pubmedqa(str(tmp_path / "pubmedqa")) == [
        {"id": "2", "QUESTION": "Is it bad?", "CONTEXTS": ["Three."], "final_decision": "no"}
    ]
    assert [i["id"] for i in load_pubmedqa(str(tmp_path / "pubmedqa"), "train")] == ["1"]


def test_the_printed_evaluate_line_parses(tmp_path):
    line = fetch.evaluate_line(tmp_path / "eval_data", "val")
    environment, command, *argv = shlex.split(line)
    assert environment == f"NLTK_DATA={tmp_path}/eval_data/nltk_data" and command == "sftmix-trl"
    eval_args, _ = parse_args((EvalArguments, ModelArguments), argv[1:])
    assert eval_args.tasks == ["ifeval", "pubmedqa", "mmlu_medical"]
    assert eval_args.mmlu_medical_data == f"{tmp_path}/eval_data/mmlu_medical" and eval_args.mmlu_split == "val"
