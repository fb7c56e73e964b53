"""The SFTMix-specific sections of the adapter's model card, and the section on the records dropped from the data."""

from __future__ import annotations

import os
from pathlib import Path

from sftmix_trl.confidence import PLOT_FILE
from sftmix_trl.confidence.report import DATA_MAP, REPORT_PAGE
from sftmix_trl.data.drops import REASONS, DropLog


def _last(log_history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return values[-1] if values else None


def data_card_section(drops: DropLog) -> str:
    """Which records of the data were not trained on, and why."""
    rows = "\n".join(f"| {REASONS[r]} | {drops.counts[r]} |" for r in REASONS if drops.counts[r])
    if not rows:
        return f"## Training data\n\nAll {drops.read} records read were usable (none dropped).\n"
    return (
        f"## Training data\n\n{drops.read} records read; {drops.dropped_fraction():.2%} dropped "
        f"(the run stops above max_dropped_fraction={drops.max_dropped_fraction}):\n\n"
        f"| reason | records |\n| --- | --- |\n{rows}\n"
    )


def sftmix_card_sections(table, log_history: list[dict], training_args) -> list[str]:
    meta = table.metadata
    rows = [
        ("examples scored", meta.get("num_scored")),
        ("confident / unconfident", f"{meta.get('num_confident')} / {meta.get('num_unconfident')}"),
        ("excluded (no response token after truncation)", meta.get("num_excluded")),
        ("confidence snapshots (reference steps)", meta.get("snapshot_steps")),
        ("reference model", meta.get("run", {}).get("reference_model")),
    ]
    if meta.get("num_suspicious_excluded"):
        rows.append(
            (
                "left out as suspicious (exclude_suspicious_fraction)",
                f"{meta['num_suspicious_excluded']} ({meta['exclude_suspicious_fraction']}; see {REPORT_PAGE})",
            )
        )
    split = "\n".join(f"| {name} | {value} |" for name, value in rows)
    figures = [
        (key, _last(log_history, key))
        for key in (
            "loss",
            "ntp_loss",
            "mixup_loss",
            "ntp_loss_confident",
            "ntp_loss_unconfident",
            "mixup_lambda",
            "mixup_token_share",
            "eval_loss",
            "train_runtime",
        )
    ]
    training = "\n".join(f"| {key} | {value:.4g} |" for key, value in figures if value is not None)
    plot = Path(training_args.confidence_dir) / PLOT_FILE
    picture = ""
    if plot.is_file():
        relative = os.path.relpath(plot, training_args.output_dir)
        picture = f"\n![Confidence split]({relative})\n" if not relative.startswith("..") else ""
    data_map = Path(training_args.confidence_dir) / DATA_MAP
    if picture and data_map.is_file():  # the data report, beside the table
        relative = os.path.relpath(data_map.parent, training_args.output_dir)
        picture += (
            f"\n![Data map]({relative}/{DATA_MAP})\n\nThe most suspicious training examples, with their text: "
            f"`{relative}/{REPORT_PAGE}` in the run's folder (not uploaded: it quotes the training data).\n"
        )
    return [
        f"## Confidence split (SFTMix stage 1)\n\n| | |\n| --- | --- |\n{split}\n{picture}",
        f"## Training figures (last logged values)\n\n| metric | value |\n| --- | --- |\n{training}\n",
    ]
