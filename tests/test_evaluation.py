"""Evaluation: the IFEval scorer against published figures, log-likelihood multiple choice, response perplexity,
adapter checks, input errors, and `recipes/evaluate.py` end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_DATA, ROOT, build_tiny_model, run_recipe, shared_data_dir, write_jsonl
from datasets import Dataset

from sftmix_trl.adapter import check_adapter, load_with_adapter
from sftmix_trl.configs import ModelArguments, parse_args
from sftmix_trl.evaluation import (
    MMLU_MEDICAL_SUBJECTS,
    TASKS,
    EvalArguments,
    EvalError,
    check_punkt,
    evaluate,
    load_ifeval,
    load_medmcqa,
    load_medqa,
    load_mmlu,
    load_pubmedqa,
    match_responses,
    response_perplexity,
    score_ifeval,
)
from sftmix_trl.evaluation.perplexity import render, scoring_rows
from sftmix_trl.evaluation.runner import load_task_data, sample_items
from sftmix_trl.model import load_tokenizer

SHARED = shared_data_dir()
IFEVAL_DIR = SHARED / "eval" / "ifeval" if SHARED else None
NLTK_DATA = SHARED / "nltk_data" if SHARED else None
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared data (../shared/data) is absent")


@pytest.fixture
def nltk_data(monkeypatch):
    if NLTK_DATA is None or not NLTK_DATA.is_dir():
        pytest.skip("shared nltk_data is absent")
    monkeypatch.setenv("NLTK_DATA", str(NLTK_DATA))
    return NLTK_DATA


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------------
# IFEval scoring


@needs_shared
def test_ifeval_scorer_reproduces_the_published_gpt4_figures(nltk_data):
    prompts = load_ifeval(str(IFEVAL_DIR / "input_data.jsonl"))
    responses = match_responses(prompts, read_jsonl(IFEVAL_DIR / "gpt4_responses.jsonl"))
    metrics, samples = score_ifeval(prompts, responses)
    assert metrics["n_prompts"] == 541
    assert round(metrics["prompt_level_strict_acc"], 4) == 0.7689
    assert round(metrics["inst_level_strict_acc"], 4) == 0.8357
    assert metrics["prompt_level_loose_acc"] >= metrics["prompt_level_strict_acc"]
    assert metrics["inst_level_loose_acc"] >= metrics["inst_level_strict_acc"]

    # Per prompt, against Google's reference verdicts. Their prompt text is the one the responses were made for,
    # so the prompt edited upstream since has no reference. Prompts 1122 and 1129 ask for at least 4 "#" and 6 "!",
    # which the letter-frequency rule replaces by a random letter: only those verdicts may differ, and with the
    # per-prompt seed (one draw for the strict verdict, then one for the loose) only 1122's strict verdict does.
    for mode, expected in (("strict", {1122}), ("loose", set())):
        reference = {r["prompt"]: r for r in read_jsonl(IFEVAL_DIR / f"gpt4_eval_results_{mode}.jsonl")}
        compared = [s for s in samples if s["prompt"] in reference]
        assert len(compared) == 540
        differing = {}
        for s in compared:
            ours, theirs = s[f"follow_instruction_list_{mode}"], reference[s["prompt"]]["follow_instruction_list"]
            if ours != theirs:
                differing[s["key"]] = {s["instruction_id_list"][i] for i in range(len(ours)) if ours[i] != theirs[i]}
        assert set(differing) == expected
        assert all(ids == {"keywords:letter_frequency"} for ids in differing.values())


@needs_shared
def test_the_ifeval_task_reproduces_the_published_gpt4_figures(nltk_data):
    """lm-eval's own ifeval task through lm-eval (this package's loader on the local file), fed GPT-4's published
    responses instead of a model's: the published figures, and the verdicts `score_ifeval` gives."""
    from lm_eval.api.model import LM

    from sftmix_trl.evaluation import harness

    prompts = load_ifeval(str(IFEVAL_DIR / "input_data.jsonl"))
    responses = match_responses(prompts, read_jsonl(IFEVAL_DIR / "gpt4_responses.jsonl"))
    reply = dict(zip((p.prompt for p in prompts), responses))

    class Replay(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [reply[request.args[0]] for request in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    args = EvalArguments(tasks=["ifeval"], ifeval_data=str(IFEVAL_DIR / "input_data.jsonl"))
    loaded = harness.load_tasks(args, lambda docs: sample_items(docs, None, 0))
    output = harness.run(Replay(), loaded, args, chat_template=False)
    figures, rows = harness.collect("ifeval", output, loaded["ifeval"])
    assert figures["n_prompts"] == 541
    assert round(figures["prompt_level_strict_acc"], 4) == 0.7689
    assert round(figures["inst_level_strict_acc"], 4) == 0.8357
    metrics, samples = score_ifeval(prompts, responses)
    assert {k: figures[k] for k in metrics} == metrics
    assert rows["ifeval"] == samples


def test_this_packages_ifeval_task_is_lm_evals_on_a_local_file():
    """Every key of tasks/sftmix_ifeval.yaml but the data's and the seeded `process_results` is lm-eval's ifeval.yaml
    (an lm-eval upgrade that changes its task shows here)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.tasks.ifeval import utils

    from sftmix_trl.evaluation import harness, ifeval

    ours = named(load_yaml(harness.TASKS_DIR / "sftmix_ifeval.yaml", resolve_func=True))
    theirs = named(load_yaml(Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml", resolve_func=True))
    data_keys = {"task", "dataset_path", "dataset_name", "custom_dataset", "test_split", "process_results"}
    assert {k: v for k, v in ours.items() if k not in data_keys} == {
        k: v for k, v in theirs.items() if k not in data_keys
    }
    assert theirs["process_results"] == named(utils.process_results)
    assert ours["process_results"] == named(ifeval.process_results)


def named(value):
    """A task config with its functions by name (lm-eval loads a task's functions from the file)."""
    if callable(value):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, dict):
        return {k: named(v) for k, v in value.items()}
    return [named(v) for v in value] if isinstance(value, list) else value


LM_EVAL_TASKS = {  # this package's task YAML -> lm-eval's own (under lm_eval/tasks/) that it runs on local files
    "sftmix_pubmedqa": "pubmedqa/pubmedqa.yaml",
    "sftmix_medmcqa": "medmcqa/medmcqa.yaml",
    **{f"sftmix_mmlu_{s}": f"mmlu/default/mmlu_{s}.yaml" for s in MMLU_MEDICAL_SUBJECTS},
}
# Where the data comes from and which splits it has: the keys this package's tasks set differently
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "custom_dataset", "dataset_kwargs"}
DATA_KEYS |= {"training_split", "validation_split", "test_split"}


def lm_eval_yaml(relative: str) -> dict:
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.tasks.__file__).parent / relative, resolve_func=True)


@pytest.mark.parametrize("ours", LM_EVAL_TASKS)
def test_this_packages_multiple_choice_tasks_are_lm_evals_on_local_files(ours):
    """Every key of tasks/<ours>.yaml but the data's equals lm-eval's task (an lm-eval upgrade that changes its task
    shows here); the few-shot split MMLU reads is lm-eval's."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from sftmix_trl.evaluation import harness

    mine = named(load_yaml(harness.TASKS_DIR / f"{ours}.yaml", resolve_func=True))
    theirs = named(lm_eval_yaml(LM_EVAL_TASKS[ours]))
    assert {k: v for k, v in mine.items() if k not in DATA_KEYS} == {
        k: v for k, v in theirs.items() if k not in DATA_KEYS
    }
    assert mine["test_split"] == "test" and mine["custom_dataset"].startswith(str(harness.TASKS_DIR / "loaders."))


def lm_evals_own_task(relative: str, ours):
    """lm-eval's own task object from its YAML, on this package's loader (the same docs as `ours`) instead of the
    Hub: only the dataset keys are replaced."""
    from lm_eval.api.task import ConfigurableTask

    config = {k: v for k, v in lm_eval_yaml(relative).items() if k not in ("dataset_path", "dataset_name", "tag")}
    config.update(custom_dataset=ours.config.custom_dataset, dataset_kwargs=ours.config.dataset_kwargs)
    return ConfigurableTask(config=config)


def test_pubmedqa_and_mmlu_prompts_are_lm_evals(tmp_path):
    """A doc read by this package's loader, rendered by its task, is the prompt lm-eval's own function renders and
    the prompt lm-eval's own task object renders (MMLU: description, question, options, "Answer:"; with 5 shots from
    the dev file), with lm-eval's options and target."""
    from lm_eval.tasks.pubmedqa.preprocess_pubmedqa import doc_to_text

    from sftmix_trl.evaluation import harness

    data = write_eval_data(tmp_path)
    shots = "".join(f"Dev question {n}?,a{n},b{n},c{n},d{n},{'ABCD'[n % 4]}\n" for n in range(5))
    (Path(data["mmlu_medical_data"]) / "anatomy_dev.csv").write_text(shots)
    args = EvalArguments(tasks=["pubmedqa", "mmlu_medical"], **data)
    loaded = harness.load_tasks(args, lambda docs: list(range(len(docs))))
    pubmedqa = loaded["pubmedqa"]["tasks"]["sftmix_pubmedqa"]
    theirs = lm_evals_own_task("pubmedqa/pubmedqa.yaml", pubmedqa)
    for doc in pubmedqa.eval_docs:
        assert pubmedqa.fewshot_context(doc, 0) == doc_to_text(doc) == theirs.fewshot_context(doc, 0)
        assert doc_to_text(doc) == "Abstract: Study {0}.\nResults.\nQuestion: Does drug {0} help?\nAnswer:".format(
            doc["id"]
        )
        assert pubmedqa.doc_to_choice(doc) == ["yes", "no", "maybe"] == theirs.doc_to_choice(doc)
        assert pubmedqa.doc_to_target(doc) == theirs.doc_to_target(doc) == doc["final_decision"]

    anatomy = loaded["mmlu_medical"]["tasks"]["sftmix_mmlu_anatomy"]
    theirs = lm_evals_own_task("mmlu/default/mmlu_anatomy.yaml", anatomy)
    doc = anatomy.eval_docs[1]
    assert (
        anatomy.fewshot_context(doc, 0)
        == theirs.fewshot_context(doc, 0)
        == (
            "The following are multiple choice questions (with answers) about anatomy.\n\n"
            "Which, muscle?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
        )
    )
    assert anatomy.doc_to_target(doc) == theirs.doc_to_target(doc) == 2
    five = anatomy.fewshot_context(doc, 5)
    assert five == theirs.fewshot_context(doc, 5)
    assert five.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Dev question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\nDev question 1?"
    )
    assert five.endswith(
        "Dev question 4?\nA. a4\nB. b4\nC. c4\nD. d4\nAnswer: A\n\nWhich, muscle?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )


def test_any_mmlu_subject_is_lm_evals_own_task_on_the_local_file(tmp_path):
    """A subject beyond the six medical ones (no YAML of this package) renders as lm-eval's own mmlu_<subject>, with
    its description; a subject MMLU does not have is refused before any model is loaded, with the close names."""
    from sftmix_trl.evaluation import harness

    data = write_eval_data(tmp_path)
    (Path(data["mmlu_medical_data"]) / "virology_test.csv").write_text("Which virus?,HIV,HPV,HCV,HBV,B\n")
    args = EvalArguments(tasks=["mmlu_medical"], **{**data, "mmlu_subjects": ["anatomy", "virology"]})
    loaded = harness.load_tasks(args, lambda docs: list(range(len(docs))))
    virology = loaded["mmlu_medical"]["tasks"]["sftmix_mmlu_virology"]
    theirs = lm_evals_own_task("mmlu/default/mmlu_virology.yaml", virology)
    doc = virology.eval_docs[0]
    assert (
        virology.fewshot_context(doc, 0)
        == theirs.fewshot_context(doc, 0)
        == (
            "The following are multiple choice questions (with answers) about virology.\n\n"
            "Which virus?\nA. HIV\nB. HPV\nC. HCV\nD. HBV\nAnswer:"
        )
    )
    assert virology.doc_to_target(doc) == theirs.doc_to_target(doc) == 1
    assert sorted(loaded["mmlu_medical"]["tasks"]) == ["sftmix_mmlu_anatomy", "sftmix_mmlu_virology"]
    args = EvalArguments(tasks=["mmlu_medical"], **{**data, "mmlu_subjects": ["virolgy"]})
    with pytest.raises(EvalError, match=r"MMLU has no subject 'virolgy' .*did you mean virology"):
        harness.load_tasks(args, lambda docs: list(range(len(docs))))


@needs_shared
def test_real_pubmedqa_and_mmlu_prompts_are_lm_evals():
    """The same on the real files: every PubMedQA test prompt, every MMLU anatomy prompt (0 and 5 shots)."""
    from lm_eval.tasks.pubmedqa.preprocess_pubmedqa import doc_to_text

    from sftmix_trl.evaluation import harness

    folder = SHARED / "eval"
    args = EvalArguments(
        tasks=["pubmedqa", "mmlu_medical"],
        pubmedqa_data=str(folder / "pubmedqa"),
        mmlu_medical_data=str(folder / "mmlu_medical"),
        mmlu_split="val",
        mmlu_subjects=["anatomy"],
    )
    loaded = harness.load_tasks(args, lambda docs: list(range(len(docs))))
    pubmedqa = loaded["pubmedqa"]["tasks"]["sftmix_pubmedqa"]
    theirs = lm_evals_own_task("pubmedqa/pubmedqa.yaml", pubmedqa)
    assert len(pubmedqa.eval_docs) == 500
    for doc in pubmedqa.eval_docs:
        assert pubmedqa.fewshot_context(doc, 0) == doc_to_text(doc) == theirs.fewshot_context(doc, 0)
    anatomy = loaded["mmlu_medical"]["tasks"]["sftmix_mmlu_anatomy"]
    theirs = lm_evals_own_task("mmlu/default/mmlu_anatomy.yaml", anatomy)
    assert len(anatomy.eval_docs) == 14
    for doc in anatomy.eval_docs:
        for shots in (0, 5):
            assert anatomy.fewshot_context(doc, shots) == theirs.fewshot_context(doc, shots)
    assert anatomy.fewshot_context(anatomy.eval_docs[0], 0).endswith("\nC. Tolerance\nD. Homeostasis\nAnswer:")


def test_few_shot_runs_without_separate_examples_are_refused(tmp_path):
    data = write_eval_data(tmp_path)
    with pytest.raises(EvalError, match=r"`num_fewshot` 3 with medqa, medmcqa: each reads one file"):
        EvalArguments(tasks=["pubmedqa", "medqa", "medmcqa"], num_fewshot=3, **data)
    with pytest.raises(EvalError, match=r"`num_fewshot` 5 with `mmlu_split` dev"):
        EvalArguments(tasks=["mmlu_medical"], num_fewshot=5, mmlu_split="dev", **data)
    args = EvalArguments(tasks=["mmlu_medical"], num_fewshot=5, **data)  # the folder has no anatomy_dev.csv
    with pytest.raises(EvalError, match=r"sftmix_mmlu_anatomy has 0 few-shot examples; .* anatomy_dev\.csv"):
        load_task_data(args)


def test_match_responses_takes_the_longest_common_prefix():
    from sftmix_trl.evaluation import IFEvalPrompt

    prompts = [
        IFEvalPrompt(1, "Write a poem about cats. Use at least 3 placeholders.", [], []),
        IFEvalPrompt(2, "Describe a dog.", [], []),
    ]
    records = [
        {"prompt": "Describe a dog.", "response": "dog"},
        {"prompt": "Write a poem about cats. Use at least one placeholder.", "response": "cats"},
        {"prompt": "Write a poem about cows.", "response": "cows"},
    ]
    assert match_responses(prompts, records) == ["cats", "dog"]
    with pytest.raises(EvalError, match="no response for IFEval prompt 3"):
        match_responses([IFEvalPrompt(3, "Something else entirely", [], [])], records)


def test_missing_punkt_fails_in_one_line_before_any_model_is_loaded(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(EvalError, match="punkt_tab") as error:
        check_punkt()
    assert "\n" not in str(error.value)
    # evaluate() checks it first: the (missing) model is never reached
    args = EvalArguments(tasks=["ifeval"], ifeval_data=str(tmp_path / "input_data.jsonl"))
    with pytest.raises(EvalError, match="punkt_tab"):
        evaluate(args, ModelArguments(model_name_or_path=str(tmp_path / "no-such-model")))


def test_ifeval_file_errors_name_the_file_record_and_field(tmp_path, nltk_data):
    good = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = write_jsonl(tmp_path / "input_data.jsonl", [good, {k: v for k, v in good.items() if k != "kwargs"}])
    with pytest.raises(EvalError, match=r"input_data\.jsonl, line 2: missing field 'kwargs'"):
        load_ifeval(str(path))
    write_jsonl(path, [good, {**good, "instruction_id_list": ["no:such_rule"]}])
    with pytest.raises(EvalError, match=r"line 2: .*unknown instruction\(s\) \['no:such_rule'\]"):
        load_ifeval(str(path))
    assert [p.key for p in load_ifeval(str(path), limit=1)] == [1]


def test_ifeval_scores_simple_responses(nltk_data):
    from sftmix_trl.evaluation import IFEvalPrompt

    prompt = IFEvalPrompt(
        7, "Answer in lowercase, without commas.", ["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}]
    )
    metrics, samples = score_ifeval([prompt, prompt], ["all in lowercase here", "Not lowercase, with a comma"])
    assert samples[0]["follow_instruction_list_strict"] == [True, True]
    assert samples[1]["follow_instruction_list_strict"] == [False, False]
    assert metrics["prompt_level_strict_acc"] == 0.5
    assert metrics["inst_level_strict_acc"] == 0.5
    assert metrics["n_instructions"] == 4


# ----------------------------------------------------------------------------------------------------------------------
# Loaders


@needs_shared
def test_real_pubmedqa_and_mmlu_files_load():
    test = load_pubmedqa(str(SHARED / "eval" / "pubmedqa"))
    train = load_pubmedqa(str(SHARED / "eval" / "pubmedqa"), "train")
    assert len(test) == len(train) == 500 and not {i["id"] for i in test} & {i["id"] for i in train}
    assert {i["final_decision"] for i in test} == {"yes", "no", "maybe"}
    assert set(test[0]) == {"id", "QUESTION", "CONTEXTS", "final_decision"} and isinstance(test[0]["CONTEXTS"], list)
    folder = str(SHARED / "eval" / "mmlu_medical")
    assert len(load_mmlu(folder, "anatomy", "val", limit=12)) == 12
    assert len(load_mmlu(folder, "medical_genetics", "val", limit=12)) == 11  # fewer than the limit
    first = load_mmlu(folder, "anatomy", "val")[0]
    assert first["choices"][3] == "Homeostasis" and first["answer"] == 3 and first["subject"] == "anatomy"
    assert len(load_mmlu(folder, "anatomy", "dev")) == 5


def test_limit_draws_a_seeded_sample_in_file_order():
    items = list(range(100))
    assert sample_items(items, None, 0) == items
    drawn = sample_items(items, 10, 0)
    assert len(drawn) == 10 and drawn == sorted(drawn) and drawn != list(range(10))
    assert sample_items(items, 10, 0) == drawn and sample_items(items, 10, 1) != drawn
    assert sample_items(items[:5], 8, 0) == list(range(5))  # fewer than the limit: all of them


@needs_shared
def test_limited_pubmedqa_is_not_the_label_sorted_prefix():
    """PubMedQA's test labels are sorted (its first 276 are "yes"): a limit must not score only one answer."""
    args = EvalArguments(tasks=["pubmedqa"], pubmedqa_data=str(SHARED / "eval" / "pubmedqa"), limit=40)
    assert {item["final_decision"] for item in load_pubmedqa(args.pubmedqa_data, limit=40)} == {"yes"}
    entry = load_task_data(args)["pubmedqa"]  # lm-eval's task and the items it scores
    ((name, task),) = entry["tasks"].items()
    assert len(entry["samples"][name]) == 40
    assert {task.eval_docs[i]["final_decision"] for i in entry["samples"][name]} == {"yes", "no", "maybe"}


def test_mmlu_row_with_a_missing_column_is_named(tmp_path):
    (tmp_path / "anatomy_test.csv").write_text("Q1?,a,b,c,d,A\nQ2?,a,b,c,d\n")
    with pytest.raises(EvalError, match=r"anatomy_test\.csv, row 2: missing field 'answer'"):
        load_mmlu(str(tmp_path), "anatomy")
    with pytest.raises(EvalError, match=r"MMLU file not found: .*anatomy_val\.csv"):
        load_mmlu(str(tmp_path), "anatomy", "val")


def test_medqa_schema_and_its_errors(tmp_path):
    records = [
        {"question": "Q1", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "B"},
        {"question": "Q2", "options": ["x", "y", "z", "w"], "answer": 3},
        {"question": "Q3", "options": ["x", "y"], "answer": "y"},
        {"question": "Q4", "options": {"A": "x", "B": "y"}, "answer": "x", "answer_idx": "A"},  # MedQA's own form
    ]
    items = load_medqa(str(write_jsonl(tmp_path / "medqa.jsonl", records)))
    assert [i.answer for i in items] == [1, 3, 1, 0]
    assert items[0].context == "Question: Q1\nA. x\nB. y\nC. z\nAnswer:"
    assert items[0].choices == ["A", "B", "C"]
    # MedMCQA: lm-eval's schema (opa-opd, cop), four options per question
    (medmcqa,) = load_medmcqa(str(write_jsonl(tmp_path / "medmcqa.jsonl", [{**records[1], "id": "q2"}])))
    assert medmcqa == {"id": "q2", "question": "Q2", "opa": "x", "opb": "y", "opc": "z", "opd": "w", "cop": 3}
    with pytest.raises(EvalError, match=r"medqa\.jsonl, line 1: a MedMCQA question has 4 options \(A-D\), this one 3"):
        load_medmcqa(str(tmp_path / "medqa.jsonl"))

    write_jsonl(tmp_path / "bad.jsonl", [records[0], {"question": "Q", "answer": "A"}])
    with pytest.raises(EvalError, match=r"bad\.jsonl, line 2: missing field 'options'"):
        load_medqa(str(tmp_path / "bad.jsonl"))
    write_jsonl(tmp_path / "bad.jsonl", [{**records[0], "answer": "E"}])
    with pytest.raises(EvalError, match=r"bad\.jsonl, line 1: field 'answer' is 'E'"):
        load_medqa(str(tmp_path / "bad.jsonl"))


def test_pubmedqa_record_without_a_question_is_named(tmp_path):
    (tmp_path / "ori_pqal.json").write_text(json.dumps({"1": {"CONTEXTS": ["c"], "final_decision": "yes"}}))
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"1": "yes"}))
    with pytest.raises(EvalError, match=r"ori_pqal\.json, record 1: missing field 'QUESTION'"):
        load_pubmedqa(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# Perplexity


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    return load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))


def test_perplexity_equals_a_hand_computation(tiny_model, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer
    model = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    records = [
        ("Name a colour.", "Blue."),
        (
            "What helps a sore throat? Answer in two sentences please.",
            "Warm drinks and rest help. See a doctor if it lasts.",
        ),
        ("Hi", "Hello there, how can I help you today with your health question?"),
    ]
    examples = [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in records
    ]
    metrics, samples = response_perplexity(model, tokenizer, Dataset.from_list(examples), batch_size=2)

    total, count, per_example = 0.0, 0, []
    for example in examples:
        prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        nll = [-float(log_probs[t - 1, ids[t]]) for t in range(start, len(ids))]
        total, count = total + sum(nll), count + len(nll)
        per_example.append(math.exp(sum(nll) / len(nll)))
    assert metrics["tokens"] == count
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-10)
    assert metrics["mean_example_perplexity"] == pytest.approx(sum(per_example) / 3, rel=1e-10)
    assert [s["perplexity"] for s in samples] == pytest.approx(per_example, rel=1e-10)
    assert metrics["perplexity"] != pytest.approx(metrics["mean_example_perplexity"], rel=1e-6)


def _hand_reply_nll(model, tokenizer, messages: list[dict], scored: list[int]) -> list[float]:
    """NLL of the tokens of the replies `scored` (message indices) in one forward over the whole conversation."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    nll = []
    for i in scored:
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False) if i < len(messages) - 1 else full
        start = len(tokenizer(before, add_special_tokens=False)["input_ids"])
        end = len(tokenizer(through, add_special_tokens=False)["input_ids"])
        nll += [-float(log_probs[t - 1, ids[t]]) for t in range(start, end)]
    return nll


CONVERSATION = [
    {"role": "system", "content": "You answer health questions briefly."},
    {"role": "user", "content": "What helps a sore throat?"},
    {"role": "assistant", "content": "Warm drinks and rest."},
    {"role": "user", "content": "And if it lasts a week?"},
    {"role": "assistant", "content": "See a doctor."},
]


@pytest.mark.parametrize("turns", ["all", "last"])
def test_perplexity_of_a_conversation_scores_its_replies_in_one_pass(tiny_model, tiny_tokenizer, tmp_path, turns):
    from transformers import LlamaForCausalLM

    from sftmix_trl.evaluation.perplexity import load_perplexity_data

    tokenizer = tiny_tokenizer
    model = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    single = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONVERSATION}, {"messages": single}])
    dataset = load_perplexity_data(str(path), turns=turns)
    rows = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    metrics, samples = response_perplexity(model, tokenizer, dataset, batch_size=1)
    hook.remove()

    scored = {len(CONVERSATION): [2, 4] if turns == "all" else [4], len(single): [1]}
    conversations = [example["prompt"] + example["completion"] for example in dataset]  # the loader's order
    expected = [_hand_reply_nll(model, tokenizer, messages, scored[len(messages)]) for messages in conversations]
    assert sum(rows) == 2  # one forward row per conversation, both replies of the first read from it
    assert [s["tokens"] for s in samples] == [len(nll) for nll in expected]
    assert [s["mean_nll"] for s in samples] == pytest.approx([sum(n) / len(n) for n in expected], rel=1e-10)
    total = sum(map(sum, expected)) / sum(map(len, expected))
    assert metrics["perplexity"] == pytest.approx(math.exp(total), rel=1e-10)


def test_perplexity_of_a_conversation_longer_than_max_length_scores_each_reply_with_the_context_that_fits(
    tiny_model, tiny_tokenizer
):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    example = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:]}
    full, _ = response_perplexity(model, tiny_tokenizer, Dataset.from_list([example]), batch_size=2)
    short, samples = response_perplexity(
        model, tiny_tokenizer, Dataset.from_list([example]), batch_size=2, max_length=24
    )
    assert short["truncated"] == 1 and full["truncated"] == 0
    assert samples[0]["tokens"] == full["tokens"]  # every reply token is still scored, on a shorter context


def test_the_replies_of_a_conversation_that_fits_are_read_from_one_row():
    ids = list(range(5, 25))
    labels = [-100] * 4 + ids[4:9] + [-100] * 3 + ids[12:20]
    assert scoring_rows(ids, [(4, 9), (12, 20)], max_length=64) == [(ids, labels)]
    assert scoring_rows(ids, [(4, 9), (12, 20)], max_length=20) == [(ids, labels)]


def test_replies_past_max_length_get_rows_of_their_own_their_context_cropped_from_the_start():
    ids = list(range(5, 25))
    # the first reply still fits whole; the second keeps the 8 tokens before it
    assert scoring_rows(ids, [(4, 9), (12, 20)], max_length=16) == [
        (ids[:9], [-100] * 4 + ids[4:9]),
        (ids[4:20], [-100] * 8 + ids[12:20]),
    ]
    # a reply longer than max_length keeps one context token and loses its end
    assert scoring_rows(ids, [(3, 20)], max_length=8) == [(ids[2:10], [-100] + ids[3:10])]


@pytest.mark.parametrize("max_length", [10, 24, 100, 2048])
def test_perplexity_of_a_conversation_scores_each_reply_on_the_last_max_length_tokens_it_can_see(
    tiny_model, tiny_tokenizer, max_length
):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    example = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:]}
    ids, spans = render(tiny_tokenizer, example)
    nll = []
    for start, end in spans:  # by hand: each reply under the longest window of max_length tokens that sees it
        kept_end = min(end, start + max_length - 1)  # a reply longer than the window loses its end
        window = 0 if end <= max_length else kept_end - max_length  # the context's start cropped
        with torch.no_grad():
            log_probs = model(torch.tensor([ids[window:kept_end]])).logits[0].log_softmax(-1)
        nll += [-float(log_probs[t - window - 1, ids[t]]) for t in range(start, kept_end)]
    metrics, samples = response_perplexity(
        model, tiny_tokenizer, Dataset.from_list([example]), batch_size=2, max_length=max_length
    )
    assert metrics["truncated"] == (len(ids) > max_length)
    assert samples[0]["tokens"] == metrics["tokens"] == len(nll)
    assert samples[0]["mean_nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-10)


def test_the_lm_head_projects_no_position_of_the_rows_itself(tiny_model, tiny_tokenizer):
    """The engine projects only the scored positions, in chunks, from the backbone's output; the model's own head
    sees one position a row (never the (B, T, V) logits of whole conversations)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    example = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:]}
    metrics, _ = response_perplexity(model, tiny_tokenizer, Dataset.from_list([example] * 3), batch_size=2)
    hook.remove()
    assert seen and set(seen) == {1}
    assert metrics["n"] == 3


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    ("tasks", "message"), [([], "no task to evaluate"), (["ifeval", "no_such_task_anywhere"], "unknown task")]
)
def test_bad_task_lists_name_the_available_tasks(tasks, message):
    with pytest.raises(EvalError, match=message) as error:
        EvalArguments(tasks=tasks)
    assert "lm-eval-harness" in str(error.value) and all(task in str(error.value) for task in TASKS)
    assert "\n" not in str(error.value)


def test_lm_eval_task_names_are_accepted():
    """Any task, group or tag lm-eval knows (here its MMLU group) needs no data field of this package."""
    assert EvalArguments(tasks=["ifeval", "mmlu", "lm_eval:pubmedqa"], ifeval_data="x").tasks[1] == "mmlu"


def test_task_without_its_data_path():
    with pytest.raises(EvalError, match="task 'pubmedqa' needs `pubmedqa_data`"):
        EvalArguments(tasks=["pubmedqa"])


def test_command_line_tasks_space_or_comma_separated():
    types = (EvalArguments, ModelArguments)
    common = ["--model_name_or_path", "m", "--perplexity_data", "x.json", "--pubmedqa_data", "p"]
    assert parse_args(types, [*common, "--tasks", "pubmedqa", "perplexity"])[0].tasks == ["pubmedqa", "perplexity"]
    assert parse_args(types, [*common, "--tasks", "pubmedqa,perplexity"])[0].tasks == ["pubmedqa", "perplexity"]
    with pytest.raises(SystemExit, match="unknown task.*available tasks: ifeval, pubmedqa"):
        parse_args(types, [*common, "--tasks", "pubmedq"])


# ----------------------------------------------------------------------------------------------------------------------
# Adapters


def make_adapter(base: Path, out: Path, **lora_kwargs) -> Path:
    """A LoRA adapter of `base`, with random (non-zero) B so that it changes the model's outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora_kwargs)
    get_peft_model(LlamaForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("other-base"), hidden=32)


@pytest.fixture(scope="module")
def foreign_adapter(other_base, tmp_path_factory) -> Path:
    return make_adapter(other_base, tmp_path_factory.mktemp("foreign-adapter"))


def test_matching_adapter_passes_the_check(tiny_model, adapter):
    config = check_adapter(str(adapter), ModelArguments(model_name_or_path=str(tiny_model)))
    assert config["r"] == 4


def test_adapter_of_another_base_is_refused(tiny_model, foreign_adapter, tmp_path):
    model_args = ModelArguments(model_name_or_path=str(tiny_model))
    # The adapter's recorded base exists here: its config is compared first
    with pytest.raises(EvalError, match="does not match .*hidden_size is 32 in the adapter's base but 64"):
        check_adapter(str(foreign_adapter), model_args)
    # Without a readable recorded base, the weight shapes tell
    copy = tmp_path / "copy"
    copy.mkdir()
    config = json.loads((foreign_adapter / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/unknown"}))
    (copy / "adapter_model.safetensors").write_bytes((foreign_adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(EvalError, match=r"lora_A\.weight has input size 32 but .* has 64"):
        check_adapter(str(copy), model_args)
    # Another architecture's module names
    config["base_model_name_or_path"] = "org/unknown"
    (copy / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn", "c_proj"]}))
    with pytest.raises(EvalError, match=r"target module\(s\) \['c_attn', 'c_proj'\] do not exist in the llama base"):
        check_adapter(str(copy), model_args)
    with pytest.raises(EvalError, match="not a saved PEFT adapter"):
        check_adapter(str(tmp_path), model_args)


def test_adapter_is_applied_on_a_4bit_base_with_the_repack_guard(tiny_model, adapter, tiny_tokenizer):
    from bitsandbytes.nn import Linear4bit

    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=True)
    base = load_with_adapter(model_args)
    tuned = load_with_adapter(model_args, str(adapter))
    layers = [m for m in tuned.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert not tuned.training
    batch = tiny_tokenizer(["Name a colour."], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, tuned(**batch).logits)


# ----------------------------------------------------------------------------------------------------------------------
# The recipe, end to end


def write_eval_data(folder: Path) -> dict:
    """Tiny local files for every task; returns the config keys pointing at them."""
    ifeval = [
        {
            "key": 1,
            "prompt": "Write about tea in lowercase.",
            "instruction_id_list": ["change_case:english_lowercase"],
            "kwargs": [{}],
        },
        {
            "key": 2,
            "prompt": "Name three fruits without commas.",
            "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}],
        },
        {"key": 3, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    write_jsonl(folder / "input_data.jsonl", ifeval)
    pubmedqa = folder / "pubmedqa"
    pubmedqa.mkdir()
    records = {str(i): {"QUESTION": f"Does drug {i} help?", "CONTEXTS": [f"Study {i}.", "Results."]} for i in range(3)}
    (pubmedqa / "pubmedqa_ori_pqal.json").write_text(json.dumps(records))
    (pubmedqa / "pubmedqa_test_ground_truth.json").write_text(json.dumps({"0": "yes", "1": "no", "2": "maybe"}))
    mmlu = folder / "mmlu"
    mmlu.mkdir()
    (mmlu / "anatomy_test.csv").write_text('Which bone?,Femur,Tibia,Ulna,Radius,A\n"Which, muscle?",a,b,c,d,C\n')
    write_jsonl(folder / "medqa.jsonl", [{"question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "A"}] * 2)
    medmcqa = [
        {"id": "m1", "question": "Which vitamin?", "options": ["A", "B12", "C", "D"], "answer": 1},
        {
            "id": "m2",
            "question": "Which organ?",
            "options": {"A": "Liver", "B": "Lung", "C": "Heart", "D": "Skin"},
            "answer": "C",
        },
    ]
    write_jsonl(folder / "medmcqa.jsonl", medmcqa)
    return {
        "ifeval_data": str(folder / "input_data.jsonl"),
        "pubmedqa_data": str(pubmedqa),
        "mmlu_medical_data": str(mmlu),
        "mmlu_subjects": ["anatomy"],
        "medqa_data": str(folder / "medqa.jsonl"),
        "medmcqa_data": str(folder / "medmcqa.jsonl"),
        "perplexity_data": str(DEMO_DATA / "health_qa.json"),
    }


@pytest.mark.slow
def test_evaluate_recipe_end_to_end_with_an_adapter(tiny_model, adapter, tmp_path):
    have_nltk = NLTK_DATA is not None and NLTK_DATA.is_dir()
    tasks = (["ifeval"] if have_nltk else []) + ["pubmedqa", "mmlu_medical", "medqa", "perplexity"]
    config = tmp_path / "evaluate.yaml"
    values = {
        "model_name_or_path": str(tiny_model),
        "adapter_path": str(adapter),
        "tasks": tasks,
        "limit": 2,
        "max_new_tokens": 8,
        "batch_size": 2,
        "output_dir": str(tmp_path / "out"),
        **write_eval_data(tmp_path),
    }
    config.write_text(yaml.safe_dump(values))
    env = {"NLTK_DATA": str(NLTK_DATA)} if have_nltk else {}
    result = run_recipe("evaluate.py", "--config", str(config), env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    payload = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    results = payload["results"]
    assert payload["model"]["adapter_path"] == str(adapter)
    assert payload["model"]["adapter_config"]["r"] == 4
    assert payload["model"]["load_in_4bit"] is True
    assert payload["config"]["limit"] == 2 and payload["config"]["tasks"] == tasks
    assert payload["versions"]["transformers"] and payload["versions"]["peft"]
    assert results["pubmedqa"]["n"] == 2 and results["medqa"]["n"] == 2
    assert results["mmlu_medical"]["subjects"]["anatomy"]["n"] == 2
    assert results["medical_average"]["benchmarks"] == ["medqa", "mmlu_anatomy", "pubmedqa"]
    average = (results["pubmedqa"]["acc"] + results["medqa"]["acc"] + results["mmlu_medical"]["acc"]) / 3
    assert results["medical_average"]["acc"] == pytest.approx(average)
    assert results["perplexity"]["n"] == 2 and results["perplexity"]["perplexity"] > 1
    assert 0 <= results["pubmedqa"]["acc"] <= 1

    table = (tmp_path / "out" / "eval_results.md").read_text()
    assert "| pubmedqa | acc |" in table and "| perplexity | perplexity |" in table
    assert len(read_jsonl(tmp_path / "out" / "samples_pubmedqa.jsonl")) == 2
    if have_nltk:
        assert results["ifeval"]["n_prompts"] == 2
        assert "| ifeval | prompt_level_strict_acc |" in table
        generations = read_jsonl(tmp_path / "out" / "samples_ifeval.jsonl")
        keys = [json.loads(line)["key"] for line in Path(values["ifeval_data"]).read_text().splitlines()]
        drawn = [keys[i] for i in sample_items(keys, 2, 0)]  # `limit` draws a seeded sample, in file order
        assert [g["key"] for g in generations] == drawn and len(set(drawn)) == 2
        assert all(isinstance(g["response"], str) for g in generations)


def test_adapter_mismatch_stops_the_recipe_before_generation(tiny_model, foreign_adapter, tmp_path):
    data = write_eval_data(tmp_path)
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(ROOT / "recipes" / "evaluate.py"),
        "--model_name_or_path", str(tiny_model), "--adapter_path", str(foreign_adapter),
        "--tasks", "medqa", "perplexity", "--medqa_data", data["medqa_data"],
        "--perplexity_data", data["perplexity_data"], "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: adapter ") and "does not match the base" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Loading weights" not in result.stderr + result.stdout  # the base was never loaded
    assert not out.exists()


def flatten(results: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            flat[prefix + key] = value
    return flat


@pytest.mark.slow
def test_two_processes_give_the_single_process_results(tiny_model, tmp_path, monkeypatch):
    have_nltk = NLTK_DATA is not None and NLTK_DATA.is_dir()
    tasks = (["ifeval"] if have_nltk else []) + ["pubmedqa", "medqa", "perplexity"]
    values = {"tasks": tasks, "limit": 3, "max_new_tokens": 6, "batch_size": 2, **write_eval_data(tmp_path)}
    values.pop("mmlu_subjects")
    env = {"NLTK_DATA": str(NLTK_DATA)} if have_nltk else {}
    config = tmp_path / "evaluate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model),
                "load_in_4bit": False,
                "output_dir": str(tmp_path / "two"),
                **values,
            }
        )
    )
    result = run_recipe("evaluate.py", "--config", str(config), num_processes=2, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert two["num_processes"] == 2

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    one = evaluate(
        EvalArguments(output_dir=str(tmp_path / "one"), **values),
        ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False),
    )
    assert one["num_processes"] == 1
    assert flatten(two["results"]) == pytest.approx(flatten(one["results"]), rel=1e-5)
    for task in tasks:  # every item scored once, in the same order
        rows = [read_jsonl(tmp_path / run / f"samples_{task}.jsonl") for run in ("one", "two")]
        assert len(rows[0]) == len(rows[1]) == (2 if task == "medqa" else 3)
        assert [r.get("id", r.get("key", r.get("index"))) for r in rows[0]] == [
            r.get("id", r.get("key", r.get("index"))) for r in rows[1]
        ]
        if task == "ifeval":
            assert [r["response"] for r in rows[0]] == [r["response"] for r in rows[1]]


def test_evaluation_max_length_that_leaves_no_scored_token_is_refused_before_loading():
    from sftmix_trl.evaluation import EvalArguments, EvalError

    with pytest.raises(EvalError, match=r"`max_length` must be >= 2"):
        EvalArguments(tasks=["perplexity"], perplexity_data="data/demo/health_qa.json", max_length=1)


def hand_questions(data: dict, subjects: list[str]) -> dict[str, list[tuple[str, str, list[str], int]]]:
    """(id, prompt, options, answer) of every question of `write_eval_data`'s files, each prompt written out here in
    the benchmark's lm-eval format (not through lm-eval)."""
    mmlu = []
    for subject in subjects:
        description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
        for q in load_mmlu(data["mmlu_medical_data"], subject):
            listed = "".join(f"\n{letter}. {option}" for letter, option in zip("ABCD", q["choices"]))
            mmlu.append(
                (q["id"], f"{description}\n\n{q['question'].strip()}{listed}\nAnswer:", list("ABCD"), q["answer"])
            )
    pubmedqa = [
        (
            q["id"],
            "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(q["CONTEXTS"]), q["QUESTION"]),
            ["yes", "no", "maybe"],
            ["yes", "no", "maybe"].index(q["final_decision"]),
        )
        for q in load_pubmedqa(data["pubmedqa_data"])
    ]
    medmcqa = [
        (
            q["id"],
            f"Question: {q['question']}\nChoices:\nA. {q['opa']}\nB. {q['opb']}\nC. {q['opc']}\nD. {q['opd']}\nAnswer:",
            list("ABCD"),
            q["cop"],
        )
        for q in load_medmcqa(data["medmcqa_data"])
    ]
    medqa = [(q.id, q.context, q.choices, q.answer) for q in load_medqa(data["medqa_data"])]
    return {"pubmedqa": pubmedqa, "mmlu_medical": mmlu, "medqa": medqa, "medmcqa": medmcqa}


def test_this_packages_tasks_through_lm_eval_score_as_computed_by_hand(tiny_model, tiny_tokenizer, tmp_path):
    """lm-eval's `HFLM` on the model built here: every option's log-likelihood is the one a forward pass gives (the
    prompt in the benchmark's format, the option after one space), the prediction its argmax, the figures the mean
    (MMLU's over all its questions, each subject's over its own); IFEval's responses are the greedy replies through
    the chat template (`sftmix_trl.after_training.generate`, batched apart)."""
    from transformers import LlamaForCausalLM

    from sftmix_trl.after_training.generate import generate_replies
    from sftmix_trl.evaluation.ifeval import load_ifeval

    have_nltk = NLTK_DATA is not None and NLTK_DATA.is_dir()
    if have_nltk:
        os.environ["NLTK_DATA"] = str(NLTK_DATA)
    data = write_eval_data(tmp_path)
    (Path(data["mmlu_medical_data"]) / "medical_genetics_test.csv").write_text("Which gene?,BRCA1,TP53,CFTR,HBB,D\n")
    data["mmlu_subjects"] = ["anatomy", "medical_genetics"]  # 2 and 1 questions: the average weighs by size
    tasks = ["pubmedqa", "mmlu_medical", "medqa", "medmcqa"] + (["ifeval"] if have_nltk else [])
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    args = EvalArguments(tasks=tasks, output_dir=str(tmp_path / "out"), max_new_tokens=12, batch_size=2, **data)
    results = evaluate(args, model_args)["results"]
    model = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    for task, questions in hand_questions(data, data["mmlu_subjects"]).items():
        rows = read_jsonl(tmp_path / "out" / f"samples_{task}.jsonl")
        assert [r["id"] for r in rows] == [q[0] for q in questions]
        for row, (_, prompt, options, answer) in zip(rows, questions):
            scores = [hand_log_likelihood(model, tiny_tokenizer, prompt, " " + c) for c in options]
            assert row["loglikelihoods"] == pytest.approx(scores, abs=1e-4)
            assert row["prediction"] == scores.index(max(scores)) and row["answer"] == answer
            assert row["acc"] == float(row["prediction"] == answer)
            # acc_norm where lm-eval's task reports it (medmcqa; medqa as it): per character of the option
            assert ("acc_norm" in row) == (task in ("medqa", "medmcqa")) == ("acc_norm" in results[task])
            if "acc_norm" in row:
                normalised = [s / len(c) for s, c in zip(scores, options)]
                assert row["acc_norm"] == float(normalised.index(max(normalised)) == answer)
        assert results[task]["acc"] == pytest.approx(sum(r["acc"] for r in rows) / len(rows))
        assert results[task]["n"] == len(questions)
    rows = read_jsonl(tmp_path / "out" / "samples_mmlu_medical.jsonl")
    for subject, figures in results["mmlu_medical"]["subjects"].items():
        own = [r["acc"] for r in rows if r["group"] == f"mmlu_{subject}"]
        assert figures == {"acc": pytest.approx(sum(own) / len(own)), "n": len(own)}
    assert [results["mmlu_medical"]["subjects"][s]["n"] for s in data["mmlu_subjects"]] == [2, 1]
    if have_nltk:
        prompts = load_ifeval(data["ifeval_data"])
        conversations = [[{"role": "user", "content": p.prompt}] for p in prompts]
        tokenizer = load_tokenizer(model_args)
        responses = generate_replies(load_with_adapter(model_args), tokenizer, conversations, 12, batch_size=1)
        assert [r["response"] for r in read_jsonl(tmp_path / "out" / "samples_ifeval.jsonl")] == responses
        metrics, _ = score_ifeval(prompts, responses)
        assert {k: results["ifeval"][k] for k in metrics} == metrics


def write_yaml_task(folder: Path) -> Path:
    """A task of the user's own in lm-eval's format: yes/no questions from a local JSONL file."""
    rows = [{"question": f"Is {n} even?", "label": n % 2} for n in range(6)]
    data = write_jsonl(folder / "even.jsonl", rows)
    config = {
        "task": "local_even",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": ["yes", "no"],
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    path = folder / "local_even.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_lm_eval_task_of_ones_own_runs_with_this_packages_tasks(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import LlamaForCausalLM

    task = str(write_yaml_task(tmp_path))
    data = write_eval_data(tmp_path)
    args = EvalArguments(
        tasks=[task, "medqa"], medqa_data=data["medqa_data"], limit=4, output_dir=str(tmp_path / "out")
    )
    payload = evaluate(args, ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False))
    figures = payload["results"][task]
    assert figures["n"] == 4 and set(figures) == {"acc", "n"}
    assert payload["results"]["medqa"]["n"] == 2
    rows = read_jsonl(tmp_path / "out" / "samples_local_even.jsonl")
    assert [r["doc_id"] for r in rows] == sample_items(list(range(6)), 4, 0)  # the seeded sample
    # lm-eval's verdicts are the model's: the more likely of " yes" / " no" after the prompt
    model = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    for row in rows:
        prompt = f"Question: {row['doc']['question']}\nAnswer:"
        scores = [hand_log_likelihood(model, tiny_tokenizer, prompt, " " + c) for c in ("yes", "no")]
        assert [r[0] for r in row["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
        assert row["acc"] == float(scores.index(max(scores)) == row["doc"]["label"])
    assert figures["acc"] == sum(r["acc"] for r in rows) / 4
    assert f"| {task} | acc |" in (tmp_path / "out" / "eval_results.md").read_text()


def hand_log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one forward pass; the continuation's tokens are those that follow the
    context's own tokens in the encoding of the whole text (lm-eval's split)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        log_probs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(float(log_probs[t - 1, whole[t]]) for t in range(start, len(whole)))


def test_perplexity_without_data_scores_the_held_out_split_of_the_adapters_run(tmp_path):
    """`evaluate --adapter_path A --tasks perplexity` scores the split the run held out (as `merge` measures), re-read
    from A's sftmix_run.json; a run that held nothing out says what to give instead."""
    from sftmix_trl.data.load import EXAMPLE_ID
    from sftmix_trl.evaluation.perplexity import load_perplexity_data

    adapter, health = tmp_path / "adapter", str(DEMO_DATA / "health_qa.json")
    adapter.mkdir()

    def record(eval_split_size):
        config = {"dataset_name": health, "eval_split_size": eval_split_size, "dataset_seed": 42}
        (adapter / "sftmix_run.json").write_text(json.dumps({"recipe": "sft.py", "config": config}))

    record(6)
    held = load_task_data(EvalArguments(tasks=["perplexity"], adapter_path=str(adapter)))["perplexity"]
    assert held[EXAMPLE_ID] == load_perplexity_data(health, held_out=6, seed=42)[EXAMPLE_ID] and len(held) == 6
    with pytest.raises(EvalError, match="task 'perplexity' needs `perplexity_data`"):
        EvalArguments(tasks=["perplexity"])  # no adapter, no run to read a held-out split from
    record(0)
    with pytest.raises(EvalError, match=r"the run held no data out .*Instead: `perplexity_data`"):
        load_task_data(EvalArguments(tasks=["perplexity"], adapter_path=str(adapter)))
