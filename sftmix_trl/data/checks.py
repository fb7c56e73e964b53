"""The data prepared once, as TRL prepares it, and checked before anything is written to `output_dir`.

TRL prepares the data inside `SFTTrainer.__init__` (chat template, completion mask, truncation at `max_length`, and
the silent drop of examples that truncation leaves without a response token); the SFTMix recipes write the
confidence folder before that. So the recipes call `check_training_data` (or `check_sftmix_data`), through
`prepare.prepare_run_data`, right after loading the data and the tokenizer: it runs TRL's own preparation on the
data (no model needed), turns every count that would fail later (no example left, too few for a confidence split)
into one `DataError` line, and returns the prepared sets
(`PreparedData`). The recipes hand those to the trainers, which then skip their own preparation
(`TruncatingSFTTrainer` recognises a prepared dataset): the data is tokenised once per run (twice when the stage-1
reference has a tokenizer of its own).

Records that cannot train are dropped and counted (`drops.DropLog`): those the chat template refuses to render
(`drop_unrenderable`, with the template's own message) and those that truncation leaves without a reply. With a
reference model on another tokenizer, the examples that survive truncation must be the same under both tokenizers
(stage 2 trains only examples stage 1 scored).

These functions take datasets and return datasets or counts, or raise: they do not depend on when the recipes call
them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

from datasets import Dataset
from jinja2.exceptions import TemplateError
from tqdm.auto import tqdm
from trl import SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import _tokenize

from sftmix_trl.data.drops import DropLog
from sftmix_trl.data.load import EXAMPLE_ID, DataError
from sftmix_trl.model import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """The training data of a run, as each trainer trains on it (tokenised, labelled, truncated, `example_id` kept),
    and the normalised examples they come from (without those a chat template refuses to render)."""

    train: Dataset
    eval: Dataset | None = None
    reference_train: Dataset | None = None  # as the stage-1 reference trains on and scores it (its tokenizer)
    examples: Dataset | None = None  # the normalised training examples kept: what the confidence table is keyed on
    eval_examples: Dataset | None = None


def prepare_like_trl(dataset: Dataset, tokenizer, args, trainer_class: type = SFTTrainer, name: str = "train"):
    """`dataset` exactly as `trainer_class(args=args, processing_class=tokenizer)` prepares it: TRL's own
    `_prepare_dataset`, with the chat template and completion-only setting `SFTTrainer.__init__` would choose."""
    preparer = trainer_class.__new__(trainer_class)  # the preparation reads only these three attributes
    preparer._tokenizer = tokenizer
    use_training_template = args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template)
    preparer.chat_template = get_training_chat_template(tokenizer) if use_training_template else None
    sample = dataset[0]
    preparer.completion_only_loss = (
        ("prompt" in sample and "completion" in sample)
        if args.completion_only_loss is None
        else args.completion_only_loss
    )
    packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
    return preparer._prepare_dataset(dataset, tokenizer, copy.copy(args), packing, None, name)


def drop_unrenderable(
    dataset: Dataset | None, tokenizer, drops: DropLog | None = None, count: bool = True, name: str = "train"
) -> Dataset | None:
    """`dataset` without the examples the chat template refuses to render (its `raise_exception`, e.g. "roles must
    alternate" or "system role not supported"), each counted in `drops` with the template's own message. `count`:
    these examples enter the dropped share (False for a second tokenizer checking the same examples)."""
    if dataset is None:
        return None
    drops = drops if drops is not None else DropLog()
    if count:
        drops.checked += len(dataset)
    if "raise_exception" not in str(tokenizer.chat_template):
        return dataset  # a template that never refuses (most ChatML ones): skip rendering every example
    keep = []
    rows = zip(dataset["prompt"], dataset["completion"], dataset[EXAMPLE_ID])
    for index, (prompt, completion, example_id) in enumerate(
        tqdm(rows, total=len(dataset), desc=f"Rendering {name} with the chat template", disable=len(dataset) < 20000)
    ):
        try:
            tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        except TemplateError as error:
            message = str(error.message or error)
            drops.add("template_refused", drops.location(example_id), message, stage="check", key=example_id)
            continue
        keep.append(index)
    if len(keep) < len(dataset):
        drops.log(["template_refused"])
        dataset = dataset.select(keep)
    return dataset


def count_truncated(dataset: Dataset, prepared: Dataset, drops: DropLog, name: str = "training") -> int:
    """Count in `drops` the examples of `dataset` that truncation left without a reply (absent from `prepared`)."""
    kept = set(prepared[EXAMPLE_ID]) if EXAMPLE_ID in prepared.column_names else set()
    lost = [example_id for example_id in dataset[EXAMPLE_ID] if example_id not in kept]
    for example_id in lost:
        drops.add("truncated", drops.location(example_id), stage="check", key=example_id)
    return len(lost)


def _too_few(dataset: Dataset, prepared: Dataset, tokenizer, args, what: str, purpose: str, needed: int) -> DataError:
    """The error for too few examples left with a response token: how many truncation emptied, what to change."""
    kept = set(prepared[EXAMPLE_ID]) if EXAMPLE_ID in prepared.column_names else set()
    lost = [example for example in dataset if example.get(EXAMPLE_ID) not in kept]
    if not lost:
        return DataError(f"{purpose} needs at least {needed} {what} examples, got {len(dataset)}")
    hint = "Raise `max_length`"
    if all("prompt" in example for example in lost):
        # The prompt as TRL tokenises it (generation prompt included): a response token needs max_length above it
        longest = max(len(_tokenize(tokenizer, e["prompt"], add_generation_prompt=True)["input_ids"]) for e in lost)
        hint += f" above {longest} (the longest of their prompts, in tokens)"
    return DataError(
        f"{len(lost)} of the {len(dataset)} {what} examples lose their whole response to truncation at "
        f"max_length={args.max_length} (truncation_mode={args.truncation_mode}), leaving {len(prepared)}; "
        f"{purpose} needs at least {needed}. {hint} or shorten those prompts"
    )


def check_training_data(
    train_dataset: Dataset,
    tokenizer,
    training_args,
    eval_dataset: Dataset | None = None,
    confidence_config=None,
    trainer_class: type = SFTTrainer,
    drops: DropLog | None = None,
    stop_on_drops: bool = True,
    run_trainer: bool = True,
) -> PreparedData:
    """Fail with one `DataError` line, before any write, when the data cannot train as configured.

    Args:
        train_dataset, eval_dataset: as loaded by `sftmix_trl.data.load.load_datasets`.
        tokenizer: the tokenizer the trainer will use (chat template included).
        training_args: the run's `SFTConfig`/`SFTMixConfig` (max_length, truncation_mode, loss settings).
        confidence_config: the `ConfidenceConfig` of a run with a confidence stage: then at least 2 examples must
            keep a response token (stage 1 checks its own counts: `confidence.table.check_counts`).
        trainer_class: the trainer that will prepare the data.
        run_trainer: False for the stage-1 reference alone (no held-out data or evaluation of its own).
        drops: where the examples that truncation leaves without a reply are counted; then the run also stops when
            the dropped share passes its `max_dropped_fraction` (unless `stop_on_drops` is False: the caller checks).

    Returns:
        the prepared training and held-out sets, for the trainer (which then does not prepare them again).
    """
    needed = 2 if confidence_config is not None else 1
    if run_trainer and eval_dataset is None and str(getattr(training_args.eval_strategy, "value", "no")) != "no":
        # transformers refuses it only when the trainer is built: after stage 1 in an SFTMix run
        raise DataError(
            f"eval_strategy={training_args.eval_strategy.value!r} needs held-out data: set `eval_split_size` (a "
            "fraction or a count), or `eval_strategy: no`"
        )
    prepared = prepare_like_trl(train_dataset, tokenizer, training_args, trainer_class)
    if len(prepared) < needed:
        purpose = "training" if confidence_config is None else "the confidence split"
        raise _too_few(train_dataset, prepared, tokenizer, training_args, "training", purpose, needed)
    log = drops if drops is not None else DropLog()
    # the examples this stage sees (`drop_unrenderable` may have counted them already, before its own drops)
    log.checked = max(log.checked, len(train_dataset) + (len(eval_dataset) if eval_dataset is not None else 0))
    if len(prepared) < len(train_dataset):
        count_truncated(train_dataset, prepared, log)
        logger.warning(
            "%d of %d training examples lose their whole response to truncation at max_length=%s and are not trained "
            "on, e.g. %s",
            len(train_dataset) - len(prepared),
            len(train_dataset),
            training_args.max_length,
            ", ".join(log.locations["truncated"]),
        )
    prepared_eval = None
    if eval_dataset is not None:
        prepared_eval = prepare_like_trl(eval_dataset, tokenizer, training_args, trainer_class, "eval")
        if len(prepared_eval) == 0:
            raise _too_few(eval_dataset, prepared_eval, tokenizer, training_args, "held-out", "evaluation", 1)
        if len(prepared_eval) < len(eval_dataset):
            lost = count_truncated(eval_dataset, prepared_eval, log)
            logger.warning(
                "%d of %d held-out examples lose their whole response to truncation", lost, len(eval_dataset)
            )
    if drops is not None and stop_on_drops:
        drops.check(len(prepared))

    return PreparedData(prepared, prepared_eval, examples=train_dataset, eval_examples=eval_dataset)


def _prompt_tokens(tokenizer, prompt: list[dict]) -> int:
    """The length of a prompt as TRL tokenises it, generation prompt included: a reply keeps a token only with
    `max_length` above it (truncation keeps the start)."""
    return len(_tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"])


def agreeing_max_length(prompt_lengths: list[tuple[int, int]], max_length: int) -> int:
    """The smallest `max_length` >= the given one at which truncation (keeping the start) leaves a reply to the same
    examples under two tokenizers: an example whose prompt is `a` tokens under one and `b` under the other keeps a reply
    under both or neither unless min(a, b) < max_length <= max(a, b)."""
    while True:
        split = [max(a, b) + 1 for a, b in prompt_lengths if min(a, b) < max_length <= max(a, b)]
        if not split:
            return max_length
        max_length = max(split)


def check_same_survivors(
    dataset: Dataset, prepared: Dataset, reference_prepared: Dataset, tokenizer, reference_tokenizer, args
) -> None:
    """Stop when truncation keeps other examples under the reference's tokenizer than under the model's: stage 2
    would meet examples stage 1 never scored. Names how many, and the `max_length` that makes them agree."""
    kept, reference_kept = set(prepared[EXAMPLE_ID]), set(reference_prepared[EXAMPLE_ID])
    if kept == reference_kept:
        return
    only_model, only_reference = kept - reference_kept, reference_kept - kept
    hint = "Raise `max_length`"
    if args.truncation_mode == "keep_start":
        lengths = [(_prompt_tokens(tokenizer, p), _prompt_tokens(reference_tokenizer, p)) for p in dataset["prompt"]]
        hint = f"Set `max_length` to {agreeing_max_length(lengths, args.max_length)} or more (both then keep the same)"
    raise DataError(
        f"truncation at max_length={args.max_length} keeps other examples under the reference model's tokenizer "
        f"({reference_tokenizer.name_or_path}) than under the model's ({tokenizer.name_or_path}): {len(only_model)} "
        f"keep a reply only under the model's and {len(only_reference)} only under the reference's, so stage 2 "
        f"would train examples stage 1 never scored. {hint}, or shorten the longest prompts"
    )


def check_sftmix_data(
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    tokenizer,
    model_args,
    training_args,
    confidence_config,
    trainer_class: type | None = None,
    drops: DropLog | None = None,
) -> PreparedData:
    """`check_training_data` for the SFTMix recipes: the data prepared once for each tokenizer, without the examples
    the chat template(s) refuse to render (counted in `drops`).

    Stage 1 is checked with the reference's tokenizer (it prepares the data the reference scores); with
    `trainer_class` (the SFTMix recipe), stage 2 is checked with `tokenizer` too: the held-out set and the pairs of a
    micro-batch. With a reference on another tokenizer, the examples that keep a reply after truncation must be the
    same under both.
    """

    drops = drops if drops is not None else DropLog()
    train_dataset = drop_unrenderable(train_dataset, tokenizer, drops)
    eval_dataset = drop_unrenderable(eval_dataset, tokenizer, drops, name="eval")
    reference = confidence_config.reference_model_name_or_path
    own_reference = bool(reference) and reference != model_args.model_name_or_path
    reference_tokenizer = tokenizer
    if own_reference:
        reference_args = dataclasses.replace(model_args, model_name_or_path=reference)
        reference_tokenizer = load_tokenizer(
            reference_args,
            training_args.trust_remote_code,
            training_args.chat_template_path,
            training_args.assistant_only_loss,
        )
        train_dataset = drop_unrenderable(train_dataset, reference_tokenizer, drops, count=False)
    stage1 = None
    if trainer_class is None or own_reference:  # stage 1 alone, or stage 1 with the reference's own tokenizer
        stage1 = check_training_data(
            train_dataset,
            reference_tokenizer,
            training_args,
            None,
            confidence_config,
            drops=drops if trainer_class is None else None,  # stage 2's check counts the drops when it runs
            stop_on_drops=False,
            run_trainer=False,
        )
    if trainer_class is not None:  # stage 2 (and stage 1 when both stages tokenise alike)
        stage2 = check_training_data(
            train_dataset,
            tokenizer,
            training_args,
            eval_dataset,
            confidence_config,
            trainer_class=trainer_class,
            drops=drops,
            stop_on_drops=False,
        )
    elif own_reference:  # stage 1 alone: the model's preparation only for the survivors' comparison
        stage2 = PreparedData(prepare_like_trl(train_dataset, tokenizer, training_args))
    else:
        stage2 = PreparedData(stage1.train)
    reference_train = stage1.train if stage1 is not None else stage2.train
    if own_reference:  # before the dropped share: this stop says which max_length fixes both
        check_same_survivors(
            train_dataset, stage2.train, reference_train, tokenizer, reference_tokenizer, training_args
        )
    drops.check(len(stage2.train))
    return PreparedData(stage2.train, stage2.eval, reference_train, train_dataset, eval_dataset)
