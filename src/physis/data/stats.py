"""Feature statistics (streaming) and the normalizers that use them.

Stats per feature, as LeRobot stores them in `meta/stats.json`: min, max, mean, std, count and the
quantiles q01, q10, q50, q90, q99. Vectors get one value per dimension; cameras one per channel with
shape (3, 1, 1), in [0, 1]. A normalizer refuses to build or run for a feature without stats: it never
silently passes data through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STAT_NAMES = ("min", "max", "mean", "std", "count", *QUANTILES)
NORM_MODES = ("mean_std", "min_max", "quantile", "identity")
EPS = 1e-8


def image_values(frames: np.ndarray, max_pixels: int = 4096) -> np.ndarray:
    """(N, H, W, 3) uint8 frames -> (M, 3) float values in [0, 1], spatially subsampled."""
    n, h, w, c = frames.shape
    stride = max(1, int(np.sqrt(h * w / max_pixels)))
    return frames[:, ::stride, ::stride, :].reshape(-1, c).astype(np.float64) / 255.0


def compute_stats(values: np.ndarray, is_image: bool = False) -> dict[str, np.ndarray]:
    """Exact stats over axis 0 of `values` (N, D) (or (N,) for scalars)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if len(x) == 0:
        raise ValueError("cannot compute statistics of an empty feature")
    stats = {
        "min": x.min(0),
        "max": x.max(0),
        "mean": x.mean(0),
        "std": x.std(0),
        "count": np.array([len(x)], dtype=np.int64),
    }
    for name, q in zip(QUANTILES, np.quantile(x, list(QUANTILES.values()), axis=0), strict=True):
        stats[name] = q
    return _shape_images(stats) if is_image else stats


def _shape_images(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v if k == "count" else v.reshape(-1, 1, 1)) for k, v in stats.items()}


class RunningStats:
    """Streaming stats of one feature: exact min/max/mean/std (Chan's parallel update) and quantiles
    from a uniform reservoir sample (exact while fewer than `reservoir` rows have been seen)."""

    def __init__(self, reservoir: int = 50_000, seed: int = 0, is_image: bool = False):
        self.is_image = is_image
        self.capacity = reservoir
        self._rng = np.random.default_rng(seed)
        self.count = 0
        self._mean = self._m2 = self._min = self._max = self._sample = None

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        n = len(x)
        if n == 0:
            return
        mean, m2 = x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
        if self.count == 0:
            self._mean, self._m2, self._min, self._max = mean, m2, x.min(0), x.max(0)
            self._sample = x[: self.capacity].copy()
            seen = len(self._sample)
        else:
            total = self.count + n
            delta = mean - self._mean
            self._mean = self._mean + delta * n / total
            self._m2 = self._m2 + m2 + delta**2 * self.count * n / total
            self._min, self._max = np.minimum(self._min, x.min(0)), np.maximum(self._max, x.max(0))
            seen = 0
            room = self.capacity - len(self._sample)
            if room > 0:
                self._sample = np.concatenate([self._sample, x[:room]])
                seen = min(room, n)
        if seen < n:  # reservoir sampling (algorithm R) for the rest
            positions = self._rng.integers(0, self.count + np.arange(seen, n) + 1)
            keep = positions < self.capacity
            self._sample[positions[keep]] = x[seen:][keep]
        self.count += n

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no values were added")
        stats = {
            "min": self._min,
            "max": self._max,
            "mean": self._mean,
            "std": np.sqrt(np.maximum(self._m2 / self.count, 0.0)),
            "count": np.array([self.count], dtype=np.int64),
        }
        for name, q in zip(QUANTILES, np.quantile(self._sample, list(QUANTILES.values()), axis=0), strict=True):
            stats[name] = q
        return _shape_images(stats) if self.is_image else stats


def stats_to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, list]]:
    return {f: {s: np.asarray(v).tolist() for s, v in st.items()} for f, st in stats.items()}


def stats_from_json(data: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    return {f: {s: np.asarray(v, dtype=np.float64) for s, v in st.items()} for f, st in data.items()}


def merge_stats(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pool stats of disjoint parts: exact min/max/mean/std/count; quantiles as count-weighted means
    (an approximation; exact quantiles need the values)."""
    counts = np.array([float(np.asarray(p["count"]).reshape(-1)[0]) for p in parts])
    w = counts / counts.sum()
    shape = np.asarray(parts[0]["mean"]).shape
    wk = w.reshape(-1, *([1] * len(shape)))
    means = np.stack([np.asarray(p["mean"]) for p in parts])
    mean = (wk * means).sum(0)
    var = (wk * (np.stack([np.asarray(p["std"]) for p in parts]) ** 2 + (means - mean) ** 2)).sum(0)
    out = {
        "min": np.min(np.stack([np.asarray(p["min"]) for p in parts]), 0),
        "max": np.max(np.stack([np.asarray(p["max"]) for p in parts]), 0),
        "mean": mean,
        "std": np.sqrt(var),
        "count": np.array([int(counts.sum())], dtype=np.int64),
    }
    for q in ("q01", "q10", "q50", "q90", "q99"):
        if all(q in p for p in parts):
            out[q] = (wk * np.stack([np.asarray(p[q]) for p in parts])).sum(0)
    return out


class NormalizationError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Normalizer:
    """Maps features to a normalized range and back; a `dict -> dict` transform.

    modes: feature -> "mean_std" ((x - mean) / std), "min_max" (to [-1, 1]), "quantile"
    (q01..q99 to [-1, 1]) or "identity". Construction fails for a feature without the stats its
    mode needs, and a call fails for a sample that lacks a feature: nothing is skipped silently.
    """

    def __init__(self, stats: Mapping[str, Mapping[str, Any]], modes: Mapping[str, str]):
        self.modes = dict(modes)
        self._params: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # feature -> (shift, scale)
        for feature, mode in self.modes.items():
            if mode not in NORM_MODES:
                raise ValueError(f"feature '{feature}': unknown normalization mode {mode!r}; use one of {NORM_MODES}")
            if mode == "identity":
                continue
            if feature not in stats:
                raise NormalizationError(
                    f"feature '{feature}' has no statistics, so it cannot be normalized with '{mode}'; "
                    f"stats exist for {sorted(stats)}"
                )
            need = {"mean_std": ("mean", "std"), "min_max": ("min", "max"), "quantile": ("q01", "q99")}[mode]
            missing = [s for s in need if s not in stats[feature]]
            if missing:
                raise NormalizationError(f"feature '{feature}': '{mode}' needs stats {missing}, which are missing")
            a, b = (np.asarray(stats[feature][s], dtype=np.float32) for s in need)
            if mode == "mean_std":
                shift, scale = a, np.maximum(b, EPS)
            else:  # map [a, b] to [-1, 1]
                shift, scale = (a + b) / 2, np.maximum((b - a) / 2, EPS)
            self._params[feature] = (shift, scale.astype(np.float32))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self._apply(sample, inverse=False)

    def unnormalize(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self._apply(sample, inverse=True)

    def _apply(self, sample: dict[str, Any], inverse: bool) -> dict[str, Any]:
        out = dict(sample)
        for feature, (shift, scale) in self._params.items():
            if feature not in sample:
                raise NormalizationError(
                    f"sample has no feature '{feature}' to normalize; it has {sorted(sample)}"
                )
            x = sample[feature]
            s, c = _like(shift, x), _like(scale, x)
            out[feature] = x * c + s if inverse else (x - s) / c
        return out


def _like(param: np.ndarray, x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return param.astype(x.dtype if x.dtype.kind == "f" else np.float32)
    import torch

    return torch.as_tensor(param, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
