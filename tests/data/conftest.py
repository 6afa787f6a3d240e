"""A small dataset written by physis's own writer, shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from physis.data.synthetic import render_blob
from physis.data.writer import DatasetWriter

FPS = 20
SIZE = 32
LENGTHS = (12, 9, 15)


def features() -> dict:
    return {
        "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]},
        "observation.images.top": {"dtype": "video", "shape": [SIZE, SIZE, 3], "names": None},
    }


def make_episode(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = np.clip(np.cumsum(rng.normal(0, 0.1, (length, 2)), 0), -1, 1)
    return {
        "observation.state": rng.normal(size=(length, 3)).astype(np.float32),
        "action": rng.normal(size=(length, 2)).astype(np.float32),
        "observation.images.top": render_blob(xy, SIZE, SIZE, phase=seed),
    }


def write(root: Path, lengths=LENGTHS, subtasks: bool = True, **kwargs) -> list[dict[str, np.ndarray]]:
    episodes = [make_episode(n, seed) for seed, n in enumerate(lengths)]
    with DatasetWriter.create(root, fps=FPS, features=features(), robot_type="test", subtasks=subtasks,
                              **kwargs) as w:
        for i, ep in enumerate(episodes):
            n = len(ep["action"])
            labels = ["reach"] * (n // 2) + ["grasp"] * (n - n // 2) if subtasks else None
            w.add_episode(ep, task=f"task {i % 2}", subtasks=labels)
    return episodes


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("ds") / "dataset"
    return root, write(root)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))
