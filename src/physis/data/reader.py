"""Read LeRobot datasets (v3.0, and v2.1 through `v21.py`) with random access by global frame index.

    ds = LeRobotDataset("data/drawer", delta_timestamps={"action": [i / 80 for i in range(16)]})
    sample = ds[123]   # dict of tensors; cameras (T, C, H, W) float32 in [0, 1]; `action_is_pad`

Numeric columns are loaded into memory once (they are small); camera frames come from the mp4 files,
decoded once into a frame cache (`video.FrameCache`) or, for datasets too large to cache, by seeking.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from physis.data import layout
from physis.data.layout import DatasetFormatError
from physis.data.stats import stats_from_json
from physis.data.video import DEFAULT_TOLERANCE_S, FrameCache, decode_at
from physis.data.windows import delta_indices, window

log = logging.getLogger(__name__)

VideoMode = Literal["auto", "cache", "seek"]
CACHE_LIMIT_GB = 16.0  # "auto" caches decoded frames up to this size, else seeks


def read_parquet(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: parquet file is missing")
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetFormatError(f"{path}: cannot read parquet (truncated or corrupt?): {e}") from e


def read_episodes_table(root: Path) -> pa.Table:
    """All rows of meta/episodes/*/*.parquet, ordered by episode_index (stats columns dropped)."""
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        return pa.table({"episode_index": pa.array([], pa.int64())})
    tables = []
    for f in files:
        t = read_parquet(f)
        tables.append(t.select([c for c in t.column_names if not c.startswith("stats/")]))
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by("episode_index")


def column_to_numpy(column: pa.ChunkedArray, width: int, where: str) -> np.ndarray:
    """A parquet column -> (N,) for scalars or (N, width) for fixed or variable-size lists."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type) or pa.types.is_large_list(arr.type):
        flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
        if flat.size != len(arr) * width:
            per_row = flat.size / max(len(arr), 1)
            raise DatasetFormatError(f"{where}: expected {width} values per row, found {per_row:g}")
        return flat.reshape(len(arr), width)
    values = arr.to_numpy(zero_copy_only=False)
    return values.reshape(len(arr), 1) if width != 1 else values


@dataclass
class Episode:
    index: int
    length: int
    start: int  # first row in this reader (rows of selected episodes, in order)
    tasks: list[str]
    videos: dict[str, tuple[Path, float]]  # camera -> (mp4 file, from_timestamp)


@dataclass
class LoadedDataset:
    """What a layout loader hands the reader, whatever the version on disk."""

    info: dict[str, Any]
    columns: dict[str, np.ndarray]
    episodes: list[Episode]
    tasks: list[str]
    subtasks: list[str] | None
    stats: dict[str, dict[str, np.ndarray]]


def load_v30(root: Path, info: dict[str, Any]) -> LoadedDataset:
    ep = read_episodes_table(root)
    n_ep = len(ep)
    if n_ep != info["total_episodes"]:
        raise DatasetFormatError(
            f"{root / layout.INFO_PATH}: total_episodes is {info['total_episodes']} but meta/episodes holds {n_ep}")
    rows = ep.to_pylist()
    features = info["features"]
    vkeys = layout.video_keys(features)
    for i, r in enumerate(rows):
        if r["episode_index"] != i:
            raise DatasetFormatError(f"{root}/meta/episodes: episode indices must be 0..{n_ep - 1}; row {i} is {r}")
    data_files = list(dict.fromkeys((r["data/chunk_index"], r["data/file_index"]) for r in rows))
    tables = []
    for chunk, file in data_files:
        tables.append(read_parquet(root / info["data_path"].format(chunk_index=chunk, file_index=file)))
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    columns = _columns(table, features, root / "data") if table is not None else {}
    episodes, start = [], 0
    for r in rows:
        videos = {}
        for k in vkeys:
            path = root / info["video_path"].format(video_key=k, chunk_index=r[f"videos/{k}/chunk_index"],
                                                    file_index=r[f"videos/{k}/file_index"])
            videos[k] = (path, float(r[f"videos/{k}/from_timestamp"]))
        episodes.append(Episode(r["episode_index"], int(r["length"]), start, list(r.get("tasks") or []), videos))
        start += int(r["length"])
        if r["dataset_to_index"] - r["dataset_from_index"] != r["length"]:
            raise DatasetFormatError(f"{root}/meta/episodes: episode {r['episode_index']} has length {r['length']} "
                                     f"but index range [{r['dataset_from_index']}, {r['dataset_to_index']})")
    tasks = _read_strings(root / layout.TASKS_PATH, "task")
    subtasks = _read_strings(root / layout.SUBTASKS_PATH, "subtask") if "subtask_index" in features else None
    stats_path = root / layout.STATS_PATH
    stats = stats_from_json(layout.read_json(stats_path)) if stats_path.is_file() else {}
    return LoadedDataset(info, columns, episodes, tasks, subtasks, stats)


def _read_strings(path: Path, column: str) -> list[str]:
    """tasks.parquet / subtasks.parquet -> strings ordered by their index."""
    table = read_parquet(path)
    if column not in table.column_names or f"{column}_index" not in table.column_names:
        raise DatasetFormatError(f"{path}: expected columns '{column}_index' and '{column}', got {table.column_names}")
    order = np.argsort(table[f"{column}_index"].to_numpy())
    strings = table[column].to_pylist()
    return [strings[i] for i in order]


def _columns(table: pa.Table, features: Mapping[str, Any], where: Path) -> dict[str, np.ndarray]:
    columns = {}
    for name, feat in features.items():
        if feat["dtype"] in ("video", "image", "string", "language"):
            continue
        if name not in table.column_names:
            raise DatasetFormatError(f"{where}: column '{name}' (declared in info.json) is missing from the data")
        width = int(np.prod(feat["shape"]))
        # a writable copy: arrow buffers are read-only and torch warns on those
        columns[name] = np.array(column_to_numpy(table[name], width, f"{where} column '{name}'"))
    return columns


class LeRobotDataset(torch.utils.data.Dataset):
    """A LeRobot v3.0 / v2.1 dataset; `ds[i]` is frame i (0..len-1) of the selected episodes."""

    def __init__(self, root: str | Path, delta_timestamps: Mapping[str, Sequence[float]] | None = None,
                 episodes: Sequence[int] | None = None, tolerance_s: float = DEFAULT_TOLERANCE_S,
                 video_mode: VideoMode = "auto", cache_dir: str | Path | None = None,
                 image_dtype: Literal["float32", "uint8"] = "float32"):
        self.root = Path(root)
        info_path = self.root / layout.INFO_PATH
        info = layout.check_info(layout.read_json(info_path), info_path)
        if info["codebase_version"] == layout.LEGACY_VERSION:
            from physis.data.v21 import load_v21

            loaded = load_v21(self.root, info)
        else:
            loaded = load_v30(self.root, info)
        self.info, self.stats, self.tasks, self.subtasks = loaded.info, loaded.stats, loaded.tasks, loaded.subtasks
        self.features: dict[str, dict[str, Any]] = info["features"]
        self.fps = float(info["fps"])
        self.tolerance_s = tolerance_s
        self.image_dtype = image_dtype
        self.video_keys = layout.video_keys(self.features)
        self._select(loaded, episodes)
        self._check_frames()
        self._check_videos_exist()
        self.delta_timestamps = dict(delta_timestamps or {})
        unknown = sorted(set(self.delta_timestamps) - set(self.features))
        if unknown:
            raise ValueError(f"delta_timestamps: unknown feature(s) {unknown}; features are {sorted(self.features)}")
        self._offsets = delta_indices(self.delta_timestamps, self.fps, tolerance_s)
        self.video_mode = self._choose_video_mode(video_mode)
        self._cache = FrameCache(Path(cache_dir) if cache_dir else None) if self.video_mode == "cache" else None

    # ------------------------------------------------------------------ loading

    def _select(self, loaded: LoadedDataset, episodes: Sequence[int] | None) -> None:
        all_eps = loaded.episodes
        if episodes is None:
            chosen = all_eps
            self.columns = loaded.columns
        else:
            by_index = {e.index: e for e in all_eps}
            missing = sorted(set(episodes) - set(by_index))
            if missing:
                raise IndexError(f"{self.root}: episodes {missing} do not exist (it has {len(all_eps)})")
            chosen = [by_index[i] for i in sorted(set(episodes))]
            rows = np.concatenate([np.arange(e.start, e.start + e.length) for e in chosen]) if chosen else []
            self.columns = {k: v[rows] for k, v in loaded.columns.items()}
        self.episodes: list[Episode] = []
        start = 0
        for e in chosen:
            self.episodes.append(Episode(e.index, e.length, start, e.tasks, e.videos))
            start += e.length
        self.num_frames = start
        lengths = np.array([e.length for e in self.episodes], dtype=np.int64)
        self._row_episode = np.repeat(np.arange(len(self.episodes)), lengths)
        starts = np.array([e.start for e in self.episodes], dtype=np.int64)
        self._ep_start, self._ep_end = starts, starts + lengths

    def _check_frames(self) -> None:
        n = len(self.columns.get("index", []))
        if n != self.num_frames:
            raise DatasetFormatError(
                f"{self.root}/data: holds {n} frames but the episodes metadata lists {self.num_frames}")
        if n == 0:
            return
        ep_col = self.columns["episode_index"]
        expected = np.repeat([e.index for e in self.episodes], [e.length for e in self.episodes])
        if not np.array_equal(ep_col, expected):
            row = int(np.argmax(ep_col != expected))
            raise DatasetFormatError(f"{self.root}/data: row {row} belongs to episode {ep_col[row]}, "
                                     f"the episodes metadata says {expected[row]}")
        ts = self.columns["timestamp"].astype(np.float64)
        fi = self.columns["frame_index"]
        off = np.abs(ts - fi / self.fps)
        if (off > max(self.tolerance_s, 1e-4)).any():
            row = int(np.argmax(off > max(self.tolerance_s, 1e-4)))
            raise DatasetFormatError(
                f"{self.root}/data: timestamps are out of sync with fps {self.fps:g}: episode {ep_col[row]} frame "
                f"{fi[row]} has timestamp {ts[row]:.6f}s, expected {fi[row] / self.fps:.6f}s")

    def _check_videos_exist(self) -> None:
        for e in self.episodes:
            for key, (path, _) in e.videos.items():
                if not path.is_file():
                    raise DatasetFormatError(f"{path}: video file of camera '{key}' (episode {e.index}) is missing")

    def _choose_video_mode(self, mode: VideoMode) -> str:
        if mode != "auto":
            return mode
        size = sum(self.num_frames * int(np.prod(self.features[k]["shape"])) for k in self.video_keys)
        return "cache" if size <= CACHE_LIMIT_GB * 1024**3 else "seek"

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self.num_frames <= i < self.num_frames:
            raise IndexError(f"frame {i} is out of range for a dataset of {self.num_frames} frames")
        i = int(i) % self.num_frames
        ep_pos = int(self._row_episode[i])
        start, end = int(self._ep_start[ep_pos]), int(self._ep_end[ep_pos])
        item: dict[str, Any] = {}
        for key, values in self.columns.items():
            if key in self._offsets:
                rows, pad = window(i, self._offsets[key], start, end)
                item[key] = torch.from_numpy(np.ascontiguousarray(values[rows]))
                item[f"{key}_is_pad"] = torch.from_numpy(pad)
            else:
                item[key] = torch.as_tensor(values[i])
        episode = self.episodes[ep_pos]
        for key in self.video_keys:
            if key in self._offsets:
                rows, pad = window(i, self._offsets[key], start, end)
                item[key] = self._frames(episode, key, rows)
                item[f"{key}_is_pad"] = torch.from_numpy(pad)
            else:
                item[key] = self._frames(episode, key, np.array([i]))[0]
        item["task"] = self.tasks[int(self.columns["task_index"][i])]
        if self.subtasks is not None:
            item["subtask"] = self.subtasks[int(self.columns["subtask_index"][i])]
        return item

    def _frames(self, episode: Episode, key: str, rows: np.ndarray) -> torch.Tensor:
        """(T, C, H, W) frames of one camera at the given rows."""
        path, from_ts = episode.videos[key]
        times = from_ts + self.columns["timestamp"][rows].astype(np.float64)
        if self._cache is not None:
            frames = self._cache.frames_at(path, times, self.tolerance_s)
        else:
            frames = decode_at(path, times, self.tolerance_s)
        t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        return t.float().div_(255.0) if self.image_dtype == "float32" else t

    # ------------------------------------------------------------------ helpers

    def episode_of(self, i: int) -> Episode:
        return self.episodes[int(self._row_episode[i])]

    def prepare_frames(self, progress: bool = False) -> None:
        """Decode every video into the frame cache now (else it happens on first access)."""
        if self._cache is None:
            return
        files = sorted({p for e in self.episodes for p, _ in e.videos.values()})
        if progress:
            from rich.progress import track

            files = track(files, description="decoding videos")
        for path in files:
            self._cache.get(path)

    def __repr__(self) -> str:
        return (f"LeRobotDataset({self.root}, {self.info['codebase_version']}, {len(self.episodes)} episodes, "
                f"{self.num_frames} frames at {self.fps:g} fps, cameras {self.video_keys})")
