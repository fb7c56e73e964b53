"""SFTMix stage 1: per-example confidence from a lightweight reference pass, and the confident/unconfident split.

A LoRA reference adapter (on the same 4-bit base by default) is trained with plain NTP on the training set. At C
evenly spaced snapshots along that run, every example is scored in inference mode by the perplexity of its
response (all the assistant turns of a multi-turn conversation); `confidence = -mean_c PPL_c`. The higher-confidence `confident_fraction` of the examples is D_c, the rest
D_u.

Everything lands in one folder (`confidence_dir`):

    run.json                      what the table is computed from; a rerun with other settings is refused
    snapshots/step-<s>/           reference adapter weights at each snapshot (PEFT format, safetensors)
    scores/step-<s>.parquet       per-snapshot perplexities, written as each scoring pass completes
    confidence.parquet            the table: example_id, ppl_<c>..., confidence, subset, num_response_tokens
    metadata.json                 run.json plus exclusions, times and throughput
    confidence.png                the picture to look at before training

A run killed at any point and started again redoes only what is missing. Writes are atomic (temporary file, then
rename), so a file that exists is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel, gather_object
from datasets import Dataset
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .data import EXAMPLE_ID, has_multi_turn
from .sharded import load_adapter_state, save_adapter_snapshot, scoring_module

logger = logging.getLogger(__name__)

CONFIDENT, UNCONFIDENT = "confident", "unconfident"
TABLE_FILE, METADATA_FILE, RUN_FILE, PLOT_FILE = "confidence.parquet", "metadata.json", "run.json", "confidence.png"


class ConfidenceError(ValueError):
    """A confidence table is missing, broken, or belongs to another dataset or setting."""


@dataclass
class ConfidenceConfig:
    """Settings of the reference pass (SFTMix stage 1). `SFTMixConfig` carries the same fields, so one YAML drives
    both stages."""

    confidence_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the confidence table and its snapshots. Default: `<output_dir>/confidence`. An existing "
            "table there is reused when it matches the data and settings, and refused when it does not."
        },
    )
    reference_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base of the reference adapter. Default: the model being trained (same 4-bit base). A smaller "
            "model of another family works too (the paper scores an 8B target with a 2B reference)."
        },
    )
    reference_epochs: float = field(default=1.0, metadata={"help": "Epochs of NTP training of the reference adapter."})
    reference_learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the reference adapter."})
    reference_batch_size: int = field(default=8, metadata={"help": "Per-device batch size of the reference training."})
    reference_gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Gradient accumulation of the reference training."}
    )
    num_confidence_checkpoints: int = field(
        default=3,
        metadata={"help": "C: adapter snapshots scored along the reference run, evenly spaced, the last at its end."},
    )
    scoring_batch_size: int = field(
        default=32, metadata={"help": "Sequences per scoring batch (forward only, grouped by length)."}
    )
    confident_fraction: float = field(
        default=0.5, metadata={"help": "Share of the examples put in the confident subset (0.5: a median split)."}
    )

    def validate_confidence(self) -> None:
        if not 0 < self.confident_fraction < 1:
            raise ValueError(f"`confident_fraction` must be in (0, 1), got {self.confident_fraction}")
        if self.num_confidence_checkpoints < 1:
            raise ValueError(f"`num_confidence_checkpoints` must be >= 1, got {self.num_confidence_checkpoints}")
        if self.reference_epochs <= 0:
            raise ValueError(f"`reference_epochs` must be > 0, got {self.reference_epochs}")
        if self.scoring_batch_size < 1 or self.reference_batch_size < 1:
            raise ValueError("`scoring_batch_size` and `reference_batch_size` must be >= 1")

    def __post_init__(self):
        self.validate_confidence()

    @classmethod
    def from_args(cls, args) -> ConfidenceConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class ConfidenceTable:
    example_ids: list[str]
    perplexities: np.ndarray  # (N, C) float64, one column per snapshot
    num_response_tokens: np.ndarray  # (N,)
    confident_fraction: float = 0.5
    metadata: dict = field(default_factory=dict)

    @property
    def confidence(self) -> np.ndarray:
        return -self.perplexities.mean(axis=1)

    @property
    def subsets(self) -> list[str]:
        confident = set(split_confidence(self.example_ids, self.confidence, self.confident_fraction)[0])
        return [CONFIDENT if i in confident else UNCONFIDENT for i in self.example_ids]

    def split(self) -> tuple[list[str], list[str]]:
        """(confident ids, unconfident ids)."""
        return split_confidence(self.example_ids, self.confidence, self.confident_fraction)

    def to_arrow(self) -> pa.Table:
        columns = {EXAMPLE_ID: self.example_ids}
        for c in range(self.perplexities.shape[1]):
            columns[f"ppl_{c + 1}"] = self.perplexities[:, c]
        columns.update(confidence=self.confidence, subset=self.subsets, num_response_tokens=self.num_response_tokens)
        return pa.table(columns)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        _atomic_write(directory / METADATA_FILE, json.dumps(self.metadata, indent=2, default=str))
        tmp = directory / (TABLE_FILE + ".tmp")
        pq.write_table(self.to_arrow(), tmp)
        tmp.replace(directory / TABLE_FILE)  # last: a table file means a finished, described table

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ConfidenceTable:
        directory = Path(directory)
        table_path, meta_path = directory / TABLE_FILE, directory / METADATA_FILE
        if not table_path.is_file() or not meta_path.is_file():
            raise ConfidenceError(f"no confidence table in {directory} (expected {TABLE_FILE} and {METADATA_FILE})")
        metadata = json.loads(meta_path.read_text())
        data = pq.read_table(table_path).to_pydict()
        ppl_columns = sorted((k for k in data if k.startswith("ppl_")), key=lambda k: int(k[4:]))
        perplexities = np.stack([np.asarray(data[k], dtype=np.float64) for k in ppl_columns], axis=1)
        if not np.isfinite(perplexities).all():
            raise ConfidenceError(f"{table_path} holds non-finite perplexities; delete {directory} and recompute")
        return cls(
            example_ids=list(data[EXAMPLE_ID]),
            perplexities=perplexities,
            num_response_tokens=np.asarray(data["num_response_tokens"]),
            confident_fraction=metadata["config"]["confident_fraction"],
            metadata=metadata,
        )


def split_confidence(
    example_ids: list[str], confidence: np.ndarray, confident_fraction: float = 0.5
) -> tuple[list[str], list[str]]:
    """Split at the `confident_fraction` quantile: the floor(fraction x N) most confident examples are confident.

    Ties are broken by example id (ascending), so the split is the same on every machine and run.
    """
    if not 0 < confident_fraction < 1:
        raise ConfidenceError(f"`confident_fraction` must be in (0, 1), got {confident_fraction}")
    n = len(example_ids)
    if n < 2:
        raise ConfidenceError(f"a confidence split needs at least 2 examples, got {n}")
    order = sorted(range(n), key=lambda i: (-float(confidence[i]), example_ids[i]))
    num_confident = min(max(int(confident_fraction * n), 1), n - 1)
    return [example_ids[i] for i in order[:num_confident]], [example_ids[i] for i in order[num_confident:]]


def dataset_fingerprint(example_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(example_ids)).encode()).hexdigest()[:24]


# What makes a table apply to a training run at all (the data, and which tokens are scored: the labelling settings
# and the assistant turns); the reference settings only matter when recomputing
LABEL_KEYS = ("truncation_mode", "completion_only_loss", "assistant_only_loss")
DATA_KEYS = (
    "dataset_fingerprint",
    "num_examples",
    "tokenizer",
    "chat_template_sha256",
    "max_length",
    "scored_turns",
    *LABEL_KEYS,
)
# Tables written before multi-turn conversations trained every assistant turn scored each example's last turn
METADATA_DEFAULTS = {"scored_turns": "last"}


def check_metadata(expected: dict, found: dict, where: str | os.PathLike, keys: tuple[str, ...] | None = None) -> None:
    """Refuse a table (or a half-finished run) computed from other data or settings; say what differs."""
    keys = sorted(set(expected) | set(found)) if keys is None else keys
    unrecorded = [k for k in LABEL_KEYS if k in keys and k in expected and k not in found]
    if unrecorded:  # a table from before these settings were recorded: which tokens it scored is unknown
        raise ConfidenceError(
            f"the confidence table in {where} does not record {', '.join(unrecorded)} (an older sftmix-trl wrote "
            "it): delete that folder to recompute it, or set `confidence_dir` to another folder."
        )
    diffs = [
        f"{k}: expected {expected.get(k)!r}, found {found.get(k)!r}" for k in keys if expected.get(k) != found.get(k)
    ]
    if diffs:
        raise ConfidenceError(
            f"the confidence table in {where} belongs to another dataset or setting ({'; '.join(diffs)}). "
            "Delete that folder to recompute it, or set `confidence_dir` to another folder."
        )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ScoringStats:
    seconds: float = 0.0
    tokens: int = 0  # real (non-padding) tokens through the model
    padded_tokens: int = 0  # batch slots, padding included

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def length_grouped_batches(lengths: list[int], batch_size: int, max_padding: float = 0.1) -> list[list[int]]:
    """Rows sorted by length (longest first, ties by row), cut into batches of at most `batch_size` whose every
    row is at least (1 - max_padding) of the batch's longest: padding stays under `max_padding` of the slots."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for row in order:
        if current and (len(current) == batch_size or lengths[row] < (1 - max_padding) * lengths[current[0]]):
            batches.append(current)
            current = []
        current.append(row)
    return batches + [current] if current else batches


def _response_log_probs(
    model, input_ids, attention_mask, labels, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) at each response-predicting position (B, T-1), zero elsewhere, and that mask.

    One forward of `model` itself, so that a sharding wrapper (FSDP, DeepSpeed) gathers the parameters and casts as
    it does in training. A hook on the backbone takes the final hidden states and runs the LM head on the response
    positions only, in chunks, inside that forward (while the wrapper holds the head whole): prompts and padding cost
    no vocabulary projection, and the full (B, T, V) logits never exist (the model's own head sees 1 position).
    """
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    inner = extract_model_from_parallel(model)
    causal_lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    targets = labels[:, 1:]
    mask = targets != -100  # (B, T-1)
    found = {}

    def score(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        selected, wanted = hidden[:, :-1][mask], targets[mask]  # (M, D), (M,)
        head = causal_lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # a head FSDP2 keeps sharded inside the forward: read it whole
            weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
        chunks = []
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3: the head is a 0-size shard outside its own forward
            for start in range(0, len(wanted), chunk_size):
                logits = torch.nn.functional.linear(selected[start : start + chunk_size], weight, bias)
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                chunks.append(logits.log_softmax(-1).gather(1, wanted[start : start + chunk_size, None]).squeeze(1))
        log_probs = torch.zeros(mask.shape, dtype=torch.float64, device=hidden.device)
        log_probs[mask] = torch.cat(chunks).double() if chunks else log_probs.new_zeros(0)
        found["log_probs"] = log_probs

    handle = causal_lm.base_model.register_forward_hook(score)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return found["log_probs"], mask


@torch.no_grad()
def score_perplexities(
    model, dataset: Dataset, batch_size: int, pad_token_id: int, desc: str = "scoring"
) -> tuple[np.ndarray, np.ndarray, ScoringStats]:
    """Response perplexity of every row of a prepared dataset (`input_ids`, `labels`), sharded over all processes.

    Batches are grouped by length and dealt round-robin to the processes; the results are gathered so that every
    process returns all N perplexities (float64) and response-token counts, each row scored exactly once. `model` may
    be a sharding wrapper (FSDP, DeepSpeed): every process then runs the same number of forwards, those short of
    batches scoring a dummy one whose result is dropped, so that the wrapper's collectives line up.
    """
    state = PartialState()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    every_batch = length_grouped_batches(lengths, batch_size)
    batches = every_batch[state.process_index :: state.num_processes]
    num_forwards = math.ceil(len(every_batch) / state.num_processes)
    dummy = [every_batch[-1][0]] if every_batch else []  # the shortest row: padding forwards, never counted
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    stats, results = ScoringStats(), []
    start = time.perf_counter()
    for index in tqdm(range(num_forwards), desc=desc, disable=not state.is_local_main_process):
        real = index < len(batches)
        rows = batches[index] if real else dummy
        examples = dataset.select(rows)
        width = max(lengths[i] for i in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (ids, lab) in enumerate(zip(examples["input_ids"], examples["labels"])):
            input_ids[j, : len(ids)], labels[j, : len(lab)], attention_mask[j, : len(ids)] = (
                torch.tensor(ids),
                torch.tensor(lab),
                1,
            )
        log_probs, mask = _response_log_probs(
            model, input_ids.to(device), attention_mask.to(device), labels.to(device)
        )
        if not real:
            continue
        counts = mask.sum(1)
        mean_nll = -(log_probs.sum(1) / counts.clamp(min=1))
        results += list(zip(rows, torch.exp(mean_nll).tolist(), counts.tolist()))
        stats.tokens += int(attention_mask.sum())
        stats.padded_tokens += attention_mask.numel()
    stats.seconds = time.perf_counter() - start
    model.train(was_training)

    gathered = gather_object(results) if state.num_processes > 1 else results
    perplexities, counts = np.full(len(lengths), np.nan), np.zeros(len(lengths), dtype=np.int64)
    seen = np.zeros(len(lengths), dtype=np.int64)
    for row, ppl, count in gathered:
        perplexities[row], counts[row] = ppl, count
        seen[row] += 1
    if not (seen == 1).all():
        raise RuntimeError(f"scoring gathered {int(seen.sum())} results for {len(lengths)} rows: a shard went missing")
    if state.num_processes > 1:  # each process timed its own shard; report the slowest and the total work
        all_stats = gather_object([(stats.seconds, stats.tokens, stats.padded_tokens)])
        stats = ScoringStats(max(s[0] for s in all_stats), sum(s[1] for s in all_stats), sum(s[2] for s in all_stats))
    return perplexities, counts, stats


# ----------------------------------------------------------------------------------------------------------------------
# The reference pass


def snapshot_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """C evenly spaced optimizer steps, the last at the end of the run."""
    if total_steps < num_checkpoints:
        raise ConfidenceError(
            f"the reference run has {total_steps} optimizer steps, fewer than num_confidence_checkpoints="
            f"{num_checkpoints}; lower the reference batch size or the number of checkpoints"
        )
    return [math.ceil(c * total_steps / num_checkpoints) for c in range(1, num_checkpoints + 1)]


class _SnapshotCallback(TrainerCallback):
    """Saves the reference adapter (weights only) at the snapshot steps: gathered from every process through the
    trainer's wrapped model (FSDP and ZeRO-3 hold only shards), written by the main process."""

    def __init__(self, directory: Path, num_checkpoints: int):
        self.directory, self.num_checkpoints, self.steps = directory, num_checkpoints, []
        self.trainer = None  # set once the trainer exists

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = snapshot_steps(state.max_steps, self.num_checkpoints)
        if state.is_world_process_zero:
            _atomic_write(self.directory / "steps.json", json.dumps(self.steps))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in self.steps:
            return
        target = self.directory / f"step-{state.global_step}"
        staging = target.with_name(target.name + ".tmp")
        if state.is_world_process_zero:
            shutil.rmtree(staging, ignore_errors=True)
        save_adapter_snapshot(self.trainer.model_wrapped, staging, state.is_world_process_zero)  # on every process
        if state.is_world_process_zero:
            _check_snapshot(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)


def _check_snapshot(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a snapshot; an empty one (an ungathered shard saved) is refused, never scored."""
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    weights = load_file(path) if path.is_file() else {}
    if not weights or any(t.numel() == 0 for t in weights.values()):
        raise ConfidenceError(
            f"the reference snapshot {path} is missing, empty or holds 0-size tensors; delete "
            f"{directory.parent.parent} and recompute"
        )
    return weights


def _scoring_model(trainer):
    """The model to score through: the trainer's wrapped model (FSDP and DeepSpeed gather the parameters in its
    forward), prepared here the way `Trainer.evaluate` does when no training ran in this process (all snapshots were
    found); without DDP, which only synchronises gradients."""
    model = trainer.model_wrapped
    if (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled) and not trainer.accelerator._models:
        if trainer.is_deepspeed_enabled and trainer.deepspeed is None:
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(trainer, num_training_steps=0, inference=True)
        model = trainer.accelerator.prepare(model)
        if trainer.is_fsdp_enabled:
            trainer.model = model
        trainer.model_wrapped = model
    return scoring_module(model)


def _reference_args(training_args, config: ConfidenceConfig, output_dir: Path):
    """The reference run's `SFTConfig`: the user's settings with the reference's own schedule and no checkpoints."""
    from .configs import SFTConfig

    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(SFTConfig) if f.init}
    values.update(
        output_dir=str(output_dir / "reference"),
        num_train_epochs=config.reference_epochs,
        max_steps=-1,
        learning_rate=config.reference_learning_rate,
        per_device_train_batch_size=config.reference_batch_size,
        gradient_accumulation_steps=config.reference_gradient_accumulation_steps,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
        resume_from_checkpoint=None,
        run_name=f"{training_args.run_name or 'sftmix'}-reference",
    )
    return SFTConfig(**values)


def scores_all_turns(train_dataset: Dataset, training_args) -> bool:
    """Whether the response tokens are every assistant turn (TRL's `assistant_only_loss`, on for multi-turn
    conversations) rather than each example's completion."""
    return bool(getattr(training_args, "assistant_only_loss", False)) or has_multi_turn(train_dataset)


def expected_metadata(train_dataset: Dataset, model_args, training_args, config: ConfidenceConfig, tokenizer) -> dict:
    """What a confidence table depends on. Anything here that differs makes a stored table inapplicable.

    `scored_turns` is "all" when the perplexity runs over every assistant turn of the conversations, "last" when it
    runs over each example's completion (its only or last assistant turn).
    """
    reference = config.reference_model_name_or_path or model_args.model_name_or_path
    # The template's content as rendered (a `chat_template_path` file edited in place must not reuse the table)
    chat_template = tokenizer.chat_template or ""
    chat_template = json.dumps(chat_template, sort_keys=True) if isinstance(chat_template, dict) else chat_template
    return {
        "dataset_fingerprint": dataset_fingerprint(list(train_dataset[EXAMPLE_ID])),
        "num_examples": len(train_dataset),
        "model": model_args.model_name_or_path,
        "reference_model": reference,
        "tokenizer": f"{tokenizer.name_or_path} (vocab {len(tokenizer)})",
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest()[:16],
        "max_length": training_args.max_length,
        "scored_turns": "all" if scores_all_turns(train_dataset, training_args) else "last",
        **{k: getattr(training_args, k, None) for k in LABEL_KEYS},
        "load_in_4bit": model_args.load_in_4bit,
        "lora": f"r={model_args.lora_r} alpha={model_args.lora_alpha} targets={model_args.lora_target_modules}",
        "seed": training_args.seed,
        "config": {
            k: v for k, v in dataclasses.asdict(config).items() if k not in ("confidence_dir", "scoring_batch_size")
        },
    }


def _versions() -> dict:
    import peft
    import transformers
    import trl

    from . import __version__

    return {
        "sftmix_trl": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }


def compute_confidence(
    train_dataset: Dataset,
    model_args,
    training_args,
    config: ConfidenceConfig,
    confidence_dir: str | os.PathLike,
    must_exist: bool = False,
) -> ConfidenceTable:
    """Run (or resume, or reuse) the reference pass and return the confidence table.

    Args:
        train_dataset: normalised training data with an `example_id` column (`sftmix_trl.data.load_datasets`).
        model_args: `ModelArguments` of the model being trained; the reference uses its base unless
            `config.reference_model_name_or_path` names another.
        training_args: the run's `SFTConfig`/`SFTMixConfig` (precision, max length, seed, logging are shared).
        config: the reference pass settings.
        confidence_dir: folder of the artifact (see the module docstring).
        must_exist: only load (and check) a finished table; never train a reference.
    """
    from .model import load_model, load_tokenizer, lora_config
    from .padding_free import TruncatingSFTTrainer
    from .plots import plot_confidence

    state = PartialState()
    directory = Path(confidence_dir)
    if len(train_dataset) < 2:
        raise ConfidenceError(f"the confidence split needs at least 2 training examples, got {len(train_dataset)}")
    reference_args = dataclasses.replace(
        model_args, model_name_or_path=config.reference_model_name_or_path or model_args.model_name_or_path
    )
    all_turns = scores_all_turns(train_dataset, training_args)
    tokenizer = load_tokenizer(
        reference_args,
        training_args.trust_remote_code,
        training_args.chat_template_path,
        assistant_only_loss=all_turns,
    )
    expected = expected_metadata(train_dataset, model_args, training_args, config, tokenizer)

    if (directory / TABLE_FILE).is_file():
        table = ConfidenceTable.load(directory)
        # A table named explicitly (must_exist) only has to fit the data; the run's own folder must fit everything
        found = {**METADATA_DEFAULTS, **table.metadata["run"]}
        check_metadata(expected, found, directory, DATA_KEYS if must_exist else None)
        if table.confident_fraction != config.confident_fraction:  # only the cut depends on it: this run's applies
            logger.info(
                "splitting the confidence table at this run's confident_fraction=%s (it was computed with %s)",
                config.confident_fraction,
                table.confident_fraction,
            )
            table.confident_fraction = config.confident_fraction
            confident, unconfident = table.split()
            table.metadata = {**table.metadata, "num_confident": len(confident), "num_unconfident": len(unconfident)}
        logger.info("reusing the confidence table in %s", directory)
        return table
    if must_exist:
        raise ConfidenceError(f"no confidence table in {directory} (expected {directory / TABLE_FILE})")
    if (directory / RUN_FILE).is_file():
        check_metadata(expected, {**METADATA_DEFAULTS, **json.loads((directory / RUN_FILE).read_text())}, directory)
    state.wait_for_everyone()
    if state.is_main_process:
        _atomic_write(directory / RUN_FILE, json.dumps(expected, indent=2, default=str))

    model = load_model(reference_args, training_args.trust_remote_code)
    snapshots = _SnapshotCallback(directory / "snapshots", config.num_confidence_checkpoints)
    reference_training_args = _reference_args(training_args, config, directory)
    reference_training_args.assistant_only_loss = all_turns
    trainer = TruncatingSFTTrainer(  # SFTTrainer; with padding_free, truncated to max_length as the padded path is
        model=model,
        args=reference_training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(reference_args),
        callbacks=[snapshots],
    )
    snapshots.trainer = trainer
    prepared = trainer.train_dataset
    if len(prepared) < 2:
        raise ConfidenceError(
            f"{len(prepared)} of {len(train_dataset)} training examples keep a response token within max_length="
            f"{training_args.max_length}; the confidence split needs at least 2: raise `max_length`"
        )
    steps_file = directory / "snapshots" / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else []
    times = {}
    if not steps or not all((directory / "snapshots" / f"step-{s}").is_dir() for s in steps):
        start = time.perf_counter()
        trainer.train()  # a reference run cut short is redone whole: its snapshots must come from one run
        times["reference_training_seconds"] = time.perf_counter() - start
        steps = snapshots.steps
    state.wait_for_everyone()

    model = _scoring_model(trainer)
    columns, scoring = [], []
    for c, step in enumerate(steps, start=1):
        scores_path = directory / "scores" / f"step-{step}.parquet"
        if scores_path.is_file():
            logger.info("snapshot %d/%d (step %d): scores found, skipped", c, len(steps), step)
            columns.append(np.asarray(pq.read_table(scores_path)["perplexity"].to_numpy(), dtype=np.float64))
            continue
        weights = _check_snapshot(directory / "snapshots" / f"step-{step}")
        try:
            load_adapter_state(model, weights)  # on every process: a collective under FSDP and ZeRO-3
        except ValueError as error:
            raise ConfidenceError(f"snapshot step {step} in {directory}: {error}; delete that folder") from None
        ppl, counts, stats = score_perplexities(
            model,
            prepared,
            config.scoring_batch_size,
            tokenizer.pad_token_id,
            f"scoring snapshot {c}/{len(steps)}",
        )
        bad = ~np.isfinite(ppl)
        if bad.any():
            ids = [prepared[int(i)][EXAMPLE_ID] for i in np.flatnonzero(bad)[:5]]
            raise ConfidenceError(f"non-finite perplexity at snapshot step {step} for examples {ids}; not written")
        scoring.append(
            {
                "step": step,
                "seconds": stats.seconds,
                "tokens": stats.tokens,
                "tokens_per_second": stats.tokens_per_second,
                "padding_fraction": stats.padding_fraction,
            }
        )
        if state.is_main_process:
            scores_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = scores_path.with_name(scores_path.name + ".tmp")
            pq.write_table(pa.table({EXAMPLE_ID: prepared[EXAMPLE_ID], "perplexity": ppl, "tokens": counts}), tmp)
            tmp.replace(scores_path)
        state.wait_for_everyone()
        columns.append(ppl)

    num_tokens = np.array([sum(1 for t in lab[1:] if t != -100) for lab in prepared["labels"]])
    excluded = sorted(set(train_dataset[EXAMPLE_ID]) - set(prepared[EXAMPLE_ID]))
    if excluded:
        logger.warning(
            "%d examples have no response token after truncation to max_length=%s and get no score",
            len(excluded),
            training_args.max_length,
        )
    table = ConfidenceTable(
        example_ids=list(prepared[EXAMPLE_ID]),
        perplexities=np.stack(columns, axis=1),
        num_response_tokens=num_tokens,
        confident_fraction=config.confident_fraction,
    )
    confident, unconfident = table.split()
    table.metadata = {
        "run": expected,
        "config": dataclasses.asdict(config),
        "snapshot_steps": steps,
        "num_scored": len(table.example_ids),
        "num_excluded": len(excluded),
        "excluded_example_ids": excluded,
        "num_confident": len(confident),
        "num_unconfident": len(unconfident),
        "scoring": scoring,
        **times,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }
    if state.is_main_process:
        table.save(directory)
        plot_confidence(table, directory / PLOT_FILE)
        logger.info(
            "confidence table written to %s: %d confident, %d unconfident, %d excluded",
            directory,
            len(confident),
            len(unconfident),
            len(excluded),
        )
    state.wait_for_everyone()
    snapshots.trainer = None
    del trainer, model
    return table
