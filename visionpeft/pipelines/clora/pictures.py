"""A picture of CLoRA's masks: each latent position in the colour of the branch whose
mask covers it (the mean colour where masks overlap), scaled to the image, with a legend."""
from __future__ import annotations

import numpy as np
import torch

# branch 0 (the base prompt) grey, the concepts in distinct colours
PALETTE = [(110, 110, 110), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def mask_picture(masks: torch.Tensor, size: tuple[int, int], labels: list[str]):
    """``masks`` (branches, h, w) 0/1; ``size`` (width, height) of the picture without its
    legend; ``labels`` one per branch. Returns a PIL image."""
    from PIL import Image, ImageDraw

    m = masks.float().numpy()
    colours = np.array([PALETTE[b % len(PALETTE)] for b in range(len(m))], dtype=np.float64)
    cover = m.sum(0, keepdims=True)
    rgb = np.einsum("bhw,bc->hwc", m, colours) / np.maximum(cover[0][..., None], 1)
    picture = Image.fromarray(rgb.round().astype(np.uint8)).resize(size, Image.NEAREST)
    line = 14
    out = Image.new("RGB", (size[0], size[1] + line * len(labels)), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for b, text in enumerate(labels):
        y = size[1] + b * line
        draw.rectangle([2, y + 2, 12, y + 12], fill=PALETTE[b % len(PALETTE)])
        draw.text((16, y + 1), text, fill=(0, 0, 0))
    return out
