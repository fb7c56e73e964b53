"""Training data: sources, formats and mixtures, normalised to TRL's conversational prompt/completion form.

Every example ends up as ``{"prompt": [messages], "completion": [messages], "example_id": str}``. TRL renders both
with the tokenizer's chat template and trains on the completion tokens only. A multi-turn conversation (``messages``
with several assistant turns) is split at its first assistant turn: the completion holds every later message, and
TRL's ``assistant_only_loss`` (with a template whose ``{% generation %}`` markers delimit the assistant replies, see
``chat_templates``) trains the assistant turns in it and not the user turns between them. With
``assistant_turns="last"`` the conversation is split at its last assistant turn instead: earlier turns are context. ``example_id`` is a
fingerprint of the normalised example: the confidence stage keys its scores by it, because TRL drops examples that
truncation leaves without a response token, so row positions are not stable between stages.

ShareGPT files (``conversations`` of ``{from, value}`` turns) are read as ``messages`` with their role names mapped
(``ROLE_MAP`` plus the user's ``role_map``). Records that cannot train (no reply, empty replies, ...) and repeats of
an earlier record (same prompt and completion: one id must mean one example) are dropped and counted per reason in a
``drops.DropLog``, never silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, concatenate_datasets, load_dataset

from sftmix_trl.data.drops import DEFAULT_MAX_DROPPED_FRACTION, DropLog
from sftmix_trl.errors import DataError

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt")
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
}
EXAMPLE_ID = "example_id"
ASSISTANT_TURNS = ("all", "last")
ROLES = ("system", "user", "assistant", "tool")
# The role names of ShareGPT exports and other chat files, as axolotl and LLaMA-Factory read them; `role_map` adds more
ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "tool": "tool",
}


class Unusable(Exception):
    """A record that cannot train; `reason` is one of `drops.REASONS`. Dropped and counted, never raised to the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DataSource:
    path: str
    fraction: float = 1.0
    format: str = "auto"
    split: str = "train"
    name: str | None = None
    role_map: dict[str, str] | None = None  # extra role names of this source's conversations -> user/assistant/...

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise DataError(f"{self.path}: `fraction` must be in (0, 1], got {self.fraction}")
        if self.format not in ("auto", *FORMATS):
            raise DataError(f"{self.path}: unknown format {self.format!r}; expected one of auto, {', '.join(FORMATS)}")
        self.roles = resolve_role_map(self.role_map, self.path)


def resolve_role_map(role_map: dict[str, str] | None, where: str = "role_map") -> dict[str, str]:
    """The default role names plus the user's (names compared in lower case)."""
    if role_map is not None and not isinstance(role_map, dict):
        raise DataError(f"{where}: `role_map` must be a mapping {{name: role}}, got {type(role_map).__name__}")
    roles = dict(ROLE_MAP)
    for name, role in (role_map or {}).items():
        if role not in ROLES:
            raise DataError(f"{where}: `role_map` maps {name!r} to {role!r}; a role must be one of {', '.join(ROLES)}")
        roles[str(name).lower()] = role
    return roles


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def _is_local(path: str) -> bool:
    return os.path.exists(path) or path.endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~"))


def _encoding_error(path: Path, data: bytes, error: UnicodeDecodeError, line_number: int | None = None) -> DataError:
    """One line naming the file, the line and byte offset, and the bytes that are not UTF-8."""
    line_number = line_number or data.count(b"\n", 0, error.start) + 1
    bad = data[error.start : error.end].hex(" ")
    return DataError(
        f"{path}, line {line_number} (byte {error.start}): not valid UTF-8 (byte(s) {bad}: {error.reason}); "
        "save the file as UTF-8"
    )


def _read_json_records(path: Path) -> list[tuple[str, dict]]:
    """Records of a .json (array) or .jsonl file, each with a location string for error messages."""
    data = path.read_bytes()  # decoded here, so that a byte that is not UTF-8 is reported with its line
    if path.suffix == ".jsonl":
        records, offset = [], 0
        for line_number, raw in enumerate(data.splitlines(keepends=True), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                error.start, error.end = offset + error.start, offset + error.end  # offsets in the whole file
                raise _encoding_error(path, data, error, line_number) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {line_number}: malformed JSON ({error.msg})") from None
            records.append((f"{path}, line {line_number}", record))
        return records
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _encoding_error(path, data, error) from None
    if not text.strip():
        return []  # an empty file: reported as an empty dataset, not as malformed JSON
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: malformed JSON at line {error.lineno} ({error.msg})") from None
    if isinstance(content, dict) and len(content) == 1 and isinstance(next(iter(content.values())), list):
        content = next(iter(content.values()))  # {"train": [...]} or {"data": [...]}
    if not isinstance(content, list):
        raise DataError(f"{path}: expected a JSON array of records (or JSON lines in a .jsonl file)")
    return [(f"{path}, record {index}", record) for index, record in enumerate(content)]


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no .json, .jsonl or .parquet file")
        return files
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type; use .json, .jsonl or .parquet")
    return [path]


def _dataset_records(dataset: Dataset, name: str) -> list[tuple[str, dict]]:
    """The rows of a Parquet-backed dataset (a local file or the Hub), with a location each. Arrow stores text as
    UTF-8 without always checking it: a row that does not decode is named, with its bytes, in one line."""
    records = []
    try:
        for index, record in enumerate(dataset):
            records.append((f"{name}, record {index}", record))
    except UnicodeDecodeError as error:
        bad = len(records)  # rows decode in batches: find the first one that fails
        while bad < len(dataset) - 1:
            try:
                dataset[bad]
            except UnicodeDecodeError:
                break
            bad += 1
        bytes_ = error.object[error.start : error.end].hex(" ")
        raise DataError(
            f"{name}, record {bad}: a text field is not valid UTF-8 (byte(s) {bytes_}: {error.reason})"
        ) from None
    return records


def read_source(source: DataSource) -> list[tuple[str, dict]]:
    """All records of a source, as (location, record) pairs."""
    if not _is_local(source.path):
        try:
            dataset = load_dataset(source.path, name=source.name, split=source.split)
        except Exception as error:  # offline, unknown id, gated: say which source failed
            raise DataError(f"could not load Hub dataset {source.path!r} (split {source.split!r}): {error}") from None
        return _dataset_records(dataset, f"{source.path}[{source.split}]")
    records = []
    for path in _local_files(Path(os.path.expanduser(source.path))):
        if path.suffix == ".parquet":
            try:
                dataset = Dataset.from_parquet(str(path))
            except (UnicodeDecodeError, pa.ArrowException) as error:  # Parquet strings are UTF-8 by definition
                raise DataError(f"{path}: cannot read this Parquet file ({type(error).__name__}: {error})") from None
            records += _dataset_records(dataset, str(path))
        else:
            records += _read_json_records(path)
    return records


# ----------------------------------------------------------------------------------------------------------------------
# Formats


def detect_format(record: dict, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise DataError(
        f"{where}: cannot tell the format from its fields {sorted(record)}; expected 'instruction'/'output' "
        "(alpaca), 'prompt'/'completion', 'messages' or 'conversations' (ShareGPT)"
    )


def _as_messages(value: Any, role: str, where: str, field_name: str, roles: dict[str, str] = ROLE_MAP) -> list[dict]:
    """Chat messages from a string (one message of `role`) or a list of `{role, content}` or ShareGPT
    `{from, value}` turns, each role name mapped through `roles`. A turn whose text is null is an empty turn."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field_name}' must be a string or a list of {{role, content}} messages")
    messages = []
    for index, turn in enumerate(value):
        keys = ("from", "value") if isinstance(turn, dict) and "from" in turn else ("role", "content")
        name, text = (turn.get(keys[0]), turn.get(keys[1])) if isinstance(turn, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(text, str | None):
            raise DataError(
                f"{where}: field '{field_name}' must be a list of {{role, content}} messages or ShareGPT "
                f"{{from, value}} turns; turn {index} is {json.dumps(turn, ensure_ascii=False)[:120]}"
            )
        mapped = roles.get(name.lower())
        if mapped is None:
            raise DataError(
                f"{where}: turn {index} has the role {name!r}, which is not one of {', '.join(sorted(roles))}; "
                f"map it with `role_map` (e.g. role_map: {{{name}: assistant}})"
            )
        messages.append({"role": mapped, "content": text or ""})
    return messages


def split_conversation(messages: list[dict], assistant_turns: str = "all") -> tuple[list[dict], list[dict]]:
    """A conversation as (prompt, completion), or `Unusable` with the reason it cannot train.

    Replies are the assistant turns after the first prompt (a user or tool turn): leading assistant turns (a
    greeting, or a long chat split in the middle) stay context. Empty replies before the first and after the last
    non-empty one are context / dropped. With `assistant_turns="all"` the completion starts at the first non-empty
    reply (TRL's `assistant_only_loss` trains every reply in it), with `"last"` at the last one. Messages after the
    last reply are dropped: nothing would be trained on them. Consecutive turns of one role are kept as they are:
    the template renders them (or refuses to, and the record is dropped then).
    """
    if not messages:
        raise Unusable("empty_conversation")
    if all(m["role"] == "system" for m in messages):
        raise Unusable("system_only")
    first_prompt = next((i for i, m in enumerate(messages) if m["role"] not in ("system", "assistant")), None)
    replies = [
        i for i, m in enumerate(messages) if m["role"] == "assistant" and first_prompt is not None and i > first_prompt
    ]
    if not replies:
        raise Unusable("no_reply")
    said = [i for i in replies if messages[i]["content"].strip()]
    if not said:
        raise Unusable("empty_reply")
    cut = said[0] if assistant_turns == "all" else said[-1]
    return messages[:cut], messages[cut : said[-1] + 1]


def normalise(
    record: dict, fmt: str, where: str, assistant_turns: str = "all", roles: dict[str, str] = ROLE_MAP
) -> dict:
    """One record in TRL's conversational prompt/completion form.

    Raises `DataError` for a record the user must fix (a missing field, a wrong type, an unknown role) and
    `Unusable` for one that cannot train (no reply, empty replies, ...): the loader drops and counts those.
    A `messages`/ShareGPT conversation is cut as `split_conversation` says. A ShareGPT record's top-level `system`
    string becomes its first message when the conversation has none.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in REQUIRED_FIELDS[fmt]:
        if record.get(name) is None:
            raise DataError(f"{where}: missing field '{name}' (required by the {fmt} format)")
    if fmt == "alpaca":
        for name in ("instruction", "input", "output"):
            if record.get(name) is not None and not isinstance(record[name], str):
                raise DataError(f"{where}: field '{name}' must be a string, got {type(record[name]).__name__}")
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        prompt, completion = [{"role": "user", "content": user}], [{"role": "assistant", "content": record["output"]}]
    elif fmt == "prompt_completion":
        prompt = _as_messages(record["prompt"], "user", where, "prompt", roles)
        completion = _as_messages(record["completion"], "assistant", where, "completion", roles)
    else:
        field_name = REQUIRED_FIELDS[fmt][0]
        messages = _as_messages(record[field_name], "user", where, field_name, roles)
        system = record.get("system")
        if fmt == "sharegpt" and isinstance(system, str) and system.strip():
            if not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": system}, *messages]
        prompt, completion = split_conversation(messages, assistant_turns)
    if _is_empty({"prompt": prompt, "completion": completion}):
        raise Unusable("empty_reply")
    return {"prompt": prompt, "completion": completion}


def example_fingerprint(example: dict) -> str:
    """A stable id of a normalised example: the same text gives the same id on every machine and every run."""
    canonical = json.dumps([example["prompt"], example["completion"]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def _is_empty(example: dict) -> bool:
    replies = [m for m in example["completion"] if m["role"] == "assistant"] or example["completion"]
    return not "".join(m["content"] for m in replies).strip()


def count_multi_turn(dataset: Dataset) -> int:
    """Examples whose completion spans several messages (conversations trained on all their assistant turns)."""
    column_type = dataset.data.schema.field("completion").type if "completion" in dataset.column_names else None
    if column_type is None or not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)):
        return 0  # not this package's conversational form (e.g. plain-text completions)
    lengths = pc.list_value_length(dataset.with_format("arrow")["completion"])  # no Python copy of the text
    return int(pc.sum(pc.greater(lengths, 1)).as_py() or 0)


def has_multi_turn(*datasets: Dataset | None) -> bool:
    """Whether some example's completion spans several messages: then only the assistant replies in it may be
    trained, which needs TRL's `assistant_only_loss`."""
    return any(count_multi_turn(dataset) > 0 for dataset in datasets if dataset is not None)


def load_source(
    source: DataSource, seed: int = 42, assistant_turns: str = "all", drops: DropLog | None = None
) -> Dataset:
    """Read, validate, normalise and fingerprint one source, then take its `fraction`; drop (and count in `drops`) the
    records that cannot train and those whose example repeats one already kept (`drops.where` holds the ids kept, of
    this source and of the sources loaded before it into the same `drops`).

    `assistant_turns`: "all" trains every assistant turn of a multi-turn conversation, "last" only its last.
    """
    if assistant_turns not in ASSISTANT_TURNS:
        raise DataError(f"`assistant_turns` must be one of {', '.join(ASSISTANT_TURNS)}, got {assistant_turns!r}")
    drops = drops if drops is not None else DropLog()
    records = read_source(source)
    if not records:
        raise DataError(f"{source.path}: the dataset is empty")
    drops.read += len(records)
    formats: dict[str, str] = {}  # with `auto`, the format of each file of a folder, from its first record
    examples, locations = [], []
    for where, record in records:
        fmt = source.format
        if fmt == "auto":
            file = where.rsplit(", ", 1)[0]  # "<file>, line N" / "<file>, record N"
            if file not in formats:
                formats[file] = detect_format(record, where)
            fmt = formats[file]
        try:
            example = normalise(record, fmt, where, assistant_turns, source.roles)
        except Unusable as unusable:
            drops.add(unusable.reason, where)
            continue
        example[EXAMPLE_ID] = example_fingerprint(example)
        examples.append(example)
        locations.append(where)
    if not examples:
        drops.log()
        reasons = "; ".join(drops.describe(r) for r in drops.locations)
        raise DataError(f"{source.path}: no record can train: {reasons}")
    rows = range(len(examples))
    if source.fraction < 1:
        keep = max(1, round(source.fraction * len(examples)))
        rows = np.random.default_rng(seed).permutation(len(examples))[:keep]  # the rows Dataset.shuffle(seed) picks
    kept = []
    for row in rows:
        example, where = examples[row], locations[row]
        first = drops.where.get(example[EXAMPLE_ID])
        if first is not None:  # one id must mean one example: the confidence table is keyed by it
            drops.add("duplicate", f"{where} (copy of {first})")
            continue
        drops.where[example[EXAMPLE_ID]] = where  # for the drops seen later (template, truncation)
        kept.append(example)
    return Dataset.from_list(kept)


# ----------------------------------------------------------------------------------------------------------------------
# Mixtures and splits


def sources_from_args(script_args) -> list[DataSource]:
    role_map = getattr(script_args, "role_map", None) or {}
    if script_args.dataset_mixture is None:
        return [
            DataSource(
                path=script_args.dataset_name,
                format=script_args.dataset_format,
                split=script_args.dataset_train_split,
                name=script_args.dataset_config,
                role_map=role_map,
            )
        ]
    mixture = script_args.dataset_mixture
    if not isinstance(mixture, dict):
        raise DataError(f"`dataset_mixture` must be a mapping {{datasets: [...], seed}}, got {type(mixture).__name__}")
    unknown = set(mixture) - {"datasets", "seed"}
    if unknown:
        raise DataError(f"`dataset_mixture`: unknown key(s) {sorted(unknown)}; allowed keys: datasets, seed")
    entries = mixture.get("datasets")
    if not entries:
        raise DataError("`dataset_mixture` needs a non-empty `datasets` list")
    sources = []
    allowed = ("path", "fraction", "format", "split", "name", "role_map")
    for entry in entries:
        unknown = set(entry) - set(allowed) if isinstance(entry, dict) else set()
        if not isinstance(entry, dict) or "path" not in entry or unknown:
            problem = f"unknown key(s) {sorted(unknown)}; " if unknown else ""
            raise DataError(
                f"dataset_mixture entry {entry}: {problem}needs `path`; allowed keys: {', '.join(allowed)}"
            )
        entry_roles = entry.get("role_map") or {}
        if not isinstance(entry_roles, dict):
            raise DataError(f"dataset_mixture entry {entry}: `role_map` must be a mapping {{name: role}}")
        sources.append(DataSource(**{**entry, "role_map": {**role_map, **entry_roles}}))
    return sources


def load_datasets(script_args, drops: DropLog | None = None) -> tuple[Dataset, Dataset | None]:
    """The training set and the optional held-out split, normalised, fingerprinted and de-duplicated.

    Records that cannot train, and repeats of an earlier record, are dropped and counted in `drops` (a new `DropLog` when None), one log line per
    reason; too many of them stop here (`max_dropped_fraction`), before anything is written.
    """
    if drops is None:
        drops = DropLog(getattr(script_args, "max_dropped_fraction", DEFAULT_MAX_DROPPED_FRACTION))
    sources = sources_from_args(script_args)
    seed = (script_args.dataset_mixture or {}).get("seed", script_args.dataset_seed)
    assistant_turns = getattr(script_args, "assistant_turns", "all")
    parts = [load_source(source, seed, assistant_turns, drops) for source in sources]
    drops.log()
    parts = [part for part in parts if len(part)]  # a source whose every record repeats an earlier source's
    drops.check(sum(len(part) for part in parts))
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    dataset = dataset.shuffle(seed=seed).flatten_indices()
    eval_dataset = None
    size = script_args.eval_split_size
    if size:
        eval_count = int(size) if size >= 1 else round(size * len(dataset))
        if not 0 < eval_count < len(dataset):
            raise DataError(f"`eval_split_size`={size} leaves no training or no held-out example of {len(dataset)}")
        eval_dataset = dataset.select(range(eval_count))
        dataset = dataset.select(range(eval_count, len(dataset)))
    if script_args.max_train_examples is not None:
        dataset = dataset.select(range(min(script_args.max_train_examples, len(dataset))))
    logger.info("training examples: %d; held-out: %d", len(dataset), len(eval_dataset) if eval_dataset else 0)
    conversations = count_multi_turn(dataset)
    if conversations:
        logger.info(
            "%d multi-turn conversations: every assistant turn is trained (assistant_only_loss)", conversations
        )
    return dataset, eval_dataset
