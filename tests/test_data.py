"""Data loading: formats, files, mixtures, splits, fingerprints, errors, and TRL's prompt masking."""

import json
import logging
import re

import pytest
from conftest import DEMO_DATA, write_jsonl
from datasets import Dataset

from sftmix_trl.after_training.card import data_card_section
from sftmix_trl.configs import ScriptArguments
from sftmix_trl.data.drops import DropLog
from sftmix_trl.data.load import EXAMPLE_ID, DataError, DataSource, example_fingerprint, load_datasets, load_source

USER_Q = [{"role": "user", "content": "Name a colour."}]
ASSISTANT_A = [{"role": "assistant", "content": "Blue."}]


def rows(dataset) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in dataset]


def load_records(tmp_path, records, name="data.jsonl", **source_kwargs) -> list[dict]:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        write_jsonl(path, records)
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    else:
        Dataset.from_list(records).to_parquet(str(path))
    return rows(load_source(DataSource(str(path), **source_kwargs)))


def numbered(prefix: str, n: int) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "output": f"{prefix} answer {i}"} for i in range(n)]


def mixture(*entries, seed=None, **kwargs) -> ScriptArguments:
    value = {"datasets": list(entries)}
    if seed is not None:
        value["seed"] = seed
    return ScriptArguments(dataset_mixture=value, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Formats


def test_alpaca_without_input(tmp_path):
    assert load_records(tmp_path, [{"instruction": "Name a colour.", "output": "Blue."}]) == [
        {"prompt": USER_Q, "completion": ASSISTANT_A}
    ]


def test_alpaca_with_input_joins_it_to_the_instruction(tmp_path):
    records = [
        {"instruction": "Summarise.", "input": "The cat sat on the mat.", "output": "A cat sat."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},  # empty input: same as none
    ]
    assert load_records(tmp_path, records) == [
        {
            "prompt": [{"role": "user", "content": "Summarise.\n\nThe cat sat on the mat."}],
            "completion": [{"role": "assistant", "content": "A cat sat."}],
        },
        {"prompt": USER_Q, "completion": ASSISTANT_A},
    ]


def test_prompt_completion_strings(tmp_path):
    assert load_records(tmp_path, [{"prompt": "Name a colour.", "completion": "Blue."}]) == [
        {"prompt": USER_Q, "completion": ASSISTANT_A}
    ]


def test_prompt_completion_message_lists(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, *USER_Q]
    assert load_records(tmp_path, [{"prompt": prompt, "completion": ASSISTANT_A}]) == [
        {"prompt": prompt, "completion": ASSISTANT_A}
    ]


def test_messages_last_assistant_turn_is_the_completion(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    assert rows(load_source(DataSource(str(path)), assistant_turns="last")) == [
        {"prompt": conversation[:4], "completion": conversation[4:]}
    ]
    # by default every assistant turn is trained: the completion starts at the first one (tests/test_multiturn.py)
    assert load_records(tmp_path, [{"messages": conversation}]) == [
        {"prompt": conversation[:2], "completion": conversation[2:]}
    ]


def test_messages_without_an_assistant_turn_cannot_train(tmp_path):
    with pytest.raises(DataError, match=r"no record can train: 1 no assistant reply after a prompt, e\.g\. .*line 1"):
        load_records(tmp_path, [{"messages": USER_Q}])


def test_non_string_field_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"data\.jsonl, line 1: field 'output' must be a string, got int"):
        load_records(tmp_path, [{"instruction": "2 + 2?", "output": 4}])


# ----------------------------------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "data.parquet"])
def test_local_file_types(tmp_path, name):
    records = [
        {"prompt": "Name a colour.", "completion": "Blue."},
        {"prompt": "Name another colour.", "completion": "Red."},
    ]
    assert load_records(tmp_path, records, name=name) == [
        {"prompt": USER_Q, "completion": ASSISTANT_A},
        {
            "prompt": [{"role": "user", "content": "Name another colour."}],
            "completion": [{"role": "assistant", "content": "Red."}],
        },
    ]


def test_folder_of_files_in_different_formats(tmp_path):
    folder = tmp_path / "mix"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", numbered("alpaca", 3))
    (folder / "b.json").write_text(json.dumps([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(2)]))
    conversations = [{"messages": [*USER_Q, {"role": "assistant", "content": f"c{i}"}]} for i in range(4)]
    Dataset.from_list(conversations).to_parquet(str(folder / "sub" / "c.parquet"))
    (folder / "notes.md").write_text("not data")
    loaded = rows(load_source(DataSource(str(folder))))
    assert len(loaded) == 3 + 2 + 4
    completions = sorted(r["completion"][0]["content"] for r in loaded)
    assert completions == sorted([f"alpaca answer {i}" for i in range(3)] + ["a0", "a1"] + [f"c{i}" for i in range(4)])


def test_demo_files_load():
    counts = {p.name: len(load_source(DataSource(str(p)))) for p in sorted(DEMO_DATA.glob("*.json*"))}
    assert counts == {"chat_messages.jsonl": 27, "health_qa.json": 106, "instruct_alpaca.jsonl": 141}
    train, held_out = load_datasets(ScriptArguments(dataset_name=str(DEMO_DATA)))  # the folder as one source
    assert held_out is None
    assert len(train) == 274
    assert len(set(train[EXAMPLE_ID])) == 274
    assert all(r["completion"][0]["role"] == "assistant" and r["completion"][0]["content"].strip() for r in train)


# ----------------------------------------------------------------------------------------------------------------------
# Mixtures and splits


@pytest.fixture
def two_sources(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", numbered("a", 40))
    write_jsonl(tmp_path / "b.jsonl", numbered("b", 20))
    return str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")


def sampled(two_sources, seed, **kwargs) -> Dataset:
    a, b = two_sources
    train, _ = load_datasets(mixture({"path": a, "fraction": 0.5}, {"path": b, "fraction": 0.25}, seed=seed, **kwargs))
    return train


def test_mixture_fractions_take_the_right_counts(two_sources):
    train = sampled(two_sources, seed=1)
    sources = [r["prompt"][0]["content"][0] for r in train]
    assert (sources.count("a"), sources.count("b")) == (20, 5)


def test_mixture_is_deterministic_with_a_seed(two_sources):
    assert sampled(two_sources, seed=1)[EXAMPLE_ID] == sampled(two_sources, seed=1)[EXAMPLE_ID]
    assert set(sampled(two_sources, seed=1)[EXAMPLE_ID]) != set(sampled(two_sources, seed=2)[EXAMPLE_ID])


@pytest.mark.parametrize(("size", "expected"), [(0.25, 15), (7, 7)])
def test_eval_split_fraction_and_count(tmp_path, size, expected):
    write_jsonl(tmp_path / "d.jsonl", numbered("x", 60))
    train, held_out = load_datasets(ScriptArguments(dataset_name=str(tmp_path / "d.jsonl"), eval_split_size=size))
    assert (len(train), len(held_out)) == (60 - expected, expected)
    assert not set(train[EXAMPLE_ID]) & set(held_out[EXAMPLE_ID])
    assert len(set(train[EXAMPLE_ID]) | set(held_out[EXAMPLE_ID])) == 60


def test_eval_split_that_leaves_no_training_data(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", numbered("x", 5))
    with pytest.raises(DataError, match=r"`eval_split_size`=5.*of 5"):
        load_datasets(ScriptArguments(dataset_name=str(tmp_path / "d.jsonl"), eval_split_size=5))


def test_max_train_examples(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", numbered("x", 30))
    args = ScriptArguments(dataset_name=str(tmp_path / "d.jsonl"), eval_split_size=5, max_train_examples=10)
    train, held_out = load_datasets(args)
    assert (len(train), len(held_out)) == (10, 5)
    assert not set(train[EXAMPLE_ID]) & set(held_out[EXAMPLE_ID])


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprints


def test_fingerprint_is_stable_and_content_addressed():
    example = {"prompt": USER_Q, "completion": ASSISTANT_A}
    # Pinned: confidence tables saved by earlier runs are keyed by this id
    assert example_fingerprint(example) == "d36ff90c57c1952938be"
    assert example_fingerprint(json.loads(json.dumps(example))) == example_fingerprint(example)
    other = {"prompt": USER_Q, "completion": [{"role": "assistant", "content": "Red."}]}
    assert example_fingerprint(other) != example_fingerprint(example)


def test_fingerprints_stable_across_loads(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", numbered("x", 12))
    first, _ = load_datasets(ScriptArguments(dataset_name=str(tmp_path / "d.jsonl")))
    second, _ = load_datasets(ScriptArguments(dataset_name=str(tmp_path / "d.jsonl"), dataset_seed=7))
    assert sorted(first[EXAMPLE_ID]) == sorted(second[EXAMPLE_ID])
    assert len(set(first[EXAMPLE_ID])) == 12
    for row in first:
        assert row[EXAMPLE_ID] == example_fingerprint(row)


def test_same_content_in_different_formats_same_id_and_deduplicated(tmp_path, caplog):
    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])
    (tmp_path / "pc.json").write_text(json.dumps([{"prompt": "Name a colour.", "completion": "Blue."}]))
    Dataset.from_list([{"messages": USER_Q + ASSISTANT_A}]).to_parquet(str(tmp_path / "chat.parquet"))
    write_jsonl(tmp_path / "other.jsonl", [{"prompt": "Name a colour.", "completion": "Red."}])
    names = ["alpaca.jsonl", "pc.json", "chat.parquet", "other.jsonl"]
    ids = [load_datasets(ScriptArguments(dataset_name=str(tmp_path / n)))[0][EXAMPLE_ID][0] for n in names]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    drops = DropLog(max_dropped_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="sftmix_trl"):
        train, _ = load_datasets(mixture(*({"path": str(tmp_path / n)} for n in names)), drops)
    assert sorted(train[EXAMPLE_ID]) == sorted({ids[0], ids[3]})
    first = f"{tmp_path / 'alpaca.jsonl'}, line 1"
    copies = [
        f"{tmp_path / 'pc.json'}, record 0 (copy of {first})",
        f"{tmp_path / 'chat.parquet'}, record 0 (copy of {first})",
    ]
    assert drops.counts["duplicate"] == 2 and drops.locations["duplicate"] == copies
    assert (
        f"dropped 2 repeat of an earlier record (same prompt and completion), e.g. {', '.join(copies)}" in caplog.text
    )


def test_duplicates_are_a_drop_reason_counted_recorded_and_stopped_on(tmp_path, caplog):
    """Repeats within a file: dropped with their locations, counted in the dropped share (and its stop),
    `sftmix_run.json`'s record and the model card; the first copy is the one trained."""
    records = numbered("x", 6) + numbered("x", 2)  # lines 7 and 8 repeat lines 1 and 2
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"25\.0% of the records cannot train.*2 repeat of an earlier record") as error:
        load_datasets(ScriptArguments(dataset_name=str(path), max_dropped_fraction=0.2))
    assert "remove the repeated records" in str(error.value) and "\n" not in str(error.value)
    drops = DropLog(max_dropped_fraction=0.25)
    train, _ = load_datasets(ScriptArguments(dataset_name=str(path)), drops)
    assert len(train) == 6 and len(set(train[EXAMPLE_ID])) == 6
    assert drops.locations["duplicate"] == [f"{path}, line {n} (copy of {path}, line {n - 6})" for n in (7, 8)]
    kept = {row["prompt"][0]["content"]: drops.where[row[EXAMPLE_ID]] for row in train}
    assert kept["x question 0"] == f"{path}, line 1"  # the first copy trains, and later drops name it
    record = drops.as_dict()
    assert record["dropped"] == {"duplicate": 2} and record["dropped_fraction"] == pytest.approx(0.25)
    assert "| repeat of an earlier record (same prompt and completion) | 2 |" in data_card_section(drops)
    # a source's `fraction` samples the rows Dataset.shuffle(seed) picks, as before duplicates were dropped here
    unique = write_jsonl(tmp_path / "u.jsonl", numbered("u", 10))
    sample = load_source(DataSource(str(unique), fraction=0.5), seed=3)
    assert sample[EXAMPLE_ID] == load_source(DataSource(str(unique))).shuffle(seed=3)[EXAMPLE_ID][:5]


# ----------------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_data_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"data file not found: {re.escape(str(path))}"):
        load_source(DataSource(str(path)))


def test_jsonl_record_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"})
    path.write_text(f"{good}\n\n{good}\n" + json.dumps({"instruction": "q"}) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, line 4: missing field 'output'"):
        load_source(DataSource(str(path)))


def test_json_array_record_missing_field_names_index_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "b"}, {"prompt": "q"}])
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, record 2: missing field 'completion'"):
        load_source(DataSource(str(path)))


def test_malformed_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + '\n{"prompt": "q", \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: malformed JSON"):
        load_source(DataSource(str(path)))


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_text("\n" if name.endswith("l") else "")
    with pytest.raises(DataError, match=r"the dataset is empty"):
        load_source(DataSource(str(tmp_path / name)))


def test_every_response_empty(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q1", "completion": ""}, {"prompt": "q2", "completion": "  \n"}])
    with pytest.raises(DataError, match=r"no record can train: 2 every assistant reply is empty, e\.g\. .*line 1, "):
        load_source(DataSource(str(tmp_path / "d.jsonl")))


def test_some_empty_responses_are_dropped_with_a_warning(tmp_path, caplog):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q1", "completion": ""}, {"prompt": "q2", "completion": "a"}])
    with caplog.at_level(logging.WARNING, logger="sftmix_trl"):
        loaded = rows(
            load_datasets(ScriptArguments(dataset_name=str(tmp_path / "d.jsonl"), max_dropped_fraction=0.5))[0]
        )
    assert [r["prompt"][0]["content"] for r in loaded] == ["q2"]
    assert "dropped 1 every assistant reply is empty, e.g. " in caplog.text and "d.jsonl, line 1" in caplog.text


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_bad_fraction(tmp_path, fraction):
    with pytest.raises(DataError, match=rf"`fraction` must be in \(0, 1\], got {fraction}"):
        DataSource(str(tmp_path / "d.jsonl"), fraction=fraction)
    with pytest.raises(DataError, match=r"`fraction` must be in"):
        load_datasets(mixture({"path": str(tmp_path / "d.jsonl"), "fraction": fraction}))


def test_unknown_mixture_entry_key(two_sources):
    with pytest.raises(DataError, match=r"unknown key\(s\) \['fractoin'\].*allowed keys: path, fraction"):
        load_datasets(mixture({"path": two_sources[0], "fractoin": 0.5}))


def test_unknown_mixture_top_level_key(two_sources):
    args = ScriptArguments(dataset_mixture={"datasets": [{"path": two_sources[0]}], "sed": 3})
    with pytest.raises(DataError, match=r"unknown key\(s\) \['sed'\].*allowed keys: datasets, seed"):
        load_datasets(args)


def test_mixture_entry_without_path(two_sources):
    with pytest.raises(DataError, match=r"needs `path`"):
        load_datasets(mixture({"fraction": 0.5}))


# ----------------------------------------------------------------------------------------------------------------------
# Masking: TRL trains on the completion tokens only


def test_trl_masks_the_prompt_tokens(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from sftmix_trl.configs import ModelArguments, SFTConfig
    from sftmix_trl.model import load_tokenizer

    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sky."},
    ]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    dataset = load_source(DataSource(str(tmp_path / "chat.jsonl")), assistant_turns="last")  # all: test_multiturn.py
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", bf16=False),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    prompt_text = tokenizer.apply_chat_template(conversation[:4], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    input_ids, labels = row["input_ids"], row["labels"]
    assert input_ids[:n] == prompt_ids
    assert len(input_ids) > n + 3
    assert labels[:n] == [-100] * n
    assert labels[n:] == input_ids[n:]
    completion = tokenizer.decode(input_ids[n:])
    assert completion.startswith("Blue, like the sky.<|im_end|>")
