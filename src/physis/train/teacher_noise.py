"""Noisy teacher values: the environment state the localizer teacher feeds, moved by a few centimetres.

With `--localizer-teacher`, a fraction of the training rows feeds the action expert the true environment state
in place of the localizer's estimate. The expert then learns that the token is exact and follows it: in closed
loop, where the estimate is a few centimetres off, it lowers the hand beside the object although the hand camera
shows the miss. Moving each fed position by a random displacement (`--localizer-teacher-noise`, metres) makes
the token a hint the demonstrated actions do not always agree with, so the expert has to read the last
centimetres from the images. The localizer's own target stays exact.

A displacement moves a world-frame position and its robot-relative counterparts together (the same object, seen
from the same hand), on each value's own normalization and, for the near-field values, through their tanh.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from physis.data.relative import NEAR_SUFFIX, RELATIVE_SUFFIX

CLAMP = 5.0  # as the training batches clamp the normalized environment state


class TeacherNoise:
    """Displaces the world-frame positions of a normalized environment state, with their relative counterparts."""

    def __init__(self, names: Sequence[str], mean: np.ndarray, std: np.ndarray, sigma: float, near: float = 0.0):
        """names: the environment-state values (world-frame, then "-robot" and "-robot-near" counterparts);
        mean/std: their normalization; sigma: the displacement's standard deviation per axis, in the data's
        units (m); near: the near-field scale of the "-robot-near" values."""
        names = list(names)
        if not (sigma > 0 and np.isfinite(sigma)):
            raise ValueError(f"the teacher noise must be a positive distance, got {sigma}")
        if len(mean) != len(names) or len(std) != len(names):
            raise ValueError(f"environment-state stats have {len(mean)} values, the names {len(names)}")
        self.sigma = float(sigma)
        self.near = float(near)
        self.mean = torch.as_tensor(np.asarray(mean, np.float32))
        self.std = torch.as_tensor(np.maximum(np.asarray(std, np.float32), 1e-6))
        self.world = [i for i, n in enumerate(names) if not n.endswith((RELATIVE_SUFFIX, NEAR_SUFFIX))]
        world_names = [names[i] for i in self.world]
        # (column, index among the world values) of each counterpart
        self.linear = [(col, j) for j, col in enumerate(self.world)]
        self.linear += [(names.index(n + RELATIVE_SUFFIX), j) for j, n in enumerate(world_names)
                        if n + RELATIVE_SUFFIX in names]
        self.tanh = [(names.index(n + NEAR_SUFFIX), j) for j, n in enumerate(world_names) if n + NEAR_SUFFIX in names]
        if self.tanh and not near > 0:
            raise ValueError("near-field values (NAME-robot-near) need their near-field scale")

    def __call__(self, env_state: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """env_state (B, E) normalized -> the same with each row's positions displaced (B, E)."""
        b, width = env_state.shape
        out = env_state.clone().float()
        mean, std = self.mean[:width], self.std[:width]  # narrower rows (another robot's) are padded, not read
        shift = torch.randn(b, len(self.world), generator=generator) * self.sigma
        for col, j in self.linear:
            if col < width:
                out[:, col] += shift[:, j] / std[col]
        for col, j in self.tanh:
            if col < width:
                native = (out[:, col] * std[col] + mean[col]).clamp(-1 + 1e-6, 1 - 1e-6)
                moved = torch.tanh(torch.atanh(native) + shift[:, j] / self.near)
                out[:, col] = (moved - mean[col]) / std[col]
        return out.clamp(-CLAMP, CLAMP).to(env_state.dtype)
