"""Figures of the report: matplotlib (object API, no pyplot state) drawn to SVG and embedded as data URIs.

Each figure is an `<img src="data:image/svg+xml;base64,...">`: its own document (no id clashes between
figures), crisp at any zoom, with text drawn as paths (no font is fetched), so the page needs nothing
but itself. Dense point clouds are sampled by the caller and rasterised inside the SVG.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence

import matplotlib
from cycler import cycler
from matplotlib.figure import Figure

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
TIER_COLOURS = {"good": "#009E73", "ok": "#A0A0A0", "bad": "#D55E00", "unlabelled": "#E4E4E4"}
STYLE = {
    "font.size": 8.5, "axes.titlesize": 9.5, "axes.labelsize": 8.5, "legend.fontsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "axes.axisbelow": True, "axes.prop_cycle": cycler(color=PALETTE), "legend.frameon": False,
    "svg.fonttype": "path",  # glyphs as paths: the SVG needs no font
    "svg.hashsalt": "ahf",  # stable ids: the same data gives the same bytes
}
SIZE = (5.6, 3.2)  # inches; two figures side by side fill a laptop-width page
WIDE = 11.2  # inches: the width of a figure that spans the page (several panels)
POINTS_RASTERISED = 2_000  # scatter plots with more points are embedded as an image inside the SVG


def render(draw: Callable, size: tuple[float, float] = SIZE, grid: tuple[int, int] = (1, 1)) -> str:
    """A data URI of the SVG that `draw(axes)` makes (one Axes, or a list of them for a grid)."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=size, layout="constrained")
        axes = fig.subplots(*grid, squeeze=False)
        draw(axes[0][0] if grid == (1, 1) else list(axes.flat))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def bars(ax, labels: Sequence[str], series: dict[str, Sequence[float]], horizontal: bool = False,
         stacked: bool = False, colours: dict[str, str] | None = None, value_label: str = "",
         annotate: bool = False, legend_below: bool = False) -> None:
    """Grouped (or stacked) bars: one bar per label and series."""
    positions = list(range(len(labels)))
    width = 0.8 if stacked else 0.8 / max(1, len(series))
    base = [0.0] * len(labels)
    for k, (name, values) in enumerate(series.items()):
        offset = 0.0 if stacked else (k - (len(series) - 1) / 2) * width
        where = [p + offset for p in positions]
        colour = (colours or {}).get(name)
        draw = ax.barh if horizontal else ax.bar
        kwargs = {"left" if horizontal else "bottom": base} if stacked else {}
        drawn = draw(where, list(values), width, label=name, color=colour, **kwargs)
        if annotate:
            ax.bar_label(drawn, fmt="{:,.0f}", fontsize=7, padding=2)
        if stacked:
            base = [b + v for b, v in zip(base, values)]
    (ax.set_yticks if horizontal else ax.set_xticks)(positions, list(labels))
    if horizontal:
        ax.invert_yaxis()  # the first label on top
        ax.set_xlabel(value_label)
        ax.grid(axis="y", visible=False)
    else:
        ax.set_ylabel(value_label)
        ax.grid(axis="x", visible=False)
    if len(series) > 1 and legend_below:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22 if horizontal else -0.12), ncol=len(series))
    elif len(series) > 1:
        ax.legend(loc="best")


def boxes(ax, labels: list[str], quantiles: list[list[float]], colours: list[str], value_label: str,
          horizontal: bool = False) -> None:
    """Box plots from quantiles computed elsewhere (the store): [whisker low, q1, median, q3, whisker high]."""
    stats = [{"label": label, "whislo": q[0], "q1": q[1], "med": q[2], "q3": q[3], "whishi": q[4], "fliers": []}
             for label, q in zip(labels, quantiles)]
    drawn = ax.bxp(stats, patch_artist=True, showfliers=False, orientation="horizontal" if horizontal else "vertical",
                   medianprops={"color": "#1d2330"})
    for patch, colour in zip(drawn["boxes"], colours):
        patch.set_facecolor(colour)
    if horizontal:
        ax.invert_yaxis()
        ax.set_xlabel(value_label)
    else:
        ax.set_ylabel(value_label)


def stairs(ax, edges: list[float], series: dict[str, list[int]], xlabel: str, ylabel: str,
           colours: dict[str, str] | None = None) -> None:
    """Histograms binned elsewhere (the store): filled when there is one, outlines when several share the axes."""
    several = len(series) > 1
    for name, counts in series.items():
        ax.stairs(counts, edges, label=name, fill=not several, linewidth=1.5, color=(colours or {}).get(name),
                  alpha=1.0 if several else 0.85)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if several:
        ax.legend(loc="best")


def titled(ax, title: str) -> None:
    ax.set_title(title, loc="left")
