"""The figures' common parts: a headless matplotlib figure, and the note every plot carries."""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["new_figure", "plot_note"]


def new_figure(width: float, height: float) -> Any:
    """A matplotlib figure drawn without a display (Agg), ``width`` x ``height`` inches at 100 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_note(summary: Optional[dict]) -> str:
    """What a plot must say about its run: how many samples it stands on, and random weights."""
    if not summary:
        return ""
    parts = []
    coverage = summary.get("coverage")
    if coverage:
        parts.append(f"{coverage['evaluated']} of {coverage['benchmark_samples']} samples")
    if (summary.get("components") or {}).get("random_weights"):
        parts.append("RANDOM WEIGHTS: shows the pipeline only")
    return "; ".join(parts)
