"""Temporal windows: delta timestamps -> frame offsets, and padding masks at episode edges."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def delta_indices(delta_timestamps: Mapping[str, Sequence[float]], fps: float,
                  tolerance_s: float) -> dict[str, np.ndarray]:
    """{key: seconds} -> {key: frame offsets}; every delta must be a multiple of 1/fps."""
    out = {}
    for key, deltas in delta_timestamps.items():
        d = np.asarray(list(deltas), dtype=np.float64)
        if d.ndim != 1 or len(d) == 0:
            raise ValueError(f"delta_timestamps['{key}']: expected a non-empty list of seconds, got {deltas!r}")
        steps = np.round(d * fps)
        off = np.abs(d - steps / fps)
        if (off > tolerance_s).any():
            bad = d[off > tolerance_s].tolist()
            raise ValueError(
                f"delta_timestamps['{key}']: {bad} are not multiples of 1/fps = {1 / fps:.6f}s "
                f"(within {tolerance_s}s) at {fps} fps"
            )
        out[key] = steps.astype(np.int64)
    return out


def steps_to_seconds(steps: Sequence[int], fps: float) -> list[float]:
    """Frame offsets -> delta timestamps, e.g. an action chunk `range(16)` at the dataset's fps."""
    return [s / fps for s in steps]


def window(row: int, offsets: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a window around `row` inside the episode [start, end), clamped to its edges,
    and the pad mask (True where the window reached past an edge)."""
    rows = row + offsets
    pad = (rows < start) | (rows >= end)
    return np.clip(rows, start, end - 1), pad
