"""A picture of CLoRA's masks: each latent position in the colour of the branch whose
mask covers it (the mean colour where several do, black where none does), scaled to the
image by nearest neighbour, with a legend giving each branch's share."""
from __future__ import annotations

import numpy as np

BASE_COLOUR = (150, 150, 150)  # branch 0 (the base prompt)
NONE_COLOUR = (0, 0, 0)  # latent positions no branch's mask covers


def branch_colours(n: int) -> np.ndarray:
    """(n, 3) colours of the branches: grey for the base, then the segmentation palette."""
    from visionpeft.pipelines.segmentation.render import PALETTE

    concept = np.delete(PALETTE, 7, axis=0)  # its grey is the base's
    return np.array([BASE_COLOUR] + [concept[k % len(concept)] for k in range(n - 1)], dtype=np.float32)


def mask_picture(masks, size: tuple[int, int], labels: list[str]):
    """masks (branches, h, w) of 0/1 -> a PIL picture, ``size`` (W, H) on top: each latent
    position in the colour of the branch whose mask covers it (the mean colour where several
    do, black where none does), upsampled by nearest neighbour; a legend below."""
    from PIL import Image, ImageDraw

    m = np.asarray(masks, dtype=np.float32) > 0.5
    colours = branch_colours(len(m))
    count = m.sum(0)
    rgb = np.einsum("bhw,bc->hwc", m.astype(np.float32), colours) / np.maximum(count, 1)[..., None]
    rgb[count == 0] = NONE_COLOUR
    width, height = size
    top = Image.fromarray(np.rint(rgb).astype(np.uint8)).resize((width, height), Image.NEAREST)
    rows = [(tuple(int(c) for c in colours[b]), f"{labels[b]} {100 * m[b].mean():.0f}%") for b in range(len(m))]
    if (count > 1).any():
        rows.append((None, f"mixed colour: several masks {100 * (count > 1).mean():.0f}%"))
    if (count == 0).any():
        rows.append((NONE_COLOUR, f"no mask {100 * (count == 0).mean():.0f}%"))
    row = 14  # as the segmentation overlay's legend
    canvas = Image.new("RGB", (max(width, 240), height + row * len(rows) + 4), "white")
    canvas.paste(top, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (colour, text) in enumerate(rows):
        y = height + 2 + i * row
        if colour is not None:
            draw.rectangle([2, y + 1, 12, y + 11], fill=colour, outline="black")
        draw.text((16, y), text, fill="black")
    return canvas
