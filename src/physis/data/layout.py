"""The LeRobot v3.0 on-disk layout: path templates, default features and `meta/info.json`.

    meta/info.json  meta/stats.json  meta/tasks.parquet  [meta/subtasks.parquet]
    meta/episodes/chunk-000/file-000.parquet     one row per episode
    data/chunk-000/file-000.parquet              one row per frame, many episodes per file
    videos/<camera key>/chunk-000/file-000.mp4   many episodes per file, back to back

Files roll over by size; `chunks_size` files make a chunk directory. Our one addition is the
per-frame `subtask_index` column and `meta/subtasks.parquet`, which other readers ignore.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

CODEBASE_VERSION = "v3.0"
LEGACY_VERSION = "v2.1"

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
SUBTASKS_PATH = "meta/subtasks.parquet"
COLLECTION_META = "collection.json"  # physis's own meta/ file: how `physis collect` made the episodes
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"

CHUNKS_SIZE = 1000
DATA_FILE_SIZE_MB = 100
VIDEO_FILE_SIZE_MB = 200

# Columns every LeRobot dataset carries, in this order.
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
SUBTASK_FEATURE = {"subtask_index": {"dtype": "int64", "shape": [1], "names": None}}
NUMERIC_DTYPES = ("float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


class DatasetFormatError(ValueError):
    """A dataset on disk does not follow the layout; the message names the file and the problem."""


def next_chunk_file(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) after this one: a chunk directory holds `chunks_size` files."""
    return (chunk_index + 1, 0) if file_index + 1 >= chunks_size else (chunk_index, file_index + 1)


def video_keys(features: dict[str, Any]) -> list[str]:
    return [k for k, f in features.items() if f.get("dtype") == "video"]


def video_feature(height: int, width: int, fps: int, codec: str, pix_fmt: str, encoder: dict[str, Any]) -> dict:
    """The features entry of a camera stored as mp4 (shape in HWC order, as LeRobot writes it)."""
    info = {
        "video.height": height,
        "video.width": width,
        "video.codec": codec,
        "video.pix_fmt": pix_fmt,
        "video.is_depth_map": False,
        "video.fps": fps,
        "video.channels": 3,
        "has_audio": False,
    }
    info.update({f"video.{k}": v for k, v in encoder.items()})
    return {"dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"], "info": info}


def make_info(
    fps: int,
    features: dict[str, Any],
    robot_type: str | None,
    total_episodes: int,
    total_frames: int,
    total_tasks: int,
    chunks_size: int = CHUNKS_SIZE,
    data_files_size_in_mb: int = DATA_FILE_SIZE_MB,
    video_files_size_in_mb: int = VIDEO_FILE_SIZE_MB,
) -> dict[str, Any]:
    return {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": total_episodes,
        "total_frames": total_frames,
        "total_tasks": total_tasks,
        "chunks_size": chunks_size,
        "data_files_size_in_mb": data_files_size_in_mb,
        "video_files_size_in_mb": video_files_size_in_mb,
        "fps": fps,
        "splits": {"train": f"0:{total_episodes}"} if total_episodes else {},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if video_keys(features) else None,
        "features": features,
    }


def read_collection_meta(root: str | Path) -> dict[str, Any] | None:
    """A dataset's meta/collection.json (how `physis collect` made it), or None for datasets it did not make."""
    path = Path(root) / "meta" / COLLECTION_META
    return read_json(path) if path.is_file() else None


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e})") from e


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; metadata is meant to be read by others
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=4, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_info(info: Any, path: Path) -> dict[str, Any]:
    """Validate `meta/info.json` of either supported version; returns it unchanged."""
    if not isinstance(info, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object, got {type(info).__name__}")
    version = info.get("codebase_version")
    if version not in (CODEBASE_VERSION, LEGACY_VERSION):
        raise DatasetFormatError(
            f"{path}: codebase_version {version!r} is not supported; physis reads "
            f"{CODEBASE_VERSION!r} and {LEGACY_VERSION!r}"
        )
    required = ["fps", "features", "total_episodes", "total_frames", "total_tasks", "chunks_size", "data_path"]
    missing = [k for k in required if k not in info]
    if missing:
        raise DatasetFormatError(f"{path}: missing key(s) {missing}")
    for key in ("fps", "chunks_size"):
        if not isinstance(info[key], (int, float)) or info[key] <= 0:
            raise DatasetFormatError(f"{path}: '{key}' must be a positive number, got {info[key]!r}")
    features = info["features"]
    if not isinstance(features, dict):
        raise DatasetFormatError(f"{path}: 'features' must be an object")
    for name, feat in features.items():
        if not isinstance(feat, dict) or "dtype" not in feat or "shape" not in feat:
            raise DatasetFormatError(f"{path}: feature '{name}' needs 'dtype' and 'shape', got {feat!r}")
        if not isinstance(feat["shape"], list) or not all(isinstance(s, int) and s > 0 for s in feat["shape"]):
            raise DatasetFormatError(f"{path}: feature '{name}' shape must be a list of positive ints")
    for name in DEFAULT_FEATURES:
        if name not in features:
            raise DatasetFormatError(f"{path}: feature '{name}' is missing (every LeRobot dataset has it)")
    if video_keys(features) and not info.get("video_path"):
        raise DatasetFormatError(f"{path}: features include videos but 'video_path' is empty")
    return info
