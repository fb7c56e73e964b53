"""sftmix-trl: SFTMix (confidence-aware Mixup for instruction tuning) on TRL, PEFT and bitsandbytes."""

from .bnb_cpu import silence_hub_kernel_warning

silence_hub_kernel_warning()  # before anything imports bitsandbytes

from .mixup import mixup_loss  # noqa: E402

__version__ = "0.1.0"
__all__ = ["mixup_loss"]
