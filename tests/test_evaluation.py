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
    TASKS,
    EvalArguments,
    EvalError,
    check_punkt,
    evaluate,
    load_choice_file,
    load_ifeval,
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
    loaded = harness.load_tasks(args, lambda docs, groups: sample_items(docs, None, 0))
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

    def named(value):  # lm-eval loads its task's functions from the file: compare functions by their names
        if callable(value):
            return f"{value.__module__}.{value.__qualname__}"
        if isinstance(value, dict):
            return {k: named(v) for k, v in value.items()}
        return [named(v) for v in value] if isinstance(value, list) else value

    ours = named(load_yaml(harness.TASKS_DIR / "sftmix_ifeval.yaml", resolve_func=True))
    theirs = named(load_yaml(Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml", resolve_func=True))
    data_keys = {"task", "dataset_path", "dataset_name", "custom_dataset", "test_split", "process_results"}
    assert {k: v for k, v in ours.items() if k not in data_keys} == {
        k: v for k, v in theirs.items() if k not in data_keys
    }
    assert theirs["process_results"] == named(utils.process_results)
    assert ours["process_results"] == named(ifeval.process_results)


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
    items = load_pubmedqa(str(SHARED / "eval" / "pubmedqa"))
    assert len(items) == 500
    assert {i.answer for i in items} == {0, 1, 2}
    assert items[0].context.startswith("Abstract: ") and items[0].context.endswith("\nAnswer:")
    mmlu = load_mmlu(str(SHARED / "eval" / "mmlu_medical"), ["anatomy", "medical_genetics"], "val", limit=12)
    assert [i.group for i in mmlu].count("mmlu_anatomy") == 12
    assert [i.group for i in mmlu].count("mmlu_medical_genetics") == 11  # fewer than the limit
    assert mmlu[0].context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert mmlu[0].context.endswith("\nD. Homeostasis\nAnswer:")
    assert mmlu[0].answer == 3


def test_limit_draws_a_seeded_sample_per_group_in_file_order():
    items = list(range(100))
    assert sample_items(items, None, 0) == items
    drawn = sample_items(items, 10, 0)
    assert len(drawn) == 10 and drawn == sorted(drawn) and drawn != list(range(10))
    assert sample_items(items, 10, 0) == drawn and sample_items(items, 10, 1) != drawn
    groups = ["a"] * 30 + ["b"] * 5 + ["c"] * 65
    per_group = sample_items(items, 8, 0, groups)
    assert [groups[i] for i in per_group].count("a") == 8
    assert [groups[i] for i in per_group].count("b") == 5  # fewer than the limit: all of them
    assert [groups[i] for i in per_group].count("c") == 8


@needs_shared
def test_limited_pubmedqa_is_not_the_label_sorted_prefix():
    """PubMedQA's test labels are sorted (its first 276 are "yes"): a limit must not score only one answer."""
    args = EvalArguments(tasks=["pubmedqa"], pubmedqa_data=str(SHARED / "eval" / "pubmedqa"), limit=40)
    assert {item.answer for item in load_pubmedqa(args.pubmedqa_data, limit=40)} == {0}
    entry = load_task_data(args)["pubmedqa"]  # lm-eval's task and the items it scores
    ((name, task),) = entry["tasks"].items()
    assert len(entry["samples"][name]) == 40
    assert {task.eval_docs[i]["answer"] for i in entry["samples"][name]} == {0, 1, 2}


def test_mmlu_row_with_a_missing_column_is_named(tmp_path):
    (tmp_path / "anatomy_test.csv").write_text("Q1?,a,b,c,d,A\nQ2?,a,b,c,d\n")
    with pytest.raises(EvalError, match=r"anatomy_test\.csv, row 2: missing field 'answer'"):
        load_mmlu(str(tmp_path), ["anatomy"])
    with pytest.raises(EvalError, match=r"MMLU file not found: .*anatomy_val\.csv"):
        load_mmlu(str(tmp_path), ["anatomy"], "val")


def test_medqa_schema_and_its_errors(tmp_path):
    records = [
        {"question": "Q1", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "B"},
        {"question": "Q2", "options": ["x", "y", "z", "w"], "answer": 3},
        {"question": "Q3", "options": ["x", "y"], "answer": "y"},
        {"question": "Q4", "options": {"A": "x", "B": "y"}, "answer": "x", "answer_idx": "A"},  # MedQA's own form
    ]
    items = load_choice_file(str(write_jsonl(tmp_path / "medqa.jsonl", records)), "medqa")
    assert [i.answer for i in items] == [1, 3, 1, 0]
    assert items[0].context == "Question: Q1\nA. x\nB. y\nC. z\nAnswer:"
    assert items[0].choices == ["A", "B", "C"]
    medmcqa = load_choice_file(str(tmp_path / "medqa.jsonl"), "medmcqa", limit=1)
    assert medmcqa[0].context == "Question: Q1\nChoices:\nA. x\nB. y\nC. z\nAnswer:"

    write_jsonl(tmp_path / "bad.jsonl", [records[0], {"question": "Q", "answer": "A"}])
    with pytest.raises(EvalError, match=r"bad\.jsonl, line 2: missing field 'options'"):
        load_choice_file(str(tmp_path / "bad.jsonl"), "medqa")
    write_jsonl(tmp_path / "bad.jsonl", [{**records[0], "answer": "E"}])
    with pytest.raises(EvalError, match=r"bad\.jsonl, line 1: field 'answer' is 'E'"):
        load_choice_file(str(tmp_path / "bad.jsonl"), "medqa")


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
    return {
        "ifeval_data": str(folder / "input_data.jsonl"),
        "pubmedqa_data": str(pubmedqa),
        "mmlu_medical_data": str(mmlu),
        "mmlu_subjects": ["anatomy"],
        "medqa_data": str(folder / "medqa.jsonl"),
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


def test_this_packages_tasks_through_lm_eval_score_as_computed_by_hand(tiny_model, tiny_tokenizer, tmp_path):
    """lm-eval's `HFLM` on the model built here: every option's log-likelihood is the one a forward pass gives (the
    prompt in the benchmark's format, the option after one space), the prediction its argmax, the figures the mean;
    IFEval's responses are the greedy replies through the chat template (`sftmix_trl.after_training.generate`, batched apart)."""
    from transformers import LlamaForCausalLM

    from sftmix_trl.after_training.generate import generate_replies
    from sftmix_trl.evaluation.ifeval import load_ifeval

    have_nltk = NLTK_DATA is not None and NLTK_DATA.is_dir()
    if have_nltk:
        os.environ["NLTK_DATA"] = str(NLTK_DATA)
    data = write_eval_data(tmp_path)
    tasks = ["pubmedqa", "mmlu_medical", "medqa"] + (["ifeval"] if have_nltk else [])
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    args = EvalArguments(tasks=tasks, output_dir=str(tmp_path / "out"), max_new_tokens=12, batch_size=2, **data)
    results = evaluate(args, model_args)["results"]
    model = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    items = {
        "pubmedqa": load_pubmedqa(data["pubmedqa_data"]),
        "mmlu_medical": load_mmlu(data["mmlu_medical_data"], data["mmlu_subjects"]),
        "medqa": load_choice_file(data["medqa_data"], "medqa"),
    }
    for task, questions in items.items():
        rows = read_jsonl(tmp_path / "out" / f"samples_{task}.jsonl")
        assert [r["id"] for r in rows] == [q.id for q in questions]
        for row, question in zip(rows, questions):
            scores = [hand_log_likelihood(model, tiny_tokenizer, question.context, " " + c) for c in question.choices]
            assert row["loglikelihoods"] == pytest.approx(scores, abs=1e-4)
            assert row["prediction"] == scores.index(max(scores)) and row["answer"] == question.answer
            assert row["acc"] == float(row["prediction"] == question.answer)
            lengths = [len(c) for c in question.choices]  # acc_norm: lm-eval's, per character of the option
            normalised = [s / n for s, n in zip(scores, lengths)]
            assert row["acc_norm"] == float(normalised.index(max(normalised)) == question.answer)
        assert results[task]["acc"] == pytest.approx(sum(r["acc"] for r in rows) / len(rows))
        assert results[task]["n"] == len(questions)
    assert results["mmlu_medical"]["subjects"]["anatomy"]["n"] == 2
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
