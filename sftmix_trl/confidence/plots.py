"""The confidence picture: what a user looks at before training on the split."""

from __future__ import annotations

import math
import os

import numpy as np


def log_axis_ticks(low: float, high: float, max_ticks: int = 8) -> list[float]:
    """Readable tick positions for a log axis over [low, high] (low > 0): powers of ten, else 1-2-5 or 1..9 steps
    per decade, the first that gives 3 to `max_ticks` ticks; a range too narrow for any gets round linear steps."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))

    def within(mantissas: tuple[int, ...]) -> list[float]:
        return [m * 10.0**e for e in range(first, last + 1) for m in mantissas if low <= m * 10.0**e <= high]

    powers = within((1,))
    if len(powers) > max_ticks:  # many decades: every k-th power of ten
        return powers[:: math.ceil(len(powers) / max_ticks)]
    for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = within(mantissas)
        if 3 <= len(ticks) <= max_ticks:
            return ticks
    from matplotlib.ticker import MaxNLocator

    # Less than a decade: on so short a log axis, round linear steps look evenly spaced
    values = MaxNLocator(nbins=min(max_ticks, 6), steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
    return [float(v) for v in values if low <= v <= high]


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
    # matplotlib labels the minor ticks of a log axis spanning less than a decade, and they overlap: label only
    # chosen values, printed as plain numbers
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    low, high = right.get_xlim()
    right.xaxis.set_major_locator(FixedLocator(log_axis_ticks(low, high)))
    right.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    right.xaxis.set_minor_locator(NullLocator())
    right.xaxis.set_minor_formatter(NullFormatter())
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


def plot_data_map(report, path: str | os.PathLike, prompt_fit_model: str = "base", top: int = 20) -> None:
    """The data map of the report (`sftmix_trl.confidence.report`): confidence against variability across the snapshots,
    each example coloured by its prompt fit, the `top` most suspicious ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    data = report.select(["confidence", "variability", "prompt_fit", "suspicious_rank"]).to_pydict()
    confidence, spread = np.asarray(data["confidence"]), np.asarray(data["variability"])
    log_fit, ranks = np.log2(np.asarray(data["prompt_fit"])), np.asarray(data["suspicious_rank"])
    # Diverging at prompt fit 1 (log 0): blue, the prompt helps; red, it does not
    low, high = min(log_fit.min(), -1e-3), max(log_fit.max(), 1e-3)
    fig, axis = plt.subplots(figsize=(8, 6))
    points = axis.scatter(
        spread, confidence, c=log_fit, cmap="coolwarm", norm=TwoSlopeNorm(0.0, low, high), s=14, alpha=0.85
    )
    ringed = ranks <= top
    axis.scatter(
        spread[ringed],
        confidence[ringed],
        s=60,
        facecolors="none",
        edgecolors="black",
        linewidths=0.8,
        label=f"{int(ringed.sum())} most suspicious (report.md)",
    )
    bar = fig.colorbar(points, ax=axis)
    # The two sides of 1 have their own scales: ticks on each, so that the red side is readable too
    ticks = np.r_[np.linspace(low, 0, 5), np.linspace(0, high, 3)[1:]]
    bar.set_ticks(ticks, labels=[f"{t:.2g}" for t in ticks])
    bar.set_label(f"log2 prompt fit ({prompt_fit_model} model): > 0, the prompt does not help")
    axis.set_xlabel("variability: std of perplexity across the reference snapshots")
    axis.set_ylabel("confidence = - mean perplexity over snapshots")
    axis.set_yscale("symlog")
    axis.set_title(f"Data map: {len(confidence)} training examples")
    axis.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
