"""Opt-in (`exclude_suspicious_fraction`): stage 2 trains without the most suspicious examples of stage 1's data
report, and splits the confidence table over the examples that remain."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from datasets import Dataset

from sftmix_trl.confidence.report import REPORT_PAGE, REPORT_TABLE, num_excluded
from sftmix_trl.confidence.table import ConfidenceError, ConfidenceTable
from sftmix_trl.data.load import EXAMPLE_ID

logger = logging.getLogger(__name__)


def exclude_suspicious(
    table: ConfidenceTable, train_dataset: Dataset, directory: str | os.PathLike, fraction: float
) -> tuple[ConfidenceTable, Dataset, list[str]]:
    """The table and the training data without the floor(fraction x N) most suspicious examples of the table's data
    report (`table.report`, as `compute_confidence` returns it from `directory`); the confidence split is then made
    over the examples that remain. Returns the left-out ids too."""
    if fraction <= 0:
        return table, train_dataset, []
    if table.report is None:
        raise ConfidenceError(
            f"no data report in {directory} (expected {REPORT_TABLE}): run stage 1 with `data_report: true`, or "
            "`sftmix-trl report --config ...` on an existing table"
        )
    report = table.report.select([EXAMPLE_ID, "suspicious_rank"]).to_pydict()
    if sorted(report[EXAMPLE_ID]) != sorted(table.example_ids):
        raise ConfidenceError(
            f"the data report in {directory} does not cover the confidence table's examples: rerun "
            "`sftmix-trl report --config ...`"
        )
    count = num_excluded(len(report[EXAMPLE_ID]), fraction)
    left_out = [i for i, r in sorted(zip(report[EXAMPLE_ID], report["suspicious_rank"]), key=lambda p: p[1])][:count]
    if len(table.example_ids) - count < 2:
        raise ConfidenceError(
            f"exclude_suspicious_fraction={fraction} leaves {len(table.example_ids) - count} examples; lower it"
        )
    gone = set(left_out)
    keep = [p for p, i in enumerate(table.example_ids) if i not in gone]
    kept = ConfidenceTable(
        example_ids=[table.example_ids[p] for p in keep],
        perplexities=table.perplexities[keep],
        num_response_tokens=table.num_response_tokens[keep],
        confident_fraction=table.confident_fraction,
        metadata=dict(table.metadata),
    )
    confident, unconfident = kept.split()
    kept.metadata.update(
        num_confident=len(confident),
        num_unconfident=len(unconfident),
        num_suspicious_excluded=count,
        suspicious_excluded_ids=left_out,
        exclude_suspicious_fraction=fraction,
    )
    dataset = train_dataset.filter(lambda example_id: example_id not in gone, input_columns=EXAMPLE_ID)
    logger.info(
        "left out of stage 2: the %d most suspicious examples (exclude_suspicious_fraction=%s, see %s)",
        count,
        fraction,
        Path(directory) / REPORT_PAGE,
    )
    return kept, dataset, left_out
