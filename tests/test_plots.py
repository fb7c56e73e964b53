"""`plots`: the confidence picture's log axis."""

import numpy as np
import pytest

from sftmix_trl.confidence.plots import log_axis_ticks


@pytest.mark.parametrize("low, high", [(9.0, 14.3), (10.01, 10.5), (1.2, 537.0), (3.0, 9.5), (1.0, 1e12)])
def test_log_axis_ticks_are_few_distinct_and_inside(low, high):
    ticks = log_axis_ticks(low, high)
    assert 3 <= len(ticks) <= 8 and ticks == sorted(set(ticks))
    assert all(low <= t <= high for t in ticks)
    assert len({f"{t:g}" for t in ticks}) == len(ticks)  # labels print distinct


def test_confidence_plot_labels_no_minor_ticks(tmp_path, monkeypatch):
    import matplotlib.figure

    from sftmix_trl.confidence import ConfidenceTable
    from sftmix_trl.confidence.plots import plot_confidence

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    rng = np.random.default_rng(0)
    ppl = rng.uniform(9, 14, size=(40, 1)) * rng.uniform(0.95, 1.05, size=(40, 3))  # less than a decade
    plot_confidence(ConfidenceTable([f"e{i}" for i in range(40)], ppl, np.ones(40, dtype=int)), tmp_path / "c.png")
    axis = figures[0].axes[1].xaxis
    figures[0].canvas.draw()
    assert all(label.get_text() == "" for label in axis.get_minorticklabels())
    major = [label.get_text() for label in axis.get_majorticklabels() if label.get_text()]
    assert len(major) >= 3 and len(set(major)) == len(major)
