"""Matplotlib figures of results (returned, never shown; the caller logs them)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def wrapped(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points (a character
    is taken as 0.6 em wide: conservative for the default sans-serif font)."""
    import textwrap
    chars = max(16, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.splitlines() or [""])


def set_title(ax, text: str, fontsize: float = 10):
    """An axes title wrapped to the axes' width (long run titles are never cut at the edges)."""
    fig = ax.get_figure()
    return ax.set_title(wrapped(text, fig.get_figwidth() * ax.get_position().width, fontsize), fontsize=fontsize)


def set_suptitle(fig, text: str, fontsize: float = 10):
    """A figure title wrapped to the figure's width."""
    return fig.suptitle(wrapped(text, fig.get_figwidth() * 0.95, fontsize), fontsize=fontsize)


def legend_outside(ax, **kwargs):
    """The axes' legend to the right of its data area (never over the bars or lines), no frame.

    Call ``fig.tight_layout()`` afterwards: it makes room for the legend inside the canvas."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False,
                     **{"fontsize": 8, **kwargs})


def layer_summary_figure(rows: list[dict], title: str):
    """Grouped bars per layer: pruned fraction of attention, MLP and the whole layer."""
    layers = [r["layer"] for r in rows]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 3.6))
    for k, (key, label) in enumerate((("kept_attn_frac", "attention"), ("kept_mlp_frac", "MLP"),
                                      ("kept_frac", "layer"))):
        ax.bar([x + (k - 1) * width for x in layers], [1 - r[key] for r in rows], width, label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction of parameters pruned")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    set_title(ax, title)
    legend_outside(ax)
    fig.tight_layout()
    return fig
