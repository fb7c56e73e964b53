"""The reference adapter's snapshots, read back: what stage 1 scores with and the data report's prompt fit reuses."""

from __future__ import annotations

from pathlib import Path

import torch

from sftmix_trl.confidence.table import ConfidenceError


def load_snapshot(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a snapshot; an empty one (an ungathered shard saved) is refused, never scored."""
    from safetensors.torch import load_file

    path = directory / "adapter_model.safetensors"
    weights = load_file(path) if path.is_file() else {}
    if not weights or any(t.numel() == 0 for t in weights.values()):
        raise ConfidenceError(
            f"the reference snapshot {path} is missing, empty or holds 0-size tensors; delete "
            f"{directory.parent.parent} and recompute"
        )
    return weights
