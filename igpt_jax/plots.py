"""PNGs: probe accuracy by layer and along training (matplotlib, no pyplot state: safe in any thread, no display),
and grids of sampled images (Pillow: an image laid out pixel for pixel, not a plot)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

BASELINE_STYLE = {"raw_pixels": ("tab:orange", "--"), "random_init": ("tab:gray", ":")}
POINT = (31, 119, 180)  # the layers' markers (matplotlib's tab:blue), a colour nothing else in the plot has
LINE = (174, 199, 232)  # what joins them


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def _baseline(axes, name: str, value) -> None:
    colour, style = BASELINE_STYLE.get(name, ("tab:green", "-."))
    label = name.replace("_", " ")
    if np.ndim(value) == 0:
        axes.axhline(value, color=colour, linestyle=style, label=label)
    else:
        axes.plot(*value, color=colour, linestyle=style, marker=".", label=label)


def accuracy_by_layer(
    title: str, layers: Sequence[int], accuracies: Sequence[float], baselines: Mapping[str, float]
) -> bytes:
    """Test accuracy (percent) against layer, one marker per layer; each baseline a horizontal line."""
    figure = _figure()
    axes = figure.add_subplot()
    point, line = (tuple(c / 255 for c in rgb) for rgb in (POINT, LINE))
    axes.plot(range(len(layers)), accuracies, color=line, marker="o", mfc=point, mec=point, label="trained")
    for name, value in baselines.items():
        _baseline(axes, name, value)
    axes.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set(title=title, xlabel="layer", ylabel="test accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the axes: it never hides a point
    return _png(figure)


def accuracy_curve(
    title: str,
    steps: Sequence[int],
    layers: Mapping[str, Sequence[float]],
    baselines: Mapping[str, tuple[Sequence[int], Sequence[float]]],
) -> bytes:
    """Test accuracy (percent) against training step: a line per layer (the paper's Figure 3 shape) and a dashed
    one per baseline (steps, accuracies)."""
    figure = _figure()
    axes = figure.add_subplot()
    colours = _layer_colours(len(layers))
    for colour, (layer, accuracies) in zip(colours, layers.items(), strict=True):
        axes.plot(steps, accuracies, marker="o", markersize=3, color=colour, label=f"layer {layer}")
    for name, points in baselines.items():
        _baseline(axes, name, points)
    axes.set(title=title, xlabel="training step", ylabel="test accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", ncols=1 + len(layers) // 16)
    return _png(figure)


def _layer_colours(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["viridis"](i / max(n - 1, 1)) for i in range(n)]


GRID_GAP = 2  # pixels of white between images in a grid


def image_grid(images: np.ndarray, *, scale: int = 1) -> bytes:
    """A PNG of uint8 images [rows, cols, H, W, 3] laid out as a grid, each enlarged `scale` times (nearest
    neighbour: every pixel stays a visible square of one palette colour)."""
    rows, cols, h, w, _ = images.shape
    big = images.repeat(scale, axis=2).repeat(scale, axis=3)
    H, W = h * scale, w * scale
    canvas = np.full((rows * (H + GRID_GAP) + GRID_GAP, cols * (W + GRID_GAP) + GRID_GAP, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = GRID_GAP + r * (H + GRID_GAP), GRID_GAP + c * (W + GRID_GAP)
            canvas[top : top + H, left : left + W] = big[r, c]
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, format="PNG")
    return out.getvalue()
