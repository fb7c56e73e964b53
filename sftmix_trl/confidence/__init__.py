"""SFTMix stage 1: per-example confidence from a lightweight reference pass, and the confident/unconfident split.

A LoRA reference adapter (on the same 4-bit base by default) is trained with plain NTP on the training set. At C
evenly spaced snapshots along that run, every example is scored in inference mode by the perplexity of its
response (all the assistant turns of a multi-turn conversation); `confidence = -mean_c PPL_c`. The
higher-confidence `confident_fraction` of the examples is D_c, the rest D_u.

    config.py      `ConfidenceConfig`, the stage's settings
    table.py       `ConfidenceTable`, the median split, and the metadata that says which data a table fits
    snapshots.py   `load_snapshot`: a reference snapshot read back, an empty one refused
    reference.py   `Reference`: the reference run, its snapshots, the scoring of each, the table; the model every
                   scoring pass of the stage goes through
    prompt_fit.py  prompt fit, PPL(response | prompt) / PPL(response alone), and its forward passes
    report.py      the data report: its rows, its files, its prompt-fit passes (cached)
    stage1.py      the entry points: `compute_confidence` (the table, reused or computed, then its report when
                   missing: `table.report`) and `write_data_report` (the report of a finished table, trains nothing)

Each snapshot is scored by `sftmix_trl.perplexity.score_perplexities` (the package's one perplexity engine, shared
with evaluation; re-exported here with its batching and stats).

Everything lands in one folder (`confidence_dir`):

    run.json                      what the table is computed from; a rerun with other settings is refused
    snapshots/step-<s>/           reference adapter weights at each snapshot (PEFT format, safetensors)
    scores/step-<s>.parquet       per-snapshot perplexities, written as each scoring pass completes
    confidence.parquet            the table: example_id, ppl_<c>..., confidence, subset, num_response_tokens
    metadata.json                 run.json plus exclusions, times and throughput (the data report's passes too)
    confidence.png                the picture to look at before training
    report.parquet, report.md     the data report (`sftmix_trl.confidence.report`): the most suspicious examples first,
    data_map.png                  with their text, and confidence against variability coloured by prompt fit

A run killed at any point and started again redoes only what is missing. Writes are atomic (temporary file, then
rename), so a file that exists is complete.
"""

from sftmix_trl.confidence.config import ConfidenceConfig
from sftmix_trl.confidence.reference import Reference, snapshot_steps
from sftmix_trl.confidence.stage1 import compute_confidence, write_data_report
from sftmix_trl.confidence.table import (
    CONFIDENT,
    DATA_KEYS,
    LABEL_KEYS,
    METADATA_DEFAULTS,
    METADATA_FILE,
    PLOT_FILE,
    SETTINGS_FILE,
    TABLE_FILE,
    UNCONFIDENT,
    ConfidenceError,
    ConfidenceTable,
    check_metadata,
    dataset_fingerprint,
    expected_metadata,
    scores_all_turns,
    split_confidence,
)

__all__ = [
    "CONFIDENT",
    "DATA_KEYS",
    "LABEL_KEYS",
    "METADATA_DEFAULTS",
    "METADATA_FILE",
    "PLOT_FILE",
    "SETTINGS_FILE",
    "TABLE_FILE",
    "UNCONFIDENT",
    "ConfidenceConfig",
    "ConfidenceError",
    "ConfidenceTable",
    "Reference",
    "check_metadata",
    "compute_confidence",
    "dataset_fingerprint",
    "expected_metadata",
    "scores_all_turns",
    "snapshot_steps",
    "split_confidence",
    "write_data_report",
]
