"""`physis bench data`: training windows per second through a torch DataLoader.

A window is what a policy trains on: 2 history frames of 2 cameras (96x96, from mp4), the state
history and a 16-step action chunk, with pad masks. The dataset is synthetic (shaped like Meta-World's
Sawyer) and written by physis's own writer; frames are decoded from its mp4 files.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from physis.data.reader import LeRobotDataset
from physis.data.synthetic import features_for, synthetic_episode
from physis.data.writer import DatasetWriter
from physis.embodiment import load_embodiment


@dataclass(frozen=True)
class DataBenchConfig:
    out: Path = Path("outputs/bench-data")
    """Where the benchmark dataset, its frame cache and results.json go."""
    episodes: int = 50
    episode_length: int = 100
    image_size: int = 96
    history: int = 2
    chunk: int = 16
    batch_size: int = 64
    workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    batches: int = 100
    """Batches timed after warm-up."""
    seek_batches: int = 5
    """Batches timed with per-sample seeking instead of the frame cache (0 to skip)."""
    seed: int = 0


def build_dataset(cfg: DataBenchConfig) -> Path:
    root = cfg.out / "dataset"
    marker = cfg.out / "dataset.json"
    wanted = {"episodes": cfg.episodes, "episode_length": cfg.episode_length, "image_size": cfg.image_size,
              "seed": cfg.seed}
    if root.is_dir() and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    spec = load_embodiment("metaworld_sawyer")
    size = (cfg.image_size, cfg.image_size)
    rng = np.random.default_rng(cfg.seed)
    from rich.progress import track

    with DatasetWriter.create(root, fps=int(spec.fps), features=features_for(spec, size),
                              robot_type=spec.name, overwrite=True) as writer:
        for _ in track(range(cfg.episodes), description="writing benchmark dataset"):
            writer.add_episode(synthetic_episode(spec, cfg.episode_length, rng, size), task="benchmark task")
    marker.write_text(json.dumps(wanted))
    return root


def _time_loader(ds: LeRobotDataset, cfg: DataBenchConfig, batches: int) -> dict[str, float]:
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
    it = iter(loader)
    warmup = min(3, batches)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += len(batch["index"])
    seconds = time.perf_counter() - t0
    return {"windows": n, "seconds": seconds, "windows_per_s": n / seconds}


def run(cfg: DataBenchConfig) -> dict[str, Any]:
    root = build_dataset(cfg)
    fps = load_embodiment("metaworld_sawyer").fps
    history = [(k - cfg.history + 1) / fps for k in range(cfg.history)]
    deltas = {"observation.images.corner": history, "observation.images.gripper": history,
              "observation.state": history, "action": [k / fps for k in range(cfg.chunk)]}
    cache = cfg.out / "frame-cache"
    shutil.rmtree(cache, ignore_errors=True)
    ds = LeRobotDataset(root, delta_timestamps=deltas, video_mode="cache", cache_dir=cache)
    t0 = time.perf_counter()
    ds.prepare_frames()
    decode_s = time.perf_counter() - t0
    sample = ds[0]
    as_uint8 = LeRobotDataset(root, delta_timestamps=deltas, video_mode="cache", cache_dir=cache, image_dtype="uint8")
    result: dict[str, Any] = {
        "benchmark": "data",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "dataset": {"episodes": len(ds.episodes), "frames": len(ds), "cameras": ds.video_keys,
                    "window_shapes": {k: list(v.shape) for k, v in sample.items() if hasattr(v, "shape")}},
        "decode_into_cache_s": decode_s,
        "cached": _time_loader(ds, cfg, cfg.batches),
        "cached_uint8": _time_loader(as_uint8, cfg, cfg.batches),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": date.today().isoformat(),
    }
    if cfg.seek_batches:
        seek = LeRobotDataset(root, delta_timestamps=deltas, video_mode="seek")
        result["seek"] = _time_loader(seek, cfg, cfg.seek_batches)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=2))
    return result
