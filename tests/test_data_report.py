import json
import logging
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_recipe, write_jsonl
from datasets import Dataset
from test_confidence import _confidence_args
from test_data_sharegpt import ALTERNATING_CHATML
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftmix_trl.confidence import (
    ConfidenceConfig,
    ConfidenceError,
    ConfidenceTable,
    compute_confidence,
    write_data_report,
)
from sftmix_trl.confidence.prompt_fit import prompt_fit, response_frame_ids, score_prompt_fit, strip_prompts
from sftmix_trl.confidence.report import (
    build_report,
    find_report,
    message_text,
    report_markdown,
    suspicious_ranks,
    variability,
    write_report,
)
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.load import EXAMPLE_ID, load_datasets
from sftmix_trl.sftmix.exclusion import exclude_suspicious


def _hand_ppl(model, sequence: list[int], first: int) -> float:
    """exp(mean -log p(token t | tokens < t)) over t = first .. end, from one plain forward in float64."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([sequence])).logits[0], -1)
    nll = [-log_probs[t - 1, sequence[t]].item() for t in range(first, len(sequence))]
    return math.exp(sum(nll) / len(nll))


def test_prompt_fit_equals_a_hand_computation_in_float64(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    frame = [1, 30, 31]
    sequences = [[5, 17, 40, 3, 99, 12, 7], [8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    prompt_lengths = [3, 2, 6]
    labels = [[-100] * p + s[p:] for s, p in zip(sequences, prompt_lengths)]
    prepared = Dataset.from_dict({"input_ids": sequences, "labels": labels})
    scores = score_prompt_fit(model, prepared, frame, batch_size=2, pad_token_id=0)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        given = _hand_ppl(model, seq, p)
        alone = _hand_ppl(model, frame + seq[p:], len(frame))
        assert scores.ppl_given_prompt[i] == pytest.approx(given, rel=1e-10)
        assert scores.ppl_alone[i] == pytest.approx(alone, rel=1e-10)
        assert scores.prompt_fit[i] == pytest.approx(given / alone, rel=1e-10)
    # A perplexity given the prompt that is already known is used as it is: only the alone pass runs
    known = score_prompt_fit(model, prepared, frame, 2, 0, ppl_given_prompt=np.array([2.0, 4.0, 8.0]))
    np.testing.assert_allclose(known.prompt_fit, np.array([2.0, 4.0, 8.0]) / scores.ppl_alone)


def test_strip_prompts_keeps_every_response_token_and_later_turn():
    prepared = Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]],
            "labels": [[-100, -100, 3, 4, -100, 6, 7], [9, 8, -100]],  # two assistant turns; a row with no prompt
        }
    )
    stripped = strip_prompts(prepared, [50, 51])
    assert stripped["input_ids"] == [[50, 51, 3, 4, 5, 6, 7], [50, 51, 9, 8, 7]]
    assert stripped["labels"] == [[-100, -100, 3, 4, -100, 6, 7], [-100, -100, -100, 8, -100]]
    with pytest.raises(ValueError, match="frame is empty"):
        strip_prompts(prepared, [])


def test_response_frame_is_the_template_of_an_empty_user_turn_with_the_assistant_header(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    frame = tokenizer.decode(response_frame_ids(tokenizer))
    assert frame == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"


def test_ranks_ties_and_variability():
    ids = ["b", "a", "c", "d"]
    assert suspicious_ranks(ids, np.array([1.0, 1.0, 3.0, 0.5])).tolist() == [3, 2, 1, 4]
    np.testing.assert_allclose(variability(np.array([[1.0, 3.0], [2.0, 2.0]])), [1.0, 0.0])
    assert variability(np.array([[1.0], [5.0]])).tolist() == [0.0, 0.0]
    assert prompt_fit(np.array([2.0, 1.0]), np.array([4.0, 0.5])).tolist() == [0.5, 2.0]
    assert message_text([{"role": "user", "content": "hi"}]) == "hi"
    assert message_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == (
        "[user] a\n\n[assistant] b"
    )


def _toy(n: int = 8):
    ids = [f"id{i}" for i in range(n)]
    dataset = Dataset.from_dict(
        {
            EXAMPLE_ID: ids[::-1],  # the data's order is not the table's
            "prompt": [[{"role": "user", "content": f"question {i}"}] for i in reversed(range(n))],
            "completion": [[{"role": "assistant", "content": f"answer {i}"}] for i in reversed(range(n))],
        }
    )
    table = ConfidenceTable(
        example_ids=ids,
        perplexities=np.array([[2.0 + i, 4.0 + i] for i in range(n)]),
        num_response_tokens=np.full(n, 5),
    )
    given = np.array([1.0 + i for i in range(n)])
    alone = np.full(n, 4.0)  # prompt fit (1 + i) / 4: id7 is the most suspicious, id0 the least
    return table, dataset, given, alone


def test_report_rows_join_to_the_data_and_rank_by_prompt_fit(tmp_path):
    table, dataset, given, alone = _toy()
    report = build_report(table, dataset, given, alone, exclude_fraction=0.25)
    rows = {r[EXAMPLE_ID]: r for r in report.to_pylist()}
    for example_id, prompt, completion in zip(dataset[EXAMPLE_ID], dataset["prompt"], dataset["completion"]):
        assert rows[example_id]["prompt"] == prompt[0]["content"]
        assert rows[example_id]["response"] == completion[0]["content"]
    assert rows["id7"]["suspicious_rank"] == 1 and rows["id0"]["suspicious_rank"] == 8
    assert rows["id3"]["prompt_fit"] == pytest.approx(1.0) and rows["id3"]["variability"] == pytest.approx(1.0)
    assert rows["id2"]["confidence"] == pytest.approx(-5.0)
    assert [i for i, r in rows.items() if r["excluded"]] == ["id6", "id7"]  # floor(0.25 x 8)
    page = report_markdown(report, top_k=3, prompt_fit_model="base", num_not_scored=2)
    assert page.index("`id7`") < page.index("`id6`") < page.index("`id5`") and "`id4`" not in page
    assert "> question 7" in page and "> answer 7" in page and "2 not scored" in page
    write_report(report, tmp_path, 3, "base")
    assert pq.read_table(tmp_path / "report.parquet").num_rows == 8
    assert (tmp_path / "data_map.png").stat().st_size > 10_000
    with pytest.raises(ConfidenceError, match="not in the training data"):
        build_report(table, dataset.select(range(4)), given, alone)


def test_exclusion_leaves_the_top_share_out_of_the_data_and_the_split(tmp_path):
    table, dataset, given, alone = _toy()
    with pytest.raises(ConfidenceError, match="no data report"):  # a table without its report
        exclude_suspicious(table, dataset, tmp_path, 0.25)
    write_report(build_report(table, dataset, given, alone), tmp_path, 3, "base")
    table.report = find_report(tmp_path)
    kept, kept_data, left_out = exclude_suspicious(table, dataset, tmp_path, 0.25)
    assert left_out == ["id7", "id6"]
    assert sorted(kept.example_ids) == sorted(kept_data[EXAMPLE_ID]) == [f"id{i}" for i in range(6)]
    confident, unconfident = kept.split()
    assert confident == ["id0", "id1", "id2"] and unconfident == ["id3", "id4", "id5"]
    assert kept.metadata["num_suspicious_excluded"] == 2 and kept.metadata["suspicious_excluded_ids"] == left_out
    assert exclude_suspicious(table, dataset, tmp_path, 0.0) == (table, dataset, [])


def test_config_checks_the_report_settings():
    with pytest.raises(ValueError, match="prompt_fit_model"):
        ConfidenceConfig(prompt_fit_model="other")
    with pytest.raises(ValueError, match="exclude_suspicious_fraction"):
        ConfidenceConfig(exclude_suspicious_fraction=1.0)
    with pytest.raises(ValueError, match="data_report: true"):
        ConfidenceConfig(exclude_suspicious_fraction=0.1, data_report=False)


def _args(tmp_path, **overrides):
    return _confidence_args(tmp_path, **{"report_top_k": 5, **overrides})


def test_stage1_writes_the_report_and_a_table_without_one_gets_it_without_training(tiny_model, tmp_path, monkeypatch):
    import sftmix_trl.confidence.reference as confidence_module

    dataset = load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=16))[0]
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    args = _args(tmp_path, num_confidence_checkpoints=2)
    table = compute_confidence(dataset, model_args, args, ConfidenceConfig.from_args(args), args.confidence_dir)
    directory = tmp_path / "run" / "confidence"
    report = pq.read_table(directory / "report.parquet").to_pylist()
    text = {
        i: (p[0]["content"], c[0]["content"])
        for i, p, c in zip(dataset[EXAMPLE_ID], dataset["prompt"], dataset["completion"])
    }
    assert len(report) == 16 and all(text[r[EXAMPLE_ID]] == (r["prompt"], r["response"]) for r in report)
    assert sorted(r["suspicious_rank"] for r in report) == list(range(1, 17))
    assert all(np.isfinite(r["prompt_fit"]) and r["prompt_fit"] > 0 for r in report)
    assert (directory / "data_map.png").is_file() and (directory / "scores" / "prompt_fit-base.parquet").is_file()
    assert (directory / "report.md").read_text().count("\n### ") == 5
    assert json.loads((directory / "metadata.json").read_text())["data_report"]["prompt_fit_model"] == "base"
    assert table.report.to_pylist() == report  # the entry point returns the report it wrote

    # The same table with the reference's prompt fit: no training, no snapshot scoring, one pass of the reference
    (directory / "report.parquet").unlink()
    from sftmix_trl.sft_trainer import TruncatingSFTTrainer

    monkeypatch.setattr(TruncatingSFTTrainer, "train", lambda *a, **k: pytest.fail("trained a reference again"))
    monkeypatch.setattr(confidence_module, "score_perplexities", lambda *a, **k: pytest.fail("scored a snapshot"))
    ref = _args(tmp_path, num_confidence_checkpoints=2, prompt_fit_model="reference")
    again = compute_confidence(dataset, model_args, ref, ConfidenceConfig.from_args(ref), ref.confidence_dir)
    assert again.example_ids == table.example_ids
    by_id = {r[EXAMPLE_ID]: r for r in pq.read_table(directory / "report.parquet").to_pylist()}
    last = dict(zip(table.example_ids, table.perplexities[:, -1]))
    assert all(by_id[i]["ppl_given_prompt"] == pytest.approx(last[i]) for i in table.example_ids)
    assert again.report.to_pylist() == list(by_id.values())
    stored = json.loads((directory / "metadata.json").read_text())
    assert stored["data_report"]["prompt_fit_model"] == "reference"  # the stored table records the latest report
    assert stored["num_scored"] == 16 and "confidence.parquet" in {p.name for p in directory.iterdir()}

    # The report of the finished table, called directly, whatever `data_report` says: cached scores, files rewritten
    monkeypatch.setattr(
        "sftmix_trl.confidence.prompt_fit.score_perplexities", lambda *a, **k: pytest.fail("scored again")
    )
    quiet = _args(tmp_path, num_confidence_checkpoints=2, prompt_fit_model="reference", data_report=False)
    direct = write_data_report(dataset, model_args, quiet, ConfidenceConfig.from_args(quiet), directory)
    assert direct.to_pylist() == again.report.to_pylist()
    assert (directory / "report.md").read_text().count("\n### ") == 5
    # `data_report: false` never writes a report, and hands back the one beside the table
    reread = compute_confidence(dataset, model_args, quiet, ConfidenceConfig.from_args(quiet), directory)
    assert reread.report.to_pylist() == direct.to_pylist()

    # `sftmix-trl report` with another length of page: the cached scores, the files written again
    from sftmix_trl.commands.report import main as report_main

    script_args = ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=16)
    report_main(
        script_args,
        _args(tmp_path, num_confidence_checkpoints=2, prompt_fit_model="reference", report_top_k=3, data_report=False),
        model_args,
    )
    assert (directory / "report.md").read_text().count("\n### ") == 3


@pytest.mark.slow
def test_sftmix_recipe_leaves_the_suspicious_share_out_and_records_it(tiny_model, tmp_path):
    records = [{"instruction": f"Question number {i}?", "output": f"Answer number {i}."} for i in range(24)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = tmp_path / "run"
    result = run_recipe(
        "sftmix.py",
        "--config",
        "configs/demo/sftmix_qlora.yaml",
        "--model_name_or_path",
        str(tiny_model),
        "--dataset_name",
        str(data),
        "--dataset_mixture",
        "null",
        "--output_dir",
        str(out),
        "--eval_split_size",
        "0",
        "--eval_strategy",
        "no",
        "--max_train_examples",
        "24",
        "--per_device_train_batch_size",
        "4",
        "--reference_batch_size",
        "4",
        "--save_strategy",
        "no",
        "--max_steps",
        "2",
        "--exclude_suspicious_fraction",
        "0.25",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = pq.read_table(out / "confidence" / "report.parquet").to_pylist()
    top = sorted((r["suspicious_rank"], r[EXAMPLE_ID]) for r in report)[:6]
    run = json.loads((out / "sftmix_run.json").read_text())
    assert run["config"]["exclude_suspicious_fraction"] == 0.25
    assert run["suspicious_excluded_ids"] == [i for _, i in top]
    assert "SFTMix split: 9 confident, 9 unconfident" in result.stdout + result.stderr
    card = (out / "README.md").read_text()
    assert "left out as suspicious" in card and "| 6 (0.25; see report.md) |" in card
    assert "![Data map](confidence/data_map.png)" in card


def test_report_prepares_the_data_as_the_recipes_do(tiny_model, tmp_path, monkeypatch, caplog):
    """Stage 1, stage 2 and `sftmix-trl report` on one YAML whose data holds a record the chat template refuses (in the
    training split) and multi-turn conversations only in the held-out split: all three prepare it through one path, so
    stage 2 and the report reuse stage 1's table (same examples, same scored turns, same template) instead of refusing
    it as another dataset's."""
    import sftmix_trl.confidence.reference as confidence_module
    from sftmix_trl.commands.confidence import main as confidence_main
    from sftmix_trl.commands.report import main as report_main
    from sftmix_trl.commands.sftmix import main as sftmix_main

    def chat(*turns):
        return {"messages": [{"role": role, "content": text} for role, text in turns]}

    count, held_out = 20, 4
    eval_rows = Dataset.from_dict({"row": range(count)}).shuffle(seed=42)["row"][:held_out]  # load_datasets' split
    train_rows = [i for i in range(count) if i not in eval_rows]
    records = [chat(("user", f"Question {i}?"), ("assistant", f"Answer {i}.")) for i in range(count)]
    for i in eval_rows:
        records[i] = chat(
            ("user", f"Hi {i}"), ("assistant", "Hello."), ("user", "Colour?"), ("assistant", f"Blue {i}.")
        )
    records[train_rows[0]] = chat(("user", "First part."), ("user", "Second part?"), ("assistant", "Both."))
    data = write_jsonl(tmp_path / "chats.jsonl", records)
    (tmp_path / "alternating.jinja").write_text(ALTERNATING_CHATML)
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)

    def run(main, **overrides):  # each command parses the YAML afresh: arguments are never shared between them
        script_args = ScriptArguments(dataset_name=str(data), eval_split_size=held_out, max_dropped_fraction=0.1)
        overrides = {"num_confidence_checkpoints": 2, "chat_template_path": str(tmp_path / "alternating.jinja")} | (
            overrides
        )
        main(script_args, _args(tmp_path, **overrides), model_args)

    run(confidence_main)
    directory = tmp_path / "run" / "confidence"
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["run"]["assistant_only_loss"] is True  # decided on both splits, as stage 2 decides it
    assert meta["num_scored"] == len(train_rows) - 1  # the refused record is not scored

    with caplog.at_level(logging.INFO, logger="sftmix_trl"):
        run(sftmix_main, max_steps=1, save_strategy="no")
    assert "reusing the confidence table" in caplog.text
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

    monkeypatch.setattr(confidence_module, "score_perplexities", lambda *a, **k: pytest.fail("scored a snapshot"))
    run(report_main, report_top_k=3)
    report = pq.read_table(directory / "report.parquet").to_pylist()
    table = ConfidenceTable.load(directory)
    assert sorted(r[EXAMPLE_ID] for r in report) == sorted(table.example_ids)
    assert "Second part?" not in " ".join(r["prompt"] for r in report)
