"""The two pictures of a calibration: per-layer scores (bar chart) and the depth x depth heatmap.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global backend).
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _subtitle(scores) -> str:
    data = scores.data or {}
    tokens = data.get("n_tokens")
    return f"{scores.model}, {tokens:,} calibration tokens" if tokens else str(scores.model)


def plot_layer_scores(scores, path: str | os.PathLike) -> Path:
    """Bar chart per layer: BI and angular distance (top), attention and MLP sublayer BI (bottom).

    The y axes are logarithmic: the first layers usually score 10-100x the middle ones, and on a
    linear axis the differences that decide which layers to prune would be invisible.
    """
    import numpy as np

    layers = np.arange(scores.num_layers)
    fig = _figure(max(8.0, 0.32 * scores.num_layers + 3), 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    panels = [
        (top, [("Block Influence (1 - cos)", scores.bi, "tab:blue"),
               ("angular distance (arccos/pi)", scores.angular, "tab:orange")]),
        (bottom, [("attention sublayer BI", scores.attn_bi, "tab:green"),
                  ("MLP sublayer BI", scores.mlp_bi, "tab:red")]),
    ]
    width = 0.4
    for ax, series in panels:
        for k, (label, values, color) in enumerate(series):
            values = np.asarray(values, dtype=float)
            ax.bar(layers + (k - 0.5) * width, np.where(values > 0, values, np.nan), width,
                   label=label, color=color)
        ax.set_yscale("log")
        ax.set_ylabel("score (log scale)")
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    bottom.set_xlabel("layer")
    bottom.set_xticks(layers)
    top.set_title(f"Per-layer redundancy: low scores mark layers that change the hidden state least\n"
                  f"{_subtitle(scores)}", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


def plot_similarity_heatmap(scores, path: str | os.PathLike) -> Path:
    """Angular distance between h_start and h_{start+n} for every start and span n (Gromov et al. Fig. 1)."""
    import numpy as np

    table = np.array([[math.nan if v is None else v for v in row] for row in scores.span_angular], dtype=float)
    fig = _figure(7.5, 6.0)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(table), origin="lower", aspect="auto", cmap="viridis",
                      extent=(0.5, scores.max_span + 0.5, -0.5, scores.num_layers - 0.5))
    fig.colorbar(image, ax=ax, label="angular distance arccos(cos)/pi")
    ax.set_xlabel("n: layers spanned (h_start vs h_start+n)")
    ax.set_ylabel("start layer")
    ax.set_title(f"Depth x depth similarity: dark = the span could be removed cheaply\n{_subtitle(scores)}",
                 fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path
