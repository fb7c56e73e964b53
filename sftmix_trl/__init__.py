"""sftmix-trl: SFTMix (confidence-aware Mixup for instruction tuning) on TRL, PEFT and bitsandbytes."""

from sftmix_trl.bnb_cpu import silence_hub_kernel_warning

silence_hub_kernel_warning()  # before anything imports bitsandbytes

from sftmix_trl.errors import SFTMixError  # noqa: E402

__version__ = "0.1.0"

# The public names, loaded on first use: the trainer and stage 1 import TRL and transformers' Trainer, so that
# `import sftmix_trl` (the CLI's --help, the loss alone) stays fast; and the package's root imports no stage
_LAZY = {
    "mixup_loss": ".sftmix.mixup",
    "SFTMixConfig": ".sftmix.config",
    "SFTMixTrainer": ".sftmix.trainer",
    "ConfidenceConfig": ".confidence",
    "ConfidenceTable": ".confidence",
    "compute_confidence": ".confidence",
}
__all__ = ["SFTMixError", "mixup_loss", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
