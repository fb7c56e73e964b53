"""Users' own chat files: ShareGPT conversations with every kind of messy record. What can train is trained, what
cannot is dropped and counted per reason (logged, recorded in sftmix_run.json and the model card), and the run stops
only when too much of the file cannot train. Fixtures are written here, never copied from elsewhere."""

import json
import logging

import numpy as np
import pytest
from conftest import build_tiny_model, run_recipe, write_jsonl
from datasets import Dataset

from sftmix_trl.confidence import ConfidenceConfig
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
from sftmix_trl.data.checks import TRAINING, check_same_survivors, drop_unrenderable, prepare_like_trl, prepare_split
from sftmix_trl.data.drops import DropLog
from sftmix_trl.data.load import DataError, load_datasets
from sftmix_trl.data.prepare import prepare_run_data
from sftmix_trl.model import load_tokenizer
from sftmix_trl.sft_trainer import NTPTrainer
from sftmix_trl.sftmix.config import SFTMixConfig
from sftmix_trl.sftmix.trainer import SFTMixTrainer

# ChatML that refuses two turns of one role in a row, as Mistral's and Llama 2's templates do
ALTERNATING_CHATML = (
    "{% for message in messages %}{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSY_LINES = {  # reason -> the line of messy_sharegpt's file that holds it
    "empty_conversation": 21,
    "system_only": 22,
    "no_reply": 23,
    "empty_reply": 24,
    "template_refused": 25,
    "truncated": 26,
}


def turn(role: str, value: str | None) -> dict:
    return {"from": role, "value": value}


def messy_sharegpt(path, good: int = 20, long_words: int = 300):
    """A ShareGPT export in miniature: `good` usable conversations (several role names, a top-level system prompt, a
    leading assistant turn, a null turn), then one record of each kind that cannot train, at `MESSY_LINES`."""
    records = []
    for i in range(good):
        assistant = ("gpt", "chatgpt", "bing", "bard", "model", "assistant")[i % 6]
        user = "human" if i % 2 else "user"
        conversation = [turn(user, f"Question {i}: name a colour?"), turn(assistant, f"Colour {i} is blue.")]
        conversation += [turn(user, "And a fruit?"), turn(assistant, f"Fruit {i} is a pear.")]
        if i % 5 == 1:
            conversation = [turn("gpt", f"...the end of answer {i}."), *conversation]  # a long chat split here
        if i % 5 == 2:
            conversation = [turn("system", "Answer briefly."), *conversation]
        if i % 5 == 3:
            conversation.append(turn("human", None))  # a trailing empty user turn: dropped, nothing trains on it
        record = {"id": f"good-{i}", "conversations": conversation}
        if i % 5 == 4:
            record["system"] = "You are a colour expert."
        records.append(record)
    records += [
        {"id": "empty", "conversations": []},
        {"id": "system-only", "conversations": [turn("system", "You are helpful.")]},
        {"id": "no-reply", "conversations": [turn("human", "Hello? Anyone?")]},
        {"id": "empty-reply", "conversations": [turn("human", "Hi"), turn("gpt", "  ")]},
        {"id": "twice", "conversations": [turn("human", "First part."), turn("human", "Second?"), turn("gpt", "Ok.")]},
        {"id": "long", "conversations": [turn("human", "word " * long_words), turn("gpt", "Too long to reach.")]},
    ]
    return write_jsonl(path, records)


def load(path, **kwargs):
    drops = DropLog(kwargs.pop("max_dropped_fraction", 0.25))
    return load_datasets(ScriptArguments(dataset_name=str(path), **kwargs), drops)[0], drops


# -- the form and the role map -------------------------------------------------------------------------------------------


def test_sharegpt_is_detected_and_every_role_name_mapped(tmp_path):
    path = messy_sharegpt(tmp_path / "chat.jsonl")
    dataset, drops = load(path, max_dropped_fraction=0.5)
    roles = {m["role"] for example in dataset for m in example["prompt"] + example["completion"]}
    assert roles == {"system", "user", "assistant"}
    by_question = {e["prompt"][-1]["content"]: e for e in dataset}
    leading = by_question["Question 1: name a colour?"]
    assert leading["prompt"][0] == {"role": "assistant", "content": "...the end of answer 1."}  # context
    assert [m["content"] for m in leading["completion"]] == ["Colour 1 is blue.", "And a fruit?", "Fruit 1 is a pear."]
    assert by_question["Question 4: name a colour?"]["prompt"][0] == {
        "role": "system",
        "content": "You are a colour expert.",
    }
    assert by_question["Question 3: name a colour?"]["completion"][-1]["content"] == "Fruit 3 is a pear."
    # two user turns in a row are kept as they are: the template renders them (ChatML) or refuses them (dropped later)
    assert [m["role"] for m in by_question["Second?"]["prompt"]] == ["user", "user"]
    assert drops.read == 26


def test_an_unknown_role_stops_naming_the_record_and_the_role_and_role_map_maps_it(tmp_path):
    records = [{"conversations": [turn("human", "Hi"), turn("gpt", "Hello")]}]
    records.append({"conversations": [turn("patient", "It hurts."), turn("doctor", "Where?")]})
    path = write_jsonl(tmp_path / "clinic.jsonl", records)
    with pytest.raises(DataError, match=r"clinic\.jsonl, line 2: turn 0 has the role 'patient', which is not one of"):
        load(path)
    with pytest.raises(DataError, match=r"role_map: \{patient: assistant\}"):
        load(path)
    dataset, _ = load(path, role_map='{"patient": "user", "Doctor": "assistant"}')  # JSON, as on the command line
    assert sorted(e["completion"][0]["content"] for e in dataset) == ["Hello", "Where?"]
    mixture = {"datasets": [{"path": str(path), "role_map": {"patient": "user", "doctor": "assistant"}}]}
    assert len(load_datasets(ScriptArguments(dataset_mixture=mixture))[0]) == 2
    with pytest.raises(DataError, match=r"maps 'doctor' to 'physician'; a role must be one of system, user"):
        load(path, role_map={"doctor": "physician"})


# -- the drop policy ------------------------------------------------------------------------------------------------------


def test_every_kind_of_record_that_cannot_train_is_dropped_counted_and_logged_once(tiny_model, tmp_path, caplog):
    path = messy_sharegpt(tmp_path / "chat.jsonl")
    with caplog.at_level(logging.WARNING, logger="sftmix_trl"):
        dataset, drops = load(path)
        (tmp_path / "alternating.jinja").write_text(ALTERNATING_CHATML)
        model_args = ModelArguments(model_name_or_path=str(tiny_model))
        tokenizer = load_tokenizer(model_args, False, str(tmp_path / "alternating.jinja"), assistant_only_loss=True)
        dataset = drop_unrenderable(dataset, [tokenizer], drops)
        drops.log(["template_refused"])  # as `prepare_run_data` does, once every split is rendered
        args = SFTConfig(output_dir=str(tmp_path / "o"), report_to="none", assistant_only_loss=True, max_length=96)
        prepared = prepare_split(dataset, tokenizer, args, NTPTrainer, "train", drops, TRAINING)
    assert len(prepared) == 20 and dict(drops.counts) == dict.fromkeys(MESSY_LINES, 1)
    for reason, line_no in MESSY_LINES.items():
        assert drops.locations[reason] == [f"{path}, line {line_no}"]
        if reason == "truncated":  # said the way the truncation check always said it, with the locations added
            line = "1 of 21 training examples lose their whole response to truncation at max_length=96"
            assert [r.message for r in caplog.records if line in r.message][0].endswith(f"e.g. {path}, line {line_no}")
        else:
            assert [r.message for r in caplog.records].count(f"dropped {drops.describe(reason)}") == 1, reason
    assert "the template says: 'Conversation roles must alternate user/assistant/user/assistant/...' x1" in caplog.text
    assert drops.dropped_fraction() == pytest.approx(6 / 26)
    record = drops.as_dict()
    assert record["dropped"] == dict.fromkeys(MESSY_LINES, 1) and record["records_read"] == 26


def test_a_wrongly_formatted_file_stops_with_the_reasons_and_a_real_looking_export_trains(tmp_path):
    # an export whose replies all went under the user's role name: nothing can train
    flat = [{"conversations": [turn("human", f"q{i}"), turn("human", f"a{i}")]} for i in range(8)]
    with pytest.raises(DataError, match=r"no record can train: 8 no assistant reply after a prompt, e\.g\. .*line 1"):
        load(write_jsonl(tmp_path / "flat.jsonl", flat))
    # a third of the records empty: more than the default share
    some = [{"conversations": [turn("human", f"q{i}"), turn("gpt", "" if i % 3 == 0 else f"a{i}")]} for i in range(9)]
    path = write_jsonl(tmp_path / "some.jsonl", some)
    with pytest.raises(
        DataError, match=r"33\.3% of the records cannot train, more than max_dropped_fraction=0\.25: 3 "
    ) as error:
        load(path)
    assert "raise `max_dropped_fraction`" in str(error.value) and "\n" not in str(error.value)
    assert len(load(path, max_dropped_fraction=0.4)[0]) == 6


def test_truncation_drops_count_toward_the_share_and_stop_above_it(tiny_model, tmp_path):
    path = messy_sharegpt(tmp_path / "chat.jsonl", good=6)
    model_args = ModelArguments(model_name_or_path=str(tiny_model))
    args = SFTConfig(output_dir=str(tmp_path / "o"), report_to="none", max_length=96)
    run = prepare_run_data(
        ScriptArguments(dataset_name=str(path), max_dropped_fraction=0.5), args, model_args, NTPTrainer
    )
    drops = run.drops  # 4 + 1 of 12 dropped
    assert len(run.data.train) == 7 and drops.counts["truncated"] == 1
    assert drops.dropped_fraction() == pytest.approx(5 / 12)
    with pytest.raises(DataError, match=r"41\.7% of the records cannot train.*1 every assistant reply truncated away"):
        prepare_run_data(
            ScriptArguments(dataset_name=str(path), max_dropped_fraction=0.4), args, model_args, NTPTrainer
        )


# -- a reference model on another tokenizer --------------------------------------------------------------------------------


def test_reference_tokenizer_that_keeps_other_examples_stops_with_the_max_length_that_keeps_them(tmp_path, tiny_model):
    other = build_tiny_model(tmp_path / "other", vocab_size=270)
    records = [{"prompt": " ".join(["colour blue fruit pear"] * n), "completion": "Yes."} for n in range(1, 9)]
    dataset = load_datasets(ScriptArguments(dataset_name=str(write_jsonl(tmp_path / "d.jsonl", records))))[0]
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    reference = load_tokenizer(ModelArguments(model_name_or_path=str(other)))
    prompt_lengths = [
        [len(t.apply_chat_template(p, add_generation_prompt=True)["input_ids"]) for p in dataset["prompt"]]
        for t in (tokenizer, reference)
    ]
    # at the longer of an example's two prompt lengths, it keeps its reply under one tokenizer only
    cut = next(max(a, b) for a, b in zip(*prompt_lengths) if a != b)
    args = SFTConfig(output_dir=str(tmp_path / "o"), report_to="none", max_length=cut)
    prepared, reference_prepared = (prepare_like_trl(dataset, t, args) for t in (tokenizer, reference))
    assert len(prepared) != len(reference_prepared) or set(prepared["example_id"]) != set(
        reference_prepared["example_id"]
    )
    with pytest.raises(DataError, match=r"keeps other examples under the reference model's tokenizer") as error:
        check_same_survivors(dataset, prepared, reference_prepared, tokenizer, reference, args)
    assert "\n" not in str(error.value)
    needed = int(str(error.value).split("Set `max_length` to ")[1].split()[0])
    assert needed > cut
    args.max_length = needed
    prepared, reference_prepared = (prepare_like_trl(dataset, t, args) for t in (tokenizer, reference))
    check_same_survivors(dataset, prepared, reference_prepared, tokenizer, reference, args)  # no error: same set
    # the recipes' check stops before any write, at stage 1 already
    config = SFTMixConfig(
        output_dir=str(tmp_path / "o"),
        report_to="none",
        max_length=cut,
        reference_model_name_or_path=str(other),
        reference_batch_size=1,
    )
    model_args = ModelArguments(model_name_or_path=str(tiny_model))
    script_args = ScriptArguments(dataset_name=str(tmp_path / "d.jsonl"))
    with pytest.raises(DataError, match=r"keeps other examples under the reference model's tokenizer"):
        prepare_run_data(script_args, config, model_args, confidence_config=ConfidenceConfig.from_args(config))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("trainer_class", [None, SFTMixTrainer])  # `confidence`/`report` (stage 1 alone), `sftmix`
def test_a_reference_on_its_own_tokenizer_prepares_the_data_once_more_and_counts_each_drop_once(
    tmp_path, tiny_model, monkeypatch, trainer_class
):
    other = build_tiny_model(tmp_path / "other", vocab_size=270)
    reference = load_tokenizer(ModelArguments(model_name_or_path=str(other)))
    reference.chat_template = ALTERNATING_CHATML  # refuses what the model's ChatML renders
    reference.save_pretrained(other)
    chats = [[turn("human", "colour blue fruit pear " * n)] for n in range(1, 9)]
    chats += [[turn("human", "word " * 400)], [turn("human", "First part."), turn("human", "Second?")]]
    records = [{"conversations": [*chat, turn("gpt", "Yes.")]} for chat in chats]  # the last two: too long, refused
    script_args = ScriptArguments(dataset_name=str(write_jsonl(tmp_path / "d.jsonl", records)))
    config = SFTMixConfig(
        output_dir=str(tmp_path / "o"), report_to="none", max_length=256, reference_model_name_or_path=str(other)
    )
    passes = []
    original_map = Dataset.map
    monkeypatch.setattr(
        Dataset, "map", lambda self, *a, **k: passes.append(k.get("desc")) or original_map(self, *a, **k)
    )
    model_args = ModelArguments(model_name_or_path=str(tiny_model))
    run = prepare_run_data(script_args, config, model_args, trainer_class, ConfidenceConfig.from_args(config))
    data, drops = run.data, run.drops
    assert passes.count("Tokenizing train dataset") == 2  # once per tokenizer, whichever command
    assert len(data.examples) == 9 and data.reference_train["example_id"] == data.train["example_id"]  # 8 survive
    assert len(data.train) == 8 and data.reference_train["input_ids"] != data.train["input_ids"]
    # each drop counted once though both tokenizers read (and lose) the long one: 2 of the 10 examples checked
    assert dict(drops.counts) == {"template_refused": 1, "truncated": 1} and drops.checked == 10
    assert drops.dropped_fraction() == pytest.approx(0.2)


def test_template_refusals_in_both_splits_are_logged_in_one_line(tmp_path, tiny_model, caplog):
    """A refused record in the training and in the held-out split: one warning with both, not a count per split
    ("dropped 1 ..." then "dropped 2 ...", which reads as 3)."""
    records = [{"conversations": [turn("human", f"Question {n}?"), turn("gpt", "Yes.")]} for n in range(10)]
    records += [
        {"conversations": [turn("human", "A."), turn("human", f"B {n}?"), turn("gpt", "C.")]} for n in range(6)
    ]
    (tmp_path / "alternating.jinja").write_text(ALTERNATING_CHATML)
    script_args = ScriptArguments(
        dataset_name=str(write_jsonl(tmp_path / "d.jsonl", records)), eval_split_size=8, max_dropped_fraction=0.5
    )
    config = SFTConfig(
        output_dir=str(tmp_path / "o"), report_to="none", chat_template_path=str(tmp_path / "alternating.jinja")
    )
    with caplog.at_level(logging.WARNING, logger="sftmix_trl"):
        run = prepare_run_data(script_args, config, ModelArguments(model_name_or_path=str(tiny_model)), NTPTrainer)
    assert len(run.data.examples) < 8 + 2 and len(run.data.eval_examples) < 8  # refusals in both splits
    lines = [r.message for r in caplog.records if "the chat template refuses" in r.message]
    assert lines == [f"dropped {run.drops.describe('template_refused')}"] and "dropped 6 " in lines[0]


# -- end to end: the raw file trains through the SFTMix recipe (stage 1 and 2) ------------------------------------------------


@pytest.mark.slow
def test_a_messy_sharegpt_file_trains_end_to_end_and_says_what_it_dropped(demo_model, tmp_path):
    data = messy_sharegpt(tmp_path / "export.jsonl")
    template = tmp_path / "alternating.jinja"
    template.write_text(ALTERNATING_CHATML)
    out = tmp_path / "out"
    args = ["--config", "configs/demo/sftmix_qlora.yaml", "--model_name_or_path", str(demo_model)]
    args += ["--dataset_mixture", "null", "--dataset_name", str(data), "--output_dir", str(out)]
    args += ["--chat_template_path", str(template), "--max_length", "96", "--eval_split_size", "0"]
    args += ["--eval_strategy", "no", "--per_device_train_batch_size", "4", "--reference_batch_size", "8"]
    args += ["--max_steps", "2", "--save_strategy", "no", "--load_in_4bit", "false"]  # 4-bit on a CPU: minutes a step
    result = run_recipe("sftmix.py", *args)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    for reason, line in MESSY_LINES.items():
        assert f"export.jsonl, line {line}" in log, reason
    assert "dropped 1 only a system message, e.g. " in log and "must alternate" in log
    run = json.loads((out / "sftmix_run.json").read_text())
    assert run["data"]["dropped"] == dict.fromkeys(MESSY_LINES, 1) and run["data"]["records_read"] == 26
    card = (out / "README.md").read_text()
    assert "26 records read; 23.08% dropped" in card and "| the chat template refuses to render it | 1 |" in card
    assert (out / "chat_template.jinja").read_text() == ALTERNATING_CHATML  # the user's, not the marked copy
    meta = json.loads((out / "confidence" / "metadata.json").read_text())
    assert meta["num_scored"] == 20 and meta["num_excluded"] == 1  # the truncated one: dropped, counted once
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)
