"""sftmix-trl: SFTMix (confidence-aware Mixup for instruction tuning) on TRL, PEFT and bitsandbytes."""

from .mixup import mixup_loss

__version__ = "0.1.0"
__all__ = ["mixup_loss"]
