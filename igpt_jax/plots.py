"""Small PNGs drawn with Pillow (no plotting library needed on a TPU VM): probe accuracy against layer, and grids of
sampled images."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 180, 40, 50  # margins: axis labels left and below, the legend on the right
POINT = (31, 119, 180)  # the layers' accuracies: one filled circle each, this colour nowhere else in the plot area
LINE = (174, 199, 232)  # what joins them
BASELINE_COLOURS = ((255, 127, 14), (127, 127, 127), (44, 160, 44))


def accuracy_by_layer(
    title: str, layers: Sequence[int], accuracies: Sequence[float], baselines: Mapping[str, float]
) -> bytes:
    """A PNG: one filled circle per layer at its test accuracy, each baseline a horizontal line, all in percent."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    values = [*accuracies, *baselines.values()]
    low, high = max(0.0, min(values) - 5), min(100.0, max(values) + 5)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    span = max(len(layers) - 1, 1)

    def x(i: int) -> float:
        return x0 + 20 + (x1 - x0 - 40) * i / span

    def y(value: float) -> float:
        return y1 - (y1 - y0) * (value - low) / max(high - low, 1e-9)

    draw.rectangle([x0, y0, x1, y1], outline="black")
    for k in range(6):  # horizontal grid and accuracy ticks
        value = low + (high - low) * k / 5
        draw.line([x0, y(value), x1, y(value)], fill=(225, 225, 225))
        draw.text((8, y(value) - 6), f"{value:5.1f}%", fill="black")
    for i, layer in enumerate(layers):
        draw.text((x(i) - 4, y1 + 6), str(layer), fill="black")
    draw.text(((x0 + x1) / 2 - 15, y1 + 24), "layer", fill="black")
    draw.text((x0, 12), title, fill="black")
    for value, colour in zip(baselines.values(), BASELINE_COLOURS, strict=False):
        draw.line([x0, y(value), x1, y(value)], fill=colour, width=2)
    points = [(x(i), y(a)) for i, a in enumerate(accuracies)]
    if len(points) > 1:
        draw.line(points, fill=LINE, width=1)
    for px, py in points:
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=POINT)
    legend = [("trained", POINT), *zip(baselines, BASELINE_COLOURS, strict=False)]
    for k, (name, colour) in enumerate(legend):
        draw.rectangle([x1 + 15, y0 + 10 + 22 * k, x1 + 35, y0 + 20 + 22 * k], fill=colour)
        draw.text((x1 + 42, y0 + 8 + 22 * k), name.replace("_", " "), fill="black")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


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
