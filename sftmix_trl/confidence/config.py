"""`ConfidenceConfig`: the settings of SFTMix stage 1 (the reference pass). `SFTMixConfig` carries the same fields,
so one YAML drives both stages."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
        for name in ("scoring_batch_size", "reference_batch_size", "reference_gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.reference_learning_rate <= 0:
            raise ValueError(f"`reference_learning_rate` must be > 0, got {self.reference_learning_rate}")

    def __post_init__(self):
        self.validate_confidence()

    @classmethod
    def from_args(cls, args) -> ConfidenceConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
