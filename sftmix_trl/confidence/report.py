"""The data report of stage 1: which training examples to look at first, with their text, and a picture.

Written next to the confidence table (`confidence_dir`):

    report.parquet     one row per scored example: example_id, prompt, response, confidence, variability,
                       ppl_given_prompt, ppl_alone, prompt_fit, subset, suspicious_rank (1 = look first), excluded
    report.md          the most suspicious examples with their text
    data_map.png       confidence against variability, coloured by prompt fit
    scores/prompt_fit-<model>.parquet   the prompt-fit perplexities, kept so that a rerun redoes no forward pass

`suspicious_rank` orders the examples by prompt fit (PPL(response | prompt) / PPL(response alone), see
`prompt_fit`): on injected mismatched answers it finds them far better than SFTMix's confidence, which mostly measures
how hard a response is (benchmarks/results/noise_detection.md). `exclude_suspicious_fraction` leaves the top of that
ranking out of stage 2 and out of its confidence split.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from sftmix_trl.atomic import atomic_write
from sftmix_trl.confidence.plots import plot_data_map
from sftmix_trl.confidence.prompt_fit import adapter_disabled, prompt_fit, response_frame_ids, score_prompt_fit
from sftmix_trl.confidence.snapshots import load_snapshot
from sftmix_trl.confidence.table import METADATA_FILE, ConfidenceError, ConfidenceTable
from sftmix_trl.data.load import EXAMPLE_ID
from sftmix_trl.sharded import load_adapter_state

logger = logging.getLogger(__name__)

REPORT_TABLE, REPORT_PAGE, DATA_MAP = "report.parquet", "report.md", "data_map.png"
PROMPT_FIT_MODELS = ("base", "reference")
TEXT_PREVIEW = 600  # characters of a prompt or response shown in report.md (the parquet holds them whole)


# ----------------------------------------------------------------------------------------------------------------------
# Pure parts


def message_text(messages: list[dict]) -> str:
    """The text of a prompt or completion: a single message's content, or each message prefixed by its role."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def variability(perplexities: np.ndarray) -> np.ndarray:
    """Spread of each example's perplexity across the C snapshots (population std; 0 with one snapshot)."""
    perplexities = np.asarray(perplexities, dtype=np.float64)
    return perplexities.std(axis=1) if perplexities.shape[1] > 1 else np.zeros(len(perplexities))


def suspicious_score(prompt_fit: np.ndarray) -> np.ndarray:
    """How suspicious each example is (higher: look first): its prompt fit. A response that its prompt does not make
    more likely is the mark of a mismatched or broken pair; confidence and variability rank worse on injected noise
    (benchmarks/results/noise_detection.md), so they do not enter the score."""
    return np.asarray(prompt_fit, dtype=np.float64)


def suspicious_ranks(example_ids: list[str], score: np.ndarray) -> np.ndarray:
    """1 for the highest score, N for the lowest; ties broken by example id, so the ranking is the same everywhere."""
    order = sorted(range(len(example_ids)), key=lambda i: (-float(score[i]), example_ids[i]))
    ranks = np.empty(len(example_ids), dtype=np.int64)
    ranks[order] = np.arange(1, len(example_ids) + 1)
    return ranks


def num_excluded(num_examples: int, fraction: float) -> int:
    """How many of the most suspicious examples `exclude_suspicious_fraction` leaves out: floor(fraction x N)."""
    return int(fraction * num_examples)


def build_report(
    table: ConfidenceTable,
    train_dataset: Dataset,
    ppl_given_prompt: np.ndarray,
    ppl_alone: np.ndarray,
    exclude_fraction: float = 0.0,
) -> pa.Table:
    """The report's rows, in the table's order (the prompt-fit perplexities are aligned with `table.example_ids`)."""

    text = {
        example_id: (message_text(prompt), message_text(completion))
        for example_id, prompt, completion in zip(
            train_dataset[EXAMPLE_ID], train_dataset["prompt"], train_dataset["completion"]
        )
    }
    missing = [i for i in table.example_ids if i not in text]
    if missing:
        raise ConfidenceError(
            f"{len(missing)} scored examples are not in the training data (e.g. {missing[:3]}): the table belongs to "
            "other data"
        )
    fit = prompt_fit(ppl_given_prompt, ppl_alone)
    ranks = suspicious_ranks(table.example_ids, suspicious_score(fit))
    excluded = ranks <= num_excluded(len(ranks), exclude_fraction)
    return pa.table(
        {
            EXAMPLE_ID: table.example_ids,
            "prompt": [text[i][0] for i in table.example_ids],
            "response": [text[i][1] for i in table.example_ids],
            "confidence": table.confidence,
            "variability": variability(table.perplexities),
            "ppl_given_prompt": np.asarray(ppl_given_prompt, dtype=np.float64),
            "ppl_alone": np.asarray(ppl_alone, dtype=np.float64),
            "prompt_fit": fit,
            "subset": table.subsets,
            "num_response_tokens": table.num_response_tokens,
            "suspicious_rank": ranks,
            "excluded": excluded,
        }
    )


def _preview(text: str) -> str:
    text = text if len(text) <= TEXT_PREVIEW else text[:TEXT_PREVIEW] + f" [... {len(text) - TEXT_PREVIEW} more]"
    return "\n".join("> " + line for line in text.splitlines() or [""])


def report_markdown(report: pa.Table, top_k: int, prompt_fit_model: str, num_not_scored: int = 0) -> str:
    """The page: what the columns mean, then the `top_k` most suspicious examples with their text."""
    rows = report.to_pylist()
    rows.sort(key=lambda r: r["suspicious_rank"])
    fit = np.array([r["prompt_fit"] for r in rows])
    num_excluded_rows = sum(r["excluded"] for r in rows)
    lines = [
        "# Data report (SFTMix stage 1)",
        "",
        f"{len(rows)} training examples scored"
        + (f"; {num_not_scored} not scored (no response token within max_length)" if num_not_scored else "")
        + f". Prompt fit = PPL(response | prompt) / PPL(response alone) under the {prompt_fit_model} model: below 1 "
        "the prompt helps predict the response; near or above 1 it does not (a mismatched, off-topic or broken pair). "
        f"Median {np.median(fit):.3f}; {int((fit >= 1).sum())} examples at 1 or above.",
        "",
        "Examples are ranked by prompt fit (`suspicious_rank` 1 = look first). Confidence is SFTMix's (- mean "
        "perplexity over the reference snapshots), variability its spread across them. The whole table, with full "
        f"texts, is `{REPORT_TABLE}`; join it to your data on `example_id` or on the text.",
        "",
    ]
    if num_excluded_rows:
        lines += [f"The {num_excluded_rows} highest-ranked examples are left out of stage 2 (`excluded`).", ""]
    lines += [f"## The {min(top_k, len(rows))} most suspicious examples", ""]
    for r in rows[:top_k]:
        lines += [
            f"### {r['suspicious_rank']}. `{r[EXAMPLE_ID]}`: prompt fit {r['prompt_fit']:.3f}, confidence "
            f"{r['confidence']:.2f} ({r['subset']}), variability {r['variability']:.2f}"
            + (", excluded" if r["excluded"] else ""),
            "",
            "Prompt:",
            "",
            _preview(r["prompt"]),
            "",
            "Response:",
            "",
            _preview(r["response"]),
            "",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Files


def write_report(report: pa.Table, directory: str | os.PathLike, top_k: int, prompt_fit_model: str, **kw) -> None:
    """report.md and data_map.png, then report.parquet last (its presence means a finished report)."""

    directory = Path(directory)
    atomic_write(directory / REPORT_PAGE, report_markdown(report, top_k, prompt_fit_model, **kw))
    plot_data_map(report, directory / DATA_MAP, prompt_fit_model, top=top_k)
    atomic_write(directory / REPORT_TABLE, report)


def find_report(directory: str | os.PathLike) -> pa.Table | None:
    """The finished data report in `directory`, or None when there is none."""
    path = Path(directory) / REPORT_TABLE
    return pq.read_table(path) if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1


def prompt_fit_cache(directory: Path, model: str) -> Path:
    return directory / "scores" / f"prompt_fit-{model}.parquet"


def compute_prompt_fit(
    scoring_model, prepared: Dataset, tokenizer, table: ConfidenceTable, config, directory: Path, last_snapshot
) -> tuple[np.ndarray, np.ndarray, float]:
    """The prompt-fit perplexities of every scored example, aligned with `table.example_ids`, from the cache or from
    forward passes (every process: they are sharded), and the seconds those passes took.

    `last_snapshot()` loads the reference's last snapshot into `scoring_model` (for `prompt_fit_model: reference`,
    whose perplexity given the prompt is then the table's last column).
    """
    from accelerate import PartialState

    cache = prompt_fit_cache(directory, config.prompt_fit_model)
    if cache.is_file():
        stored = pq.read_table(cache).to_pydict()
        if sorted(stored[EXAMPLE_ID]) == sorted(table.example_ids):
            position = {i: p for p, i in enumerate(stored[EXAMPLE_ID])}
            order = [position[i] for i in table.example_ids]
            logger.info("prompt-fit scores found in %s", cache)
            return np.asarray(stored["ppl_given_prompt"])[order], np.asarray(stored["ppl_alone"])[order], 0.0
    prepared_ids = list(prepared[EXAMPLE_ID])
    if sorted(prepared_ids) != sorted(table.example_ids):
        raise ConfidenceError(f"the confidence table in {directory} does not score the same examples as this data")
    frame = response_frame_ids(tokenizer)
    start = time.perf_counter()
    if config.prompt_fit_model == "base":
        with adapter_disabled(scoring_model):
            scores = score_prompt_fit(
                scoring_model, prepared, frame, config.scoring_batch_size, tokenizer.pad_token_id, desc="prompt fit"
            )
    else:
        last_snapshot()
        last = dict(zip(table.example_ids, table.perplexities[:, -1]))
        scores = score_prompt_fit(
            scoring_model,
            prepared,
            frame,
            config.scoring_batch_size,
            tokenizer.pad_token_id,
            ppl_given_prompt=np.array([last[i] for i in prepared_ids]),
            desc="prompt fit",
        )
    seconds = time.perf_counter() - start
    if not (np.isfinite(scores.ppl_given_prompt).all() and np.isfinite(scores.ppl_alone).all()):
        raise ConfidenceError("non-finite prompt-fit perplexity; not written")
    if PartialState().is_main_process:
        atomic_write(
            cache,
            pa.table(
                {EXAMPLE_ID: prepared_ids, "ppl_given_prompt": scores.ppl_given_prompt, "ppl_alone": scores.ppl_alone}
            ),
        )
    position = {i: p for p, i in enumerate(prepared_ids)}
    order = [position[i] for i in table.example_ids]
    return scores.ppl_given_prompt[order], scores.ppl_alone[order], seconds


def run_data_report(
    scoring_model, prepared: Dataset, train_dataset: Dataset, tokenizer, table: ConfidenceTable, config, directory
) -> pa.Table:
    """The report of `table`: the prompt-fit passes through `scoring_model` (the reference's, see
    `confidence.reference.Reference.scoring_model`; cached), then the files, written by the main process. The passes'
    time is recorded in `table.metadata["data_report"]` and in the table's metadata.json."""
    from accelerate import PartialState

    directory = Path(directory)

    def last_snapshot():
        steps = table.metadata.get("snapshot_steps") or []
        if not steps:
            raise ConfidenceError(f"the table in {directory} records no snapshot: use prompt_fit_model: base")
        load_adapter_state(scoring_model, load_snapshot(directory / "snapshots" / f"step-{steps[-1]}"))

    given, alone, seconds = compute_prompt_fit(
        scoring_model, prepared, tokenizer, table, config, directory, last_snapshot
    )
    report = build_report(table, train_dataset, given, alone, config.exclude_suspicious_fraction)
    record = {"prompt_fit_model": config.prompt_fit_model, "prompt_fit_seconds": seconds}
    table.metadata["data_report"] = record
    if PartialState().is_main_process:
        write_report(
            report,
            directory,
            config.report_top_k,
            config.prompt_fit_model,
            num_not_scored=int(table.metadata.get("num_excluded", 0)),
        )
        # Into the file as stored: the table in memory may be cut at another run's `confident_fraction`
        stored = json.loads((directory / METADATA_FILE).read_text())
        atomic_write(directory / METADATA_FILE, json.dumps({**stored, "data_report": record}, indent=2, default=str))
        logger.info("data report written to %s (%s, %s, %s)", directory, REPORT_PAGE, DATA_MAP, REPORT_TABLE)
    PartialState().wait_for_everyone()
    return report
