"""Synthetic image sets made on the fly, so demos and tests need no downloads."""
from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset


def grating_classes(n: int, num_classes: int = 4, size: int = 32, noise: float = 0.6,
                    seed: int = 0) -> TensorDataset:
    """Images of sinusoidal gratings whose orientation gives the class.

    Phase, frequency and colour vary at random and Gaussian noise is added, so a model
    has to read orientation, not a fixed template. Returns (images (n, 3, size, size),
    labels (n,)).
    """
    if n <= 0 or num_classes < 2:
        raise ValueError(f"need n > 0 and num_classes >= 2, got n={n}, num_classes={num_classes}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    theta = labels.float() * math.pi / num_classes
    freq = 2 * math.pi * (2 + 2 * torch.rand(n, generator=g)) / size
    phase = 2 * math.pi * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    proj = (xx[None] * theta.cos()[:, None, None] + yy[None] * theta.sin()[:, None, None])
    wave = torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    colour = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    images = wave[:, None] * colour + noise * torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(images, labels)
