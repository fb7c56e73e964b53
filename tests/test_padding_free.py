"""Padding-free SFTMix: a micro-batch laid end to end in one row gives the padded path's loss and gradients, the
examples never see each other, truncation keeps and drops the same examples, and a setting that cannot keep the
examples apart stops with one line."""

import json

import pytest
import torch
from conftest import run_recipe
from test_recipes import TINY, _run_in_process, assert_stage2_two_processes_match_one, ok
from test_sftmix_trainer import NUM_EXAMPLES, crafted_table, make_args
from transformers import AutoModelForCausalLM
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sftmix_trl.confidence.reference import _reference_args
from sftmix_trl.configs import ModelArguments, ScriptArguments, SFTConfig
from sftmix_trl.data.load import load_datasets
from sftmix_trl.model import load_model, load_tokenizer, lora_config
from sftmix_trl.sft_trainer import PaddingFreeError, TruncatingSFTTrainer, check_attention, trainable_attention
from sftmix_trl.sftmix.config import SFTMixConfig
from sftmix_trl.sftmix.mixup import IGNORE_INDEX, count_mixed_positions, mixed_position_masks
from sftmix_trl.sftmix.padding_free import mixed_flat_positions, sequence_lengths, unflatten
from sftmix_trl.sftmix.trainer import ROW, SFTMixTrainer


@pytest.fixture(scope="module")
def dataset():
    return load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=NUM_EXAMPLES))[0]


def build(tiny_model, dataset, args, trainer_cls=SFTMixTrainer):
    """A trainer whose LoRA starts away from zero (B random, so every adapter matrix has a gradient) and without
    dropout (its masks depend on the batch layout)."""
    model_args = ModelArguments(model_name_or_path=str(tiny_model), load_in_4bit=False, lora_dropout=0.0)
    peft_config = lora_config(model_args)
    peft_config.init_lora_weights = False
    torch.manual_seed(0)
    common = dict(
        model=load_model(model_args),
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer(model_args),
        peft_config=peft_config,
    )
    if issubclass(trainer_cls, SFTMixTrainer):
        return trainer_cls(confidence=crafted_table(dataset), **common)
    return trainer_cls(**common)


# -- the pure functions ------------------------------------------------------------------------------------------------


def test_unflatten_recovers_the_padded_rows_and_mixed_positions():
    torch.manual_seed(0)
    examples = []
    for length, prompt in ((5, 2), (9, 4), (3, 1), (7, 6)):
        ids = torch.randint(3, 50, (length,)).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    # pad_to_multiple_of adds position-0 padding after the last example: it must not count as an example
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=32)(examples)
    assert flat["input_ids"].shape == (1, 32)
    lengths = sequence_lengths(flat["position_ids"], len(examples))
    assert lengths.tolist() == [5, 9, 3, 7]
    labels = unflatten(flat["labels"], lengths, IGNORE_INDEX)
    # the collator masks each example's first token; that position is never a target (labels shift by one)
    torch.testing.assert_close(labels[:, 1:], padded["labels"][:, 1:])
    assert count_mixed_positions(labels) == count_mixed_positions(padded["labels"]) == 3 + 1  # min(3, 5) + min(2, 1)
    hidden = torch.randn(1, 32, 3, requires_grad=True)
    rows = unflatten(hidden, lengths)  # (4, 9, 3)
    assert rows.shape == (4, 9, 3) and torch.equal(rows[1], hidden[0, 5:14]) and not rows[2, 3:].any()
    rows.sum().backward()  # gradients reach the flat row's real positions only
    assert hidden.grad[0, :24].eq(1).all() and not hidden.grad[0, 24:].any()


def test_mixed_flat_positions_are_the_padded_paths_positions():
    """The Mixup's positions found in the flattened row select the same hidden states and targets, in the same order,
    as the masks on the re-padded rows; and the full (2K, T, D) copy is never needed."""
    torch.manual_seed(0)
    examples = []
    for length, prompt in ((6, 2), (9, 3), (4, 1), (8, 6), (7, 2), (7, 5)):  # pairs (c, u): 3 pairs
        ids = torch.randint(3, 50, (length,)).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=64)(examples)
    lengths = sequence_lengths(flat["position_ids"], len(examples))
    hidden = torch.randn(1, 64, 5)
    index_c, index_u, n = mixed_flat_positions(flat["labels"], lengths)
    rows, labels = unflatten(hidden, lengths), unflatten(flat["labels"], lengths, IGNORE_INDEX)
    keep_c, keep_u, n_padded = mixed_position_masks(labels[0::2], labels[1::2])
    assert n.tolist() == n_padded.tolist() == [4, 2, 2]  # min of the response lengths of each pair
    assert torch.equal(hidden[0, index_c], rows[0::2, :-1][keep_c])
    assert torch.equal(hidden[0, index_u], rows[1::2, :-1][keep_u])
    assert torch.equal(flat["labels"][0, index_c + 1], labels[0::2, 1:][keep_c])
    assert torch.equal(flat["labels"][0, index_u + 1], labels[1::2, 1:][keep_u])


# -- attention ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        None,
        "sdpa",
        "eager",
        "flex_attention",
        "flash_attention_2",
        "flash_attention_3",
        "kernels-community/flash-attn2",
        "kernels-community/vllm-flash-attn3",
        "paged|flash_attention_2",
    ],
)
def test_every_attention_transformers_runs_varlen_or_masks_is_accepted(name):
    check_attention(name)


@pytest.mark.parametrize("name", ["paged|sdpa", "paged|eager", "kernels-community/some-other-kernel"])
def test_attention_without_separation_is_refused(name):
    with pytest.raises(PaddingFreeError, match="flex_attention"):
        check_attention(name)


def test_flex_attention_trains_with_sdpa_on_a_cpu():
    assert trainable_attention("flex_attention") == ("flex_attention" if torch.cuda.is_available() else "sdpa")
    assert trainable_attention("sdpa") == "sdpa" and trainable_attention(None) is None


def test_flex_attention_gives_the_sdpa_loss_on_padding_free_rows(tiny_model):
    """The GPU configs' attention (a block mask, no dense (sum L)^2 mask) on TRL's padding-free rows: the loss and
    logits of sdpa's dense block-diagonal mask (forward only: flex attention has no backward on a CPU)."""
    torch.manual_seed(0)
    examples = []
    for length, prompt in ((37, 10), (150, 40), (9, 3), (70, 50)):
        ids = torch.randint(3, 300, (length,)).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    batch.pop("attention_mask", None)
    outputs = {}
    for name in ("sdpa", "flex_attention"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=name).eval()
        with torch.no_grad():
            outputs[name] = model(**batch, use_cache=False)
    torch.testing.assert_close(outputs["flex_attention"].logits, outputs["sdpa"].logits, rtol=1e-4, atol=1e-5)
    assert outputs["flex_attention"].loss.item() == pytest.approx(outputs["sdpa"].loss.item(), rel=1e-5)
    # and the examples were kept apart: attending over the whole row gives another loss
    with torch.no_grad():
        mixed = model(batch["input_ids"], labels=batch["labels"], use_cache=False)
    assert abs(mixed.loss.item() - outputs["sdpa"].loss.item()) > 1e-3


def _packed_and_separate(model_path, attn_implementation):
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=attn_implementation).eval()
    first, second = torch.arange(3, 14)[None], torch.arange(20, 27)[None]
    position_ids = torch.cat([torch.arange(11), torch.arange(7)])[None]
    with torch.no_grad():  # use_cache=False, as TRL trains: transformers builds the packed mask only without a cache
        packed = model(torch.cat([first, second], 1), position_ids=position_ids, use_cache=False).logits
        alone = [model(ids, use_cache=False).logits for ids in (first, second)]
    return packed, torch.cat(alone, 1)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_examples_do_not_see_each_other(tiny_model, attn_implementation):
    packed, alone = _packed_and_separate(tiny_model, attn_implementation)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_attention_that_mixes_packed_examples_is_refused(tiny_model, dataset, tmp_path):
    packed, alone = _packed_and_separate(tiny_model, "paged|eager")
    assert not torch.allclose(packed[:, 11:], alone[:, 11:], atol=1e-3)  # the second example sees the first
    model_args = ModelArguments(
        model_name_or_path=str(tiny_model), load_in_4bit=False, attn_implementation="paged|eager"
    )
    with pytest.raises(PaddingFreeError, match=r"attn_implementation='paged\|eager'.*sdpa"):
        SFTMixTrainer(
            model=load_model(model_args),
            args=make_args(tmp_path, padding_free=True),
            train_dataset=dataset,
            confidence=crafted_table(dataset),
            processing_class=load_tokenizer(model_args),
        )
    assert not (tmp_path / "out").exists()


# -- SFTMix on one flattened row = SFTMix on padded rows ---------------------------------------------------------------


def _loss_and_grads(trainer, rows):
    """One micro-batch through the trainer's collator, count, loss and backward, as its training loop does."""
    trainer.model.train()
    trainer.model.zero_grad()
    keep = ("input_ids", "labels", ROW) if ROW in trainer.train_dataset.column_names else ("input_ids", "labels")
    batch = trainer.data_collator([{k: trainer.train_dataset[r][k] for k in keep} for r in rows])
    batch = trainer._prepare_inputs(batch)
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, batch


def test_padding_free_sftmix_gives_the_padded_loss_gradients_and_metrics(tiny_model, dataset, tmp_path):
    # max_length 512 truncates nothing: the examples keep their lengths (306 to 399 tokens), so padding is real
    padded = build(tiny_model, dataset, make_args(tmp_path / "p", mixup_weight=0.2, max_length=512))
    flat = build(tiny_model, dataset, make_args(tmp_path / "f", mixup_weight=0.2, max_length=512, padding_free=True))
    assert flat.args.max_length == padded.args.max_length == 512  # the user's setting is kept on the trainer
    rows = padded.confident_rows[:2] + padded.unconfident_rows[:2]
    rows = [rows[0], rows[2], rows[1], rows[3]]  # c, u, c, u
    loss_p, grads_p, batch_p = _loss_and_grads(padded, rows)
    loss_f, grads_f, batch_f = _loss_and_grads(flat, rows)
    assert batch_f["input_ids"].shape[0] == 1 and "attention_mask" not in batch_f
    assert batch_f["input_ids"].numel() == int(batch_p["attention_mask"].sum()) < batch_p["input_ids"].numel()
    assert flat._num_mixed_in_batch == padded._num_mixed_in_batch > 0
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    assert set(grads_f) == set(grads_p)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for key in ("ntp_loss", "ntp_loss_confident", "ntp_loss_unconfident", "mixup_loss", "mixup_token_share"):
        assert flat._metrics["train"][key][-1] == pytest.approx(padded._metrics["train"][key][-1], rel=1e-5), key
    held_out = dataset.select(range(6))  # evaluation: TRL's plain NTP loss, on flattened rows too
    assert flat.evaluate(held_out)["eval_loss"] == pytest.approx(padded.evaluate(held_out)["eval_loss"], rel=1e-5)


def test_zero_mixup_weight_padding_free_equals_trl_padding_free(tiny_model, dataset, tmp_path):
    # max_length=None: TRL's own SFTTrainer accepts padding_free only so
    sftmix = build(
        tiny_model, dataset, make_args(tmp_path / "s", mixup_weight=0.0, padding_free=True, max_length=None)
    )
    trl_args = SFTConfig(
        output_dir=str(tmp_path / "t"),
        report_to="none",
        per_device_train_batch_size=4,
        padding_free=True,
        max_length=None,
        activation_checkpointing=False,
        seed=7,
    )
    trl = build(tiny_model, dataset, trl_args, trainer_cls=SFTTrainer)
    rows = [sftmix.confident_rows[0], sftmix.unconfident_rows[0], sftmix.confident_rows[1], sftmix.unconfident_rows[1]]
    loss_s, grads_s, _ = _loss_and_grads(sftmix, rows)
    loss_t, grads_t, batch_t = _loss_and_grads(trl, rows)
    assert batch_t["input_ids"].shape[0] == 1
    torch.testing.assert_close(loss_s, loss_t, rtol=1e-6, atol=1e-7)
    for name, grad in grads_t.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# -- truncation --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_truncation_keeps_and_drops_the_same_examples(tiny_model, dataset, tmp_path, truncation_mode):
    def prepared(trainer_cls, **overrides):
        # prompts are 27 to 58 tokens: max_length 45 leaves 7 of the 20 examples without a response token
        args = make_args(tmp_path / str(len(overrides)), max_length=45, truncation_mode=truncation_mode, **overrides)
        if trainer_cls is not TruncatingSFTTrainer:
            return build(tiny_model, dataset, args).train_dataset
        # the stage-1 reference run: plain TRL arguments copied from the user's
        return build(tiny_model, dataset, _reference_args(args, args, tmp_path), trainer_cls=trainer_cls).train_dataset

    for trainer_cls in (TruncatingSFTTrainer, None):
        padded, flat = prepared(trainer_cls), prepared(trainer_cls, padding_free=True)
        if truncation_mode == "keep_start":
            assert len(flat) == NUM_EXAMPLES - 7
        assert flat["example_id"] == padded["example_id"]
        assert flat["input_ids"] == padded["input_ids"] and flat["labels"] == padded["labels"]
        assert max(len(ids) for ids in flat["input_ids"]) == 45


def test_packing_is_refused_with_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^SFTMix pairs whole examples: `packing`.*padding_free: true") as error:
        SFTMixConfig(output_dir=str(tmp_path), packing=True, packing_strategy="bfd")
    assert "\n" not in str(error.value)


# -- recipes -----------------------------------------------------------------------------------------------------------


def test_recipe_refuses_an_attention_that_mixes_examples_before_any_write(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--config", "configs/demo/sftmix_qlora.yaml", "--model_name_or_path", str(tiny_model)]
    argv += ["--output_dir", str(out), "--padding_free", "true", "--attn_implementation", "paged|eager"]
    text = _run_in_process("sftmix", argv, monkeypatch)
    assert text.startswith("error: padding_free needs an attention") and "\n" not in text
    assert not out.exists()


@pytest.mark.slow
def test_two_process_padding_free_matches_one_process(tiny_model, tmp_path):
    """Stage 1 with padding-free batches (same examples and max_length in the table), then stage 2 on 1 and 2
    processes: the same losses."""
    common = ["--config", "configs/demo/sftmix_qlora.yaml", "--model_name_or_path", str(tiny_model), *TINY]
    common += ["--padding_free", "true", "--reference_learning_rate", "1e-2"]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run_recipe("confidence.py", *common, "--output_dir", str(one), "--reference_batch_size", "8"))
    meta = json.loads((one / "confidence" / "metadata.json").read_text())
    assert meta["run"]["max_length"] == 512 and meta["num_scored"] == 24
    assert_stage2_two_processes_match_one(common, one, two)
