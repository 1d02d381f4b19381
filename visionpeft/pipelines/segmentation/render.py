"""A class map drawn over its image, with a legend: what predict-seg and the demo show."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# distinct, colour-blind-friendlier colours (Okabe-Ito first, then Tableau), cycled
PALETTE = np.array([(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
                    (213, 94, 0), (204, 121, 167), (120, 120, 120), (148, 103, 189), (140, 86, 75),
                    (188, 189, 34), (23, 190, 207)], dtype=np.float32)


def class_colours(n: int) -> np.ndarray:
    return PALETTE[np.arange(n) % len(PALETTE)]


def colour_overlay(image: np.ndarray, mask: np.ndarray, classes: list[str], alpha: float = 0.5) -> Image.Image:
    """image (H, W, 3) in [0, 1], mask (H, W) of class indices -> RGB image: the classes
    blended in colour over the image, and a legend strip below naming each class with its
    colour and share of the area."""
    h, w = mask.shape
    colours = class_colours(len(classes))
    blend = (1 - alpha) * image * 255 + alpha * colours[np.clip(mask, 0, len(classes) - 1)]
    row = 14  # legend row height (PIL's default bitmap font is about 11 px tall)
    canvas = Image.new("RGB", (max(w, 160), h + row * len(classes) + 4), "white")
    canvas.paste(Image.fromarray(blend.clip(0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    shares = np.bincount(mask.ravel(), minlength=len(classes))[:len(classes)] / max(mask.size, 1) * 100
    for i, (name, share) in enumerate(zip(classes, shares)):
        y = h + 2 + i * row
        draw.rectangle([2, y + 1, 12, y + 11], fill=tuple(int(c) for c in colours[i]), outline="black")
        draw.text((16, y), f"{name} {share:.1f}%", fill="black")
    return canvas
