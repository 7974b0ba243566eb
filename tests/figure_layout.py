"""Layout checks for a logged matplotlib figure: what is drawn fits the canvas and reads well.

``layout_problems(fig)`` returns one line per problem (empty: fine), so a test can assert ``== []``
and see every problem at once:

* the tight bounding box of everything drawn (titles, tick labels, legends) lies inside the
  figure (nothing cut at an edge);
* no legend overlaps the data area of any axes of the figure (legends sit outside the data);
* legend labels are unique (one entry, one colour per series);
* the figure has a title (an axes title or a suptitle).
"""
from __future__ import annotations

TOLERANCE_PX = 1.0


def _overlap(a, b) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > TOLERANCE_PX
            and min(a.y1, b.y1) - max(a.y0, b.y0) > TOLERANCE_PX)


def layout_problems(fig) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas_ = FigureCanvasAgg(fig)        # a closed (already logged) figure has lost its canvas
    canvas_.draw()
    renderer = canvas_.get_renderer()
    problems = []
    canvas = fig.bbox                                             # display pixels
    tight = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)   # inches -> pixels
    if (tight.x0 < -TOLERANCE_PX or tight.y0 < -TOLERANCE_PX or tight.x1 > canvas.x1 + TOLERANCE_PX
            or tight.y1 > canvas.y1 + TOLERANCE_PX):
        problems.append(f"drawn area {tight.bounds} exceeds the canvas {canvas.bounds}")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None] + list(fig.legends)
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for i, ax in enumerate(axes):
            if _overlap(box, ax.get_window_extent(renderer)):
                problems.append(f"a legend overlaps the data area of axes {i}")
        labels = [t.get_text() for t in legend.get_texts()]
        if len(set(labels)) != len(labels):
            problems.append(f"repeated legend labels {labels}")
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    if not suptitle and not any(ax.get_title() for ax in axes):
        problems.append("no title")
    return problems
