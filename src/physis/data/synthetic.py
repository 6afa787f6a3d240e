"""Synthetic episodes shaped by an embodiment spec: for loader benchmarks and tests, not for training.

States follow smooth random curves inside the spec's limits, actions are their next-step targets
(or deltas), and every camera renders the first two state dimensions as a bright blob moving over a
smooth background, so that video codecs see the kind of content real cameras give them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from physis.embodiment import EmbodimentSpec


def features_for(spec: EmbodimentSpec, image_size: tuple[int, int] | None = None) -> dict[str, dict[str, Any]]:
    """LeRobot features of a robot: observation.state, action, one video per camera."""
    feats: dict[str, dict[str, Any]] = {
        "observation.state": {"dtype": "float32", "shape": [spec.state_dim], "names": spec.state_names},
        "action": {"dtype": "float32", "shape": [spec.action_dim], "names": spec.action_names},
    }
    for cam in spec.cameras:
        h, w = image_size or (cam.height, cam.width)
        feats[f"observation.images.{cam.name}"] = {"dtype": "video", "shape": [h, w, 3], "names": None}
    return feats


def _smooth_curve(rng: np.random.Generator, length: int, dims: int) -> np.ndarray:
    """(length, dims) in [-1, 1]: a sum of a few random low-frequency sines."""
    t = np.linspace(0, 1, length)[:, None]
    out = np.zeros((length, dims))
    for _ in range(3):
        freq = rng.uniform(0.3, 2.0, dims)
        phase = rng.uniform(0, 2 * np.pi, dims)
        out += rng.uniform(0.2, 0.5, dims) * np.sin(2 * np.pi * freq * t + phase)
    return np.clip(out, -1, 1)


def _scale(unit: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    lo = np.where(np.isfinite(lower), lower, -1.0)
    hi = np.where(np.isfinite(upper), upper, 1.0)
    return lo + (unit + 1) / 2 * (hi - lo)


def render_blob(xy: np.ndarray, height: int, width: int, phase: float = 0.0) -> np.ndarray:
    """(T, 2) positions in [-1, 1] -> (T, H, W, 3) uint8 frames."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx = (xy[:, 0, None, None] + 1) / 2 * (width - 1)
    cy = (xy[:, 1, None, None] + 1) / 2 * (height - 1)
    sigma = max(height, width) / 10
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    background = np.stack([100 + 60 * np.sin(xx / 13 + phase), 110 + 50 * np.cos(yy / 17 + phase),
                           90 + 30 * np.sin((xx + yy) / 21)], -1)
    frames = background[None] + blob[..., None] * np.array([140.0, 120.0, 40.0])
    return np.clip(frames, 0, 255).astype(np.uint8)


def synthetic_episode(spec: EmbodimentSpec, length: int, rng: np.random.Generator,
                      image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    unit = _smooth_curve(rng, length + 1, max(spec.state_dim, 2))
    s_lo, s_hi = spec.state_limits()
    state = _scale(unit[:, : spec.state_dim], s_lo, s_hi)
    a_lo, a_hi = spec.action_limits()
    action_unit = _smooth_curve(rng, length, spec.action_dim)
    action = _scale(action_unit, a_lo, a_hi)
    episode = {"observation.state": state[:length].astype(np.float32), "action": action.astype(np.float32)}
    for i, cam in enumerate(spec.cameras):
        h, w = image_size or (cam.height, cam.width)
        episode[f"observation.images.{cam.name}"] = render_blob(unit[:length, :2], h, w, phase=float(i))
    return episode
