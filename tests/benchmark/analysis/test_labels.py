"""Point labels that never overlap (benchmark/analysis/plots.py separate_labels), on hand-placed labels: where each
one steps, by how much, and that none leaves the axes."""

from __future__ import annotations

import itertools

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmark.analysis import plots


def label_axes():
    """An empty 4 x 3 inch axes spanning 0..1 both ways, laid out, and its renderer."""
    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set(xlim=(0, 1), ylim=(0, 1))
    fig.canvas.draw()
    return ax, fig.canvas.get_renderer()


def test_overlapping_labels_step_down_then_up_by_whole_label_heights():
    ax, renderer = label_axes()
    texts = [ax.text(0.4, 0.5, "a label") for _ in range(3)]
    start = texts[0].get_window_extent(renderer)
    plots.separate_labels(ax, texts, renderer)
    boxes = [t.get_window_extent(renderer) for t in texts]
    step = 1.1 * start.height  # LABEL_GAP heights: two stacked labels do not touch
    assert [b.y0 for b in boxes] == pytest.approx([start.y0, start.y0 - step, start.y0 + step])
    assert [b.x0 for b in boxes] == pytest.approx([start.x0] * 3)  # inside the axes: not moved sideways
    assert not [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def test_a_label_stays_inside_the_axes_sideways_and_below():
    ax, renderer = label_axes()
    inside = ax.get_window_extent(renderer)
    sticking_out = ax.text(0.99, 0.5, "a long label past the right edge")
    at_bottom = [ax.text(0.3, 0.0, "low", va="bottom") for _ in range(2)]  # the second cannot step down out of the axes
    first, low = sticking_out.get_window_extent(renderer), at_bottom[0].get_window_extent(renderer)
    plots.separate_labels(ax, [sticking_out, *at_bottom], renderer)
    moved = sticking_out.get_window_extent(renderer)
    assert moved.x1 == pytest.approx(inside.x1) and moved.y0 == pytest.approx(first.y0)
    assert at_bottom[0].get_window_extent(renderer).y0 == pytest.approx(low.y0)  # no overlap: stays, even at the edge
    assert at_bottom[1].get_window_extent(renderer).y0 == pytest.approx(low.y0 + 1.1 * low.height)
