"""The data prepared once, as TRL prepares it, and checked before anything is written to `output_dir`.

TRL prepares the data inside `SFTTrainer.__init__` (chat template, completion mask, truncation at `max_length`, and
the silent drop of examples that truncation leaves without a response token); the SFTMix recipes write the
confidence folder before that. So `prepare.prepare_run_data` runs these functions right after loading the data and
the tokenizer: TRL's own preparation of each split (no model needed), every count that would fail later (no example
left, too few for a confidence split, examples that keep a reply under one tokenizer only) turned into one
`DataError` line. The recipes hand the prepared sets to the trainers, which then skip their own preparation
(`TruncatingSFTTrainer` recognises a prepared dataset): the data is tokenised once per tokenizer.

Records that cannot train are dropped and counted (`drops.DropLog`): those a chat template refuses to render
(`drop_unrenderable`, with the template's own message) and those that truncation leaves without a reply
(`prepare_split`). With a reference model on another tokenizer, the examples that survive truncation must be the
same under both tokenizers (`check_same_survivors`: stage 2 trains only examples stage 1 scored).

These functions take datasets and return datasets, or raise: they do not depend on which command calls them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from datasets import Dataset
from jinja2.exceptions import TemplateError
from tqdm.auto import tqdm
from trl import SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import _tokenize

from sftmix_trl.data.drops import SHOWN_LOCATIONS, DropLog
from sftmix_trl.data.load import EXAMPLE_ID, DataError

logger = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "training", "eval": "held-out"}  # how the messages name a split


@dataclass
class PreparedData:
    """The training data of a run, as each trainer trains on it (tokenised, labelled, truncated, `example_id` kept),
    and the normalised examples they come from (without those a chat template refuses to render)."""

    train: Dataset
    eval: Dataset | None = None
    reference_train: Dataset | None = None  # as the stage-1 reference trains on and scores it (its tokenizer)
    examples: Dataset | None = None  # the normalised training examples kept: what the confidence table is keyed on
    eval_examples: Dataset | None = None


@dataclass(frozen=True)
class Need:
    """How many examples of a split must keep a reply after truncation, and what for (the too-few error says it)."""

    count: int
    purpose: str


TRAINING = Need(1, "training")
CONFIDENCE_SPLIT = Need(2, "the confidence split")  # a confident and an unconfident half, each of one example at least
EVALUATION = Need(1, "evaluation")


def refuse_eval_strategy_without_eval(args, eval_dataset: Dataset | None) -> None:
    """Stop when the run's trainer evaluates (`eval_strategy`) but there is no held-out set: transformers refuses it
    only when the trainer is built, after the whole of stage 1 in an SFTMix run."""
    if eval_dataset is None and str(getattr(args.eval_strategy, "value", "no")) != "no":
        raise DataError(
            f"eval_strategy={args.eval_strategy.value!r} needs held-out data: set `eval_split_size` (a fraction or a "
            "count), or `eval_strategy: no`"
        )


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
    dataset: Dataset | None, tokenizers: Sequence, drops: DropLog, name: str = "train"
) -> Dataset | None:
    """`dataset` without the examples a chat template of `tokenizers` refuses to render (its `raise_exception`, e.g.
    "roles must alternate" or "system role not supported"), each counted in `drops` with the template's own message.
    Every example of `dataset` enters the dropped share once, however many tokenizers read it. The caller logs the
    drops once every split is rendered (`drops.log`): one line, not a growing count per split."""
    if dataset is None:
        return None
    drops.checked += len(dataset)
    keep = list(range(len(dataset)))
    for tokenizer in tokenizers:
        if "raise_exception" not in str(tokenizer.chat_template):
            continue  # a template that never refuses (most ChatML ones): skip rendering every example
        rows = dataset.select(keep)
        renders = zip(keep, rows["prompt"], rows["completion"], rows[EXAMPLE_ID])
        kept_here = []
        for index, prompt, completion, example_id in tqdm(
            renders, total=len(keep), desc=f"Rendering {name} with the chat template", disable=len(keep) < 20000
        ):
            try:
                tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            except TemplateError as error:
                message = str(error.message or error)
                drops.add("template_refused", drops.location(example_id), message, stage="check", key=example_id)
                continue
            kept_here.append(index)
        keep = kept_here
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def prepare_split(
    dataset: Dataset, tokenizer, args, trainer_class: type, name: str, drops: DropLog, need: Need
) -> Dataset:
    """`dataset` as `trainer_class` prepares it for the split `name` (`prepare_like_trl`), the examples that
    truncation leaves without a reply counted in `drops` and logged. Stops when fewer than `need.count` keep one,
    naming the `max_length` that keeps them."""
    prepared = prepare_like_trl(dataset, tokenizer, args, trainer_class, name)
    kept = set(prepared[EXAMPLE_ID]) if EXAMPLE_ID in prepared.column_names else set()
    lost = [index for index, example_id in enumerate(dataset[EXAMPLE_ID]) if example_id not in kept]
    if len(prepared) < need.count:
        raise _too_few(dataset, lost, len(prepared), tokenizer, args, name, need)
    lost_ids = dataset.select(lost)[EXAMPLE_ID]
    for example_id in lost_ids:
        drops.add("truncated", drops.location(example_id), stage="check", key=example_id)
    if lost:
        logger.warning(
            "%d of %d %s examples lose their whole response to truncation at max_length=%s under the tokenizer of %s "
            "and are left out, e.g. %s",
            len(lost),
            len(dataset),
            SPLIT_NAMES[name],
            args.max_length,
            tokenizer.name_or_path,
            ", ".join(drops.location(example_id) for example_id in lost_ids[:SHOWN_LOCATIONS]),
        )
    return prepared


def _too_few(dataset: Dataset, lost: list[int], left: int, tokenizer, args, name: str, need: Need) -> DataError:
    """The error for too few examples left with a response token: how many truncation emptied, what to change."""
    what = SPLIT_NAMES[name]
    if not lost:
        return DataError(f"{need.purpose} needs at least {need.count} {what} examples, got {len(dataset)}")
    hint = "Raise `max_length`"
    if "prompt" in dataset.column_names:
        # The prompt as TRL tokenises it (generation prompt included): a response token needs max_length above it
        longest = max(_prompt_tokens(tokenizer, prompt) for prompt in dataset.select(lost)["prompt"])
        hint += f" above {longest} (the longest of their prompts, in tokens)"
    return DataError(
        f"{len(lost)} of the {len(dataset)} {what} examples lose their whole response to truncation at "
        f"max_length={args.max_length} (truncation_mode={args.truncation_mode}), leaving {left}; "
        f"{need.purpose} needs at least {need.count}. {hint} or shorten those prompts"
    )


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
