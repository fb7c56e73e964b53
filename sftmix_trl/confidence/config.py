"""`ConfidenceConfig`: the settings of SFTMix stage 1 (the reference pass). `SFTMixConfig` carries the same fields,
so one YAML drives both stages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ConfidenceConfig:
    """Settings of SFTMix stage 1: the reference pass that scores every example's confidence, and the data report
    written beside the table. `SFTMixConfig` carries the same fields, so one YAML drives both stages.

    Parameters:
        > Parameters of the reference pass

        confidence_dir (`str`, *optional*):
            Folder of the confidence table and its snapshots. Default: `<output_dir>/confidence`. An existing table
            there is reused when it matches the data and settings, and refused when it does not.
        reference_model_name_or_path (`str`, *optional*):
            Base of the reference adapter. Default: the model being trained (the same 4-bit base); a smaller model,
            even of another family, works too.
        reference_epochs (`float`, *optional*, defaults to `1.0`):
            Epochs of NTP training of the reference adapter.
        reference_learning_rate (`float`, *optional*, defaults to `2e-4`):
            Learning rate of the reference adapter.
        reference_batch_size (`int`, *optional*, defaults to `8`):
            Per-device batch size of the reference training.
        reference_gradient_accumulation_steps (`int`, *optional*, defaults to `1`):
            Gradient accumulation of the reference training.
        num_confidence_checkpoints (`int`, *optional*, defaults to `3`):
            C, the adapter snapshots scored along the reference run, evenly spaced, the last at its end.
        scoring_batch_size (`int`, *optional*, defaults to `32`):
            Sequences per scoring batch (forward only, grouped by length).
        confident_fraction (`float`, *optional*, defaults to `0.5`):
            Share of the examples put in the confident subset (`0.5`: a median split).

        > Parameters of the data report (none of them changes the table)

        data_report (`bool`, *optional*, defaults to `True`):
            Write the data report beside the table (`report.parquet`, `report.md`, `data_map.png`).
        prompt_fit_model (`Literal["base", "reference"]`, *optional*, defaults to `"base"`):
            Model whose prompt fit ranks the examples: the reference's base with the adapter off (2 passes), or the
            reference's last snapshot (1 pass).
        report_top_k (`int`, *optional*, defaults to `20`):
            Most suspicious examples listed, with their text, in `report.md`.
        exclude_suspicious_fraction (`float`, *optional*, defaults to `0.0`):
            Leave the floor(fraction x N) most suspicious examples out of stage 2 and out of its confidence split.
    """

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
    # -- data report (sftmix_trl/confidence/report.py): none of these changes the table (table.REPORT_FIELDS) ------------
    data_report: bool = field(
        default=True,
        metadata={
            "help": "Write the data report beside the table (report.parquet, report.md, data_map.png): every "
            "example's text, confidence, variability and prompt fit, ranked by how suspicious it is. Costs the "
            "prompt-fit forward passes (2 with the base model, 1 with the reference)."
        },
    )
    prompt_fit_model: Literal["base", "reference"] = field(
        default="base",
        metadata={
            "help": "Model whose prompt fit (PPL(response | prompt) / PPL(response alone)) ranks the examples: "
            "'base' (the reference's base, adapter off: finds injected mismatched answers best, see "
            "benchmarks/results/noise_detection.md) or 'reference' (its last snapshot: one pass fewer)."
        },
    )
    report_top_k: int = field(
        default=20, metadata={"help": "Most suspicious examples listed, with text, in report.md."}
    )
    exclude_suspicious_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Leave the floor(fraction x N) most suspicious examples of the data report out of stage 2 and "
            "out of its confidence split (recorded in sftmix_run.json and the model card). 0: train on everything."
        },
    )

    def validate_confidence(self) -> None:
        if not 0 < self.confident_fraction < 1:
            raise ValueError(f"`confident_fraction` must be in (0, 1), got {self.confident_fraction}")
        if self.num_confidence_checkpoints < 1:
            raise ValueError(f"`num_confidence_checkpoints` must be >= 1, got {self.num_confidence_checkpoints}")
        if self.reference_epochs <= 0:
            raise ValueError(f"`reference_epochs` must be > 0, got {self.reference_epochs}")
        for name in ("scoring_batch_size", "reference_batch_size", "reference_gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.reference_learning_rate <= 0:
            raise ValueError(f"`reference_learning_rate` must be > 0, got {self.reference_learning_rate}")
        if self.prompt_fit_model not in ("base", "reference"):
            raise ValueError(f"`prompt_fit_model` must be 'base' or 'reference', got {self.prompt_fit_model!r}")
        if not 0 <= self.exclude_suspicious_fraction < 1:
            raise ValueError(
                f"`exclude_suspicious_fraction` must be in [0, 1), got {self.exclude_suspicious_fraction}"
            )
        if self.exclude_suspicious_fraction > 0 and not self.data_report:
            raise ValueError(
                "`exclude_suspicious_fraction` ranks examples by the data report: set `data_report: true`"
            )
        if self.report_top_k < 0:
            raise ValueError(f"`report_top_k` must be >= 0, got {self.report_top_k}")

    def __post_init__(self):
        self.validate_confidence()

    @classmethod
    def from_args(cls, args) -> ConfidenceConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
