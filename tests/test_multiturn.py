"""Multi-turn conversations: every assistant turn is trained (TRL's `assistant_only_loss` with generation-marked
templates), scored in stage 1 and mixed in stage 2; single-turn data trains exactly as before."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CHATML, ROOT, write_jsonl
from peft import get_peft_model_state_dict
from trl import SFTTrainer

from sftmix_trl.chat_templates import (
    ChatTemplateError,
    check_generation_markers,
    derive_generation_markers,
    training_chat_template,
)
from sftmix_trl.confidence import (
    ConfidenceConfig,
    ConfidenceError,
    ConfidenceTable,
    compute_confidence,
)
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
from sftmix_trl.data.checks import TRAINING, prepare_split
from sftmix_trl.data.drops import DropLog
from sftmix_trl.data.load import EXAMPLE_ID, DataError, example_fingerprint, has_multi_turn, load_datasets
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.perplexity import score_perplexities
from sftmix_trl.sftmix.config import SFTMixConfig
from sftmix_trl.sftmix.mixup import mixed_position_masks
from sftmix_trl.sftmix.sampler import PairedSampler
from sftmix_trl.sftmix.trainer import SFTMixTrainer

ALPACA = str(ROOT / "configs" / "templates" / "alpaca.jinja")
SMOLLM2 = Path("~/.cache/sftmix-trl/SmolLM2-135M-Instruct").expanduser()
SYSTEM = {"role": "system", "content": "Answer briefly."}
TURNS = [
    ("Name a colour.", "Blue."),
    ("Name a fruit.", "A ripe yellow banana."),
    ("Name a number.", "Seven, which is prime."),
]


def conversation(turns: int, system: bool = True) -> list[dict]:
    messages = [SYSTEM] if system else []
    for user, reply in TURNS[:turns]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def crafted_table(dataset) -> ConfidenceTable:
    perplexities = np.random.default_rng(0).uniform(2, 50, size=(len(dataset), 1))
    return ConfidenceTable(list(dataset[EXAMPLE_ID]), perplexities, np.ones(len(dataset), dtype=int))


def adapter_weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


def load(tmp_path, records, **script_kwargs):
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    return load_datasets(ScriptArguments(dataset_name=str(path), **script_kwargs))[0]


def prepare(model_path, dataset, tmp_path, chat_template_path=None, model=None, **config):
    """TRL's preparation, set up as the recipes set it up: `assistant_only_loss` for multi-turn data."""
    multi = has_multi_turn(dataset)
    config.setdefault("max_length", None)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_path)), False, chat_template_path, multi)
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", assistant_only_loss=multi, **config)
    if model is None:
        model = load_model(ModelArguments(model_name_or_path=str(model_path), load_in_4bit=False))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return trainer.train_dataset, tokenizer


def trained_text(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive trained tokens (labels != -100)."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def by_turns(dataset, prepared) -> dict[int, dict]:
    """Prepared rows keyed by the number of assistant turns of their conversation."""
    turns = {i: sum(m["role"] == "assistant" for m in c) for i, c in zip(dataset[EXAMPLE_ID], dataset["completion"])}
    return {turns[row[EXAMPLE_ID]]: row for row in prepared}


# -- data: the split, the ids, the option -------------------------------------------------------------------------------


def test_a_conversation_is_split_at_its_first_reply_and_keeps_a_stable_distinct_id(tmp_path):
    records = [{"messages": conversation(n)} for n in (1, 2, 3)]
    every = load(tmp_path, records)
    last = load(tmp_path, records, assistant_turns="last")
    every_rows = {len(r["completion"]): r for r in every}
    assert sorted(every_rows) == [1, 3, 5]  # one reply; reply, user, reply; ...
    assert every_rows[3]["prompt"] == conversation(2)[:2] and every_rows[3]["completion"] == conversation(2)[2:]
    assert [len(c) for c in last["completion"]] == [1, 1, 1] and not has_multi_turn(last)
    assert conversation(3)[:-1] in last["prompt"]  # the old form: earlier turns are context
    # A one-turn conversation is the same example in both modes; a longer one is another example
    assert set(every[EXAMPLE_ID]) & set(last[EXAMPLE_ID]) == {example_fingerprint(every_rows[1])}
    assert sorted(load(tmp_path, records)[EXAMPLE_ID]) == sorted(every[EXAMPLE_ID])  # stable across loads
    assert has_multi_turn(every)


def test_trailing_user_message_is_dropped_and_empty_replies_are_not_trained_examples(tmp_path):
    messages = conversation(2) + [{"role": "user", "content": "Thanks!"}]
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}] * 2
    dataset = load(tmp_path, [{"messages": messages}, {"messages": empty}], max_dropped_fraction=0.5)
    assert len(dataset) == 1 and dataset[0]["completion"] == conversation(2)[2:]


# -- label masks: every assistant turn, and nothing else ----------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_labels_cover_every_assistant_turn_and_only_them(tiny_model, tmp_path, template):
    path = None if template == "chatml" else ALPACA
    records = [{"messages": conversation(n)} for n in (1, 2, 3)]
    dataset = load(tmp_path, records)
    prepared, tokenizer = prepare(tiny_model, dataset, tmp_path, path)
    end = "<|im_end|>\n" if template == "chatml" else tokenizer.eos_token + "\n\n"
    rows = by_turns(dataset, prepared)
    for turns in (1, 2, 3):
        assert trained_text(tokenizer, rows[turns]) == [reply + end for _, reply in TURNS[:turns]]
        # the text trained on is the conversation as the (unmarked) template renders it
        assert tokenizer.decode(rows[turns]["input_ids"]) == tokenizer.apply_chat_template(
            conversation(turns), tokenize=False
        )

    # A one-turn conversation trains exactly the tokens it trains as a prompt/completion pair without the markers
    (tmp_path / "single").mkdir()
    single = load(tmp_path / "single", [records[0]])
    assert not has_multi_turn(single)
    alone, _ = prepare(tiny_model, single, tmp_path / "single", path)
    assert alone[0]["input_ids"] == rows[1]["input_ids"] and alone[0]["labels"] == rows[1]["labels"]


def test_demo_model_template_trains_every_turn_after_its_default_system_prompt(tmp_path, request):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = SMOLLM2 if (SMOLLM2 / "tokenizer.json").is_file() else request.getfixturevalue("demo_model")
    records = [{"messages": conversation(n, system=n != 2)} for n in (1, 2, 3)]
    dataset = load(tmp_path, records)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(path)))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    prepared, tokenizer = prepare(path, dataset, tmp_path, model=LlamaForCausalLM(config))
    rows = by_turns(dataset, prepared)
    for turns in (1, 2, 3):
        assert trained_text(tokenizer, rows[turns]) == [reply + "<|im_end|>\n" for _, reply in TURNS[:turns]]
    assert tokenizer.decode(rows[2]["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_templates_without_markers_are_derived_or_refused_with_one_line(tiny_model, tmp_path):
    marked = derive_generation_markers(CHATML)
    assert "{% generation %}" in marked and check_generation_markers(CHATML, marked, {}) is None
    alpaca = Path(ALPACA).read_text()
    unmarked = alpaca.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert check_generation_markers(unmarked, alpaca, {"eos_token": "</s>"}) is None
    # markers that would also train the turn's header are caught
    branch = "{% if message['role'] == 'assistant' %}"
    wrong = marked.replace("{% generation %}", "").replace(branch, branch + "{% generation %}")
    assert "not the reply" in check_generation_markers(CHATML, wrong, {})

    model_args = ModelArguments(model_name_or_path=str(tiny_model))
    tokenizer = load_tokenizer(model_args)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="chat_template_path"):
        training_chat_template(tokenizer)
    plain = tmp_path / "plain.jinja"
    plain.write_text(tokenizer.chat_template)
    with pytest.raises(ChatTemplateError, match=r"no \{% generation %\} markers.*`assistant_turns: last`") as error:
        load_tokenizer(model_args, False, str(plain), assistant_only_loss=True)
    assert "\n" not in str(error.value)


# -- truncation ----------------------------------------------------------------------------------------------------------


def test_truncation_keeps_the_turns_that_fit_and_drops_conversations_left_without_a_reply(
    tiny_model, tmp_path, caplog
):
    long_user = {"role": "user", "content": "word " * 200}
    records = [{"messages": conversation(3)}, {"messages": [long_user, *conversation(2, system=False)[1:]]}]
    dataset = load(tmp_path, records)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    cut = len(tokenizer.apply_chat_template(conversation(2) + [conversation(3)[5]], tokenize=True)["input_ids"]) + 2
    prepared, tokenizer = prepare(tiny_model, dataset, tmp_path, max_length=cut)
    assert len(prepared) == 1  # the conversation whose first user turn fills max_length is dropped
    assert trained_text(tokenizer, prepared[0]) == [reply + "<|im_end|>\n" for _, reply in TURNS[:2]]
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", assistant_only_loss=True, max_length=cut)
    with caplog.at_level(logging.WARNING, logger="sftmix_trl"):
        prepare_split(dataset, tokenizer, args, SFTTrainer, "train", DropLog(), TRAINING)
    assert f"1 of 2 training examples lose their whole response to truncation at max_length={cut}" in caplog.text
    args.max_length = 8
    with pytest.raises(DataError, match="2 of the 2 training examples lose their whole response to truncation"):
        prepare_split(dataset, tokenizer, args, SFTTrainer, "train", DropLog(), TRAINING)


# -- stage 1: perplexity over all assistant tokens, recorded and checked ---------------------------------------------------


def test_stage1_perplexity_of_a_conversation_is_over_both_turns(tiny_model, tmp_path):
    model = load_model(ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False, dtype="float32"))
    model = model.double()
    dataset = load(tmp_path, [{"messages": conversation(2)}, {"messages": conversation(1)}])
    prepared, tokenizer = prepare(tiny_model, dataset, tmp_path, model=model)
    ppl, counts, _ = score_perplexities(model, prepared, batch_size=2, pad_token_id=tokenizer.pad_token_id)

    # By hand: the tokens whose text lies in a reply or its end of turn, found in the rendered string
    text = tokenizer.apply_chat_template(conversation(2), tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(text.index(reply), text.index(reply) + len(reply + "<|im_end|>\n")) for _, reply in TURNS[:2]]
    positions = [t for t, (s, e) in enumerate(encoded["offset_mapping"]) if any(a <= s and e <= b for a, b in spans)]
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0].double(), -1)
    nll = [-log_probs[t - 1, encoded["input_ids"][t]].item() for t in positions]
    two_turn = next(e[EXAMPLE_ID] for e in dataset if len(e["completion"]) == 3)
    row = prepared[EXAMPLE_ID].index(two_turn)
    assert counts[row] == len(positions) == sum(len(tokenizer(r + "<|im_end|>\n")["input_ids"]) for _, r in TURNS[:2])
    assert ppl[row] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-9)


def test_confidence_table_records_the_scored_turns_and_refuses_another_setting(tiny_model, tmp_path):
    records = [{"messages": conversation(1 + i % 3, system=i % 2 == 0)} for i in range(8)]
    for i, record in enumerate(records):
        record["messages"][-1]["content"] += f" ({i})"  # distinct examples
    args = SFTMixConfig(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        per_device_train_batch_size=4,
        reference_batch_size=4,
        num_confidence_checkpoints=1,
        activation_checkpointing=False,
    )
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    every = load(tmp_path, records)
    table = compute_confidence(every, model_args, args, ConfidenceConfig.from_args(args), args.confidence_dir)
    assert table.metadata["run"]["scored_turns"] == "all" and args.assistant_only_loss is False  # not mutated
    tokens = dict(zip(table.example_ids, table.num_response_tokens))
    tokenizer = load_tokenizer(model_args)
    for example in every:
        replies = [m["content"] + "<|im_end|>\n" for m in example["completion"] if m["role"] == "assistant"]
        assert tokens[example[EXAMPLE_ID]] == sum(len(tokenizer(r)["input_ids"]) for r in replies)

    last = load(tmp_path, records, assistant_turns="last")
    for must_exist in (False, True):
        with pytest.raises(ConfidenceError, match="scored_turns: expected 'last', found 'all'"):
            compute_confidence(
                last, model_args, args, ConfidenceConfig.from_args(args), args.confidence_dir, must_exist
            )


# -- stage 2: mixed positions across turns, and mu = 0 is TRL's assistant_only_loss NTP ----------------------------------


def test_mixed_positions_are_the_first_assistant_tokens_in_order_across_turns():
    P, A = -100, 7  # prompt/user token, assistant token (label values; only -100 matters)
    # confident: reply 1 predicts positions 2-3, reply 2 positions 6-8;  unconfident: reply 1 at 1, reply 2 at 3-6
    labels_c = torch.tensor([[P, P, P, A, A, P, P, A, A, A]])
    labels_u = torch.tensor([[P, P, A, P, A, A, A, A, P, P]])
    keep_c, keep_u, n = mixed_position_masks(labels_c, labels_u)
    assert n.tolist() == [5]  # min(5, 5): both turns of both
    assert keep_c[0].nonzero().flatten().tolist() == [2, 3, 6, 7, 8]
    assert keep_u[0].nonzero().flatten().tolist() == [1, 3, 4, 5, 6]
    # a shorter partner truncates the longer conversation inside its second turn, never its first
    keep_c, keep_u, n = mixed_position_masks(labels_c, torch.tensor([[P, P, A, A, P, A, P, P, P, P]]))
    assert n.tolist() == [3] and keep_c[0].nonzero().flatten().tolist() == [2, 3, 6]
    assert keep_u.nonzero()[:, 1].tolist() == [1, 2, 4]


def test_zero_mixup_weight_equals_trl_assistant_only_loss_on_the_same_multi_turn_batches(tiny_model, tmp_path):
    dataset = load_datasets(ScriptArguments(dataset_name=str(ROOT / "data/demo/chat_messages.jsonl")))[0]
    assert has_multi_turn(dataset)
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    common = dict(
        report_to="none",
        per_device_train_batch_size=4,
        max_length=128,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        activation_checkpointing=False,
        seed=7,
        assistant_only_loss=True,
    )

    def build(cls, args, data, **kwargs):
        torch.manual_seed(0)
        return cls(
            model=load_model(model_args),
            args=args,
            train_dataset=data,
            processing_class=load_tokenizer(model_args, assistant_only_loss=True),
            peft_config=lora_config(model_args),
            **kwargs,
        )

    sftmix = build(
        SFTMixTrainer,
        SFTMixConfig(output_dir=str(tmp_path / "a"), mixup_weight=0.0, **common),
        dataset,
        confidence=crafted_table(dataset),
    )
    sftmix.train()

    class SamePairs(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return PairedSampler(sftmix.confident_rows, sftmix.unconfident_rows, 2, seed=7)

    # TRL's own form of the same conversations: a `messages` column, labels from the assistant masks alone
    native = dataset.map(
        lambda e: {"messages": e["prompt"] + e["completion"]}, remove_columns=["prompt", "completion"]
    )
    baseline = build(SamePairs, SFTConfig(output_dir=str(tmp_path / "b"), **common), native)
    assert baseline.train_dataset["labels"] == sftmix.train_dataset["labels"]
    baseline.train()
    losses = [h["loss"] for h in sftmix.state.log_history if "loss" in h]
    expected = [h["loss"] for h in baseline.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses == pytest.approx(expected, rel=1e-6)
    for name, weight in adapter_weights(sftmix).items():
        torch.testing.assert_close(weight, adapter_weights(baseline)[name])
    assert any(h.get("mixup_loss", 0) > 0 for h in sftmix.state.log_history)


def test_multi_turn_data_without_assistant_only_loss_is_refused(tiny_model, tmp_path):
    dataset = load(tmp_path, [{"messages": conversation(n)} for n in (1, 2)])
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False)
    with pytest.raises(ValueError, match="assistant_only_loss=True"):
        SFTMixTrainer(
            model=load_model(model_args),
            args=SFTMixConfig(output_dir=str(tmp_path / "o"), report_to="none", per_device_train_batch_size=2),
            train_dataset=dataset,
            confidence=crafted_table(dataset),
            processing_class=load_tokenizer(model_args),
        )


# -- the demo: its chat file trains both turns ------------------------------------------------------------------------------


def test_demo_mixture_trains_both_turns_of_its_two_turn_conversations(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / "configs/demo/sftmix_qlora.yaml").read_text())
    dataset = load_datasets(ScriptArguments(dataset_mixture=config["dataset_mixture"]))[0]
    assert has_multi_turn(dataset)
    prepared, tokenizer = prepare(tiny_model, dataset, tmp_path)
    rows = {row[EXAMPLE_ID]: row for row in prepared}
    two_turn = [e for e in dataset if len(e["completion"]) == 3]
    assert len(two_turn) == 13  # the demo chat file's two-turn conversations
    for example in two_turn:
        replies = [m["content"] + "<|im_end|>\n" for m in example["completion"] if m["role"] == "assistant"]
        assert trained_text(tokenizer, rows[example[EXAMPLE_ID]]) == replies


def test_recipe_stops_with_one_line_when_truncation_leaves_no_reply(tiny_model, tmp_path, monkeypatch):
    import importlib.util
    import sys

    from sftmix_trl.runs import launch

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(2)}, {"messages": conversation(3)}])
    spec = importlib.util.spec_from_file_location("recipe_sft", ROOT / "recipes" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    argv = ["--dataset_name", str(path), "--model_name_or_path", str(tiny_model), "--load_in_4bit", "false"]
    argv += ["--output_dir", str(out), "--max_length", "12", "--report_to", "none"]
    monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
    with pytest.raises(SystemExit) as stop:
        launch(module.main, (ScriptArguments, SFTConfig, ModelArguments))
    message = str(stop.value)
    assert message.startswith("error: 2 of the 2 training examples lose their whole response to truncation at ")
    assert "max_length=12" in message and "\n" not in message
    assert not out.exists()  # checked before the trainer exists: not even an empty output_dir
