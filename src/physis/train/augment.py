"""Image augmentation for training: random shifts (pad by replicating the border, crop back).

A policy trained from pixels on tens of demonstrations memorizes where things sit in the frame; shifting
each camera's image by a few pixels (DrQ's augmentation, also Diffusion Policy's random crop) makes it
read positions relative to what it sees. One offset per sample and camera moves the history frames and
the world model's future frame together, so the motion between them is unchanged.

Off by default (`--image-shift 0`): on MT10 it did not raise success, and on the point maze, whose fixed
top camera makes a position in the frame a position in the maze, it halved it (docs/benchmarks/model.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, future: torch.Tensor | None, pad: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shift `images` (B, C, T, 3, H, W) and `future` (B, C, 3, H, W) by up to `pad` pixels each way.

    The offsets come from `generator`, so a batch is a pure function of the generator's seed.
    """
    if pad < 0:
        raise ValueError(f"image shift must be >= 0 pixels, got {pad}")
    if pad == 0:
        return images, future
    b, c, t, ch, h, w = images.shape
    if pad >= min(h, w):
        raise ValueError(f"image shift of {pad} px is not smaller than the {h}x{w} image")
    frames = images if future is None else torch.cat([images, future[:, :, None]], dim=2)
    n = frames.shape[2]
    flat = frames.reshape(b * c, n * ch, h, w)
    padded = F.pad(flat, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (b * c, 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(h)  # (B*C, H): the rows each image keeps
    cols = offsets[:, 1, None] + torch.arange(w)
    idx = torch.arange(b * c)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (B*C, H, W, T*3)
    shifted = shifted.permute(0, 3, 1, 2).reshape(b, c, n, ch, h, w)
    if future is None:
        return shifted, None
    return shifted[:, :, :t].contiguous(), shifted[:, :, t].contiguous()
