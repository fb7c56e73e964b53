"""The confidence picture: what a user looks at before training on the split."""

from __future__ import annotations

import os

import numpy as np


def plot_confidence(table, path: str | os.PathLike) -> None:
    """Histogram of confidence with the split marked, and mean perplexity against its spread across snapshots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confidence = table.confidence
    confident_ids, _ = table.split()
    is_confident = np.isin(np.asarray(table.example_ids), np.asarray(confident_ids))
    cut = (confidence[is_confident].min() + confidence[~is_confident].max()) / 2
    mean_ppl = table.perplexities.mean(axis=1)
    spread = table.perplexities.std(axis=1) if table.perplexities.shape[1] > 1 else np.zeros(len(mean_ppl))

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    bins = np.linspace(confidence.min(), confidence.max(), 40)
    left.hist(
        confidence[is_confident], bins=bins, color="tab:blue", alpha=0.8, label=f"confident ({is_confident.sum()})"
    )
    left.hist(
        confidence[~is_confident],
        bins=bins,
        color="tab:orange",
        alpha=0.8,
        label=f"unconfident ({(~is_confident).sum()})",
    )
    left.axvline(cut, color="black", linestyle="--", linewidth=1, label=f"split at {cut:.2f}")
    left.set_xlabel("confidence = - mean perplexity over snapshots")
    left.set_ylabel("examples")
    left.set_title("Confidence of the training examples")
    left.legend()

    right.scatter(mean_ppl[is_confident], spread[is_confident], s=10, color="tab:blue", alpha=0.6, label="confident")
    right.scatter(
        mean_ppl[~is_confident], spread[~is_confident], s=10, color="tab:orange", alpha=0.6, label="unconfident"
    )
    right.set_xscale("log")
    right.set_xlabel("mean response perplexity (log scale)")
    right.set_ylabel(f"std of perplexity across {table.perplexities.shape[1]} snapshots")
    right.set_title("Training dynamics map")
    right.legend()
    fig.suptitle(
        f"SFTMix confidence split: {len(confidence)} examples, confident fraction {table.confident_fraction}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
