"""A streaming writer of LeRobot v3.0 datasets: episode by episode, committed atomically.

    with DatasetWriter.create("data/drawer", fps=80, features=features, robot_type="metaworld_sawyer") as w:
        w.add_episode({"observation.state": s, "action": a, "observation.images.corner": frames},
                      task="open the drawer", subtasks=labels)

Everything goes into a staging directory beside the target; leaving the `with` block normally swaps
it in (see `atomic.py`), an exception discards it. `DatasetWriter.append(root)` adds episodes to an
existing dataset the same way: new episodes go to new files, the old files are hard-linked, so a
crash leaves the previous dataset untouched.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from physis.data import atomic, layout
from physis.data.layout import DatasetFormatError
from physis.data.stats import (
    RunningStats,
    compute_stats,
    image_values,
    merge_stats,
    stats_from_json,
    stats_to_json,
)
from physis.data.video import EncoderConfig, VideoEncoder, canonical_codec, encoder_for_codec

log = logging.getLogger(__name__)

_DEFAULT_COLUMNS = tuple(layout.DEFAULT_FEATURES)


def _arrow_type(feature: Mapping[str, Any]) -> pa.DataType:
    base = pa.from_numpy_dtype(np.dtype(feature["dtype"]))
    shape = feature["shape"]
    if shape == [1]:
        return base
    if len(shape) == 1:
        return pa.list_(base, shape[0])
    raise DatasetFormatError(f"features of shape {shape} are not supported in the data parquet; flatten them")


def _image_stride(length: int, target: int = 100) -> int:
    return max(1, length // target)


class DatasetWriter:
    """Use `DatasetWriter.create(...)` or `DatasetWriter.append(root)`; then `add_episode`; then leave the
    `with` block (or call `finalize()`)."""

    def __init__(self, root: Path, staging: Path, info: dict[str, Any], encoder: EncoderConfig,
                 existing: dict[str, Any] | None = None):
        self.root, self.staging, self.info, self.encoder = root, staging, info, encoder
        self.fps = int(info["fps"])
        self.features: dict[str, dict[str, Any]] = info["features"]
        self.video_keys = layout.video_keys(self.features)
        written_here = {*self.video_keys, *_DEFAULT_COLUMNS, "subtask_index"}  # not passed in by the caller
        self.data_keys = [k for k in self.features if k not in written_here]
        self.has_subtasks = "subtask_index" in self.features
        self._schema = pa.schema([(k, _arrow_type(f)) for k, f in self.features.items() if f["dtype"] != "video"])
        ex = existing or {}
        self.tasks: dict[str, int] = dict(ex.get("tasks", {}))
        self.subtasks: dict[str, int] = dict(ex.get("subtasks", {}))
        self.total_episodes = int(info["total_episodes"])
        self.total_frames = int(info["total_frames"])
        self._previous_stats = ex.get("stats")
        self._stats = {k: RunningStats(is_image=k in self.video_keys, seed=i)
                       for i, k in enumerate(self.features)}
        self._frames_sampled = dict.fromkeys(self.video_keys, 0)
        self._episode_rows: list[dict[str, Any]] = []
        chunks = int(info["chunks_size"])
        # Where the next file of each stream goes: new files after any existing ones.
        self._data_pos = ex.get("next_data", (0, 0))
        self._video_pos = {k: ex.get("next_video", {}).get(k, (0, 0)) for k in self.video_keys}
        self._episodes_pos = ex.get("next_episodes", (0, 0))
        self._chunks = chunks
        self._data_file = self._data_sink = None
        self._encoders: dict[str, VideoEncoder] = {}
        self._done = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, root: str | Path, fps: int, features: Mapping[str, Mapping[str, Any]],
               robot_type: str | None = None, subtasks: bool = False, overwrite: bool = False,
               encoder: EncoderConfig | None = None, data_files_size_in_mb: int = layout.DATA_FILE_SIZE_MB,
               video_files_size_in_mb: int = layout.VIDEO_FILE_SIZE_MB) -> DatasetWriter:
        """A new dataset at `root`. `features` maps names to {"dtype", "shape", "names"}; cameras have
        dtype "video" and shape [H, W, 3]. The default LeRobot columns are added for you."""
        root = Path(root)
        if root.exists() and not overwrite:
            raise FileExistsError(f"{root}: already exists; pass overwrite=True or use DatasetWriter.append")
        if int(fps) != fps or fps <= 0:
            raise ValueError(f"fps must be a positive integer (LeRobot stores it as int), got {fps}")
        encoder = encoder or EncoderConfig()
        full: dict[str, dict[str, Any]] = {}
        for name, feat in features.items():
            full[name] = cls._check_feature(name, dict(feat), int(fps), encoder)
        if subtasks:
            full.update(layout.SUBTASK_FEATURE)
        full.update(layout.DEFAULT_FEATURES)
        info = layout.make_info(int(fps), full, robot_type, 0, 0, 0,
                                data_files_size_in_mb=data_files_size_in_mb,
                                video_files_size_in_mb=video_files_size_in_mb)
        staging = atomic.staging_dir(root)
        staging.mkdir(parents=True)
        return cls(root, staging, info, encoder)

    @staticmethod
    def _check_feature(name: str, feat: dict[str, Any], fps: int, encoder: EncoderConfig) -> dict[str, Any]:
        if name in layout.DEFAULT_FEATURES or name == "subtask_index":
            raise ValueError(f"feature '{name}' is written by the writer itself; do not declare it")
        dtype, shape = feat.get("dtype"), feat.get("shape")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"feature '{name}': shape must be a list of positive ints, got {shape!r}")
        if dtype == "video":
            if len(shape) != 3 or shape[2] != 3:
                raise ValueError(f"feature '{name}': a video has shape [height, width, 3], got {list(shape)}")
            if shape[0] % 2 or shape[1] % 2:
                raise ValueError(f"feature '{name}': video height and width must be even for yuv420p, got {shape}")
            return layout.video_feature(shape[0], shape[1], fps, canonical_codec(encoder.codec), encoder.pix_fmt,
                                        encoder.info_fields())
        if dtype not in layout.NUMERIC_DTYPES:
            allowed = ("video", *layout.NUMERIC_DTYPES)
            raise ValueError(f"feature '{name}': dtype must be one of {allowed}, got {dtype!r}")
        if len(shape) != 1:
            raise ValueError(f"feature '{name}': numeric features are vectors, shape [n]; got {list(shape)}")
        return {"dtype": dtype, "shape": list(shape), "names": feat.get("names")}

    @classmethod
    def append(cls, root: str | Path, encoder: EncoderConfig | None = None) -> DatasetWriter:
        """Add episodes to an existing v3.0 dataset; the result is committed atomically."""
        from physis.data.reader import read_episodes_table  # reader imports nothing from here

        root = Path(root)
        atomic.recover(root)
        info = layout.check_info(layout.read_json(root / layout.INFO_PATH), root / layout.INFO_PATH)
        if info["codebase_version"] != layout.CODEBASE_VERSION:
            raise DatasetFormatError(f"{root}: can only append to {layout.CODEBASE_VERSION} datasets")
        episodes = read_episodes_table(root)
        chunks = int(info["chunks_size"])
        existing: dict[str, Any] = {
            "tasks": _read_index(root / layout.TASKS_PATH, "task"),
            "stats": stats_from_json(layout.read_json(root / layout.STATS_PATH)),
        }
        if (root / layout.SUBTASKS_PATH).is_file():
            existing["subtasks"] = _read_index(root / layout.SUBTASKS_PATH, "subtask")
        if len(episodes):
            last = episodes.slice(len(episodes) - 1).to_pylist()[0]
            existing["next_data"] = layout.next_chunk_file(last["data/chunk_index"], last["data/file_index"], chunks)
            existing["next_episodes"] = layout.next_chunk_file(
                last["meta/episodes/chunk_index"], last["meta/episodes/file_index"], chunks)
            existing["next_video"] = {
                k: layout.next_chunk_file(last[f"videos/{k}/chunk_index"], last[f"videos/{k}/file_index"], chunks)
                for k in layout.video_keys(info["features"])
            }
        staging = atomic.staging_dir(root)
        atomic.hardlink_tree(root, staging)
        enc = encoder or EncoderConfig(codec=_encoder_name(info))
        return cls(root, staging, info, enc, existing)

    # ------------------------------------------------------------------ writing

    def add_episode(self, frames: Mapping[str, np.ndarray], task: str | Sequence[str],
                    subtasks: Sequence[str] | None = None) -> int:
        """Append one episode: arrays of shape (T, ...) for every declared feature. Returns its index."""
        if self._done:
            raise RuntimeError("this writer is finalized; open a new one with DatasetWriter.append")
        length = self._check_episode(frames)
        tasks = [task] * length if isinstance(task, str) else list(task)
        if len(tasks) != length or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"task: expected one non-empty string or {length} of them, got {len(tasks)}")
        if self.has_subtasks != (subtasks is not None):
            raise ValueError("subtasks: this dataset was created "
                             + ("with subtask labels; pass one per frame" if self.has_subtasks else
                                "without subtask labels; create it with subtasks=True"))
        episode_index, start = self.total_episodes, self.total_frames
        columns: dict[str, np.ndarray] = {}
        for key in self.data_keys:
            columns[key] = np.asarray(frames[key], dtype=self.features[key]["dtype"]).reshape(length, -1)
        if self.has_subtasks:
            if len(subtasks) != length:
                raise ValueError(f"subtasks: expected {length} labels (one per frame), got {len(subtasks)}")
            columns["subtask_index"] = np.array([self.subtasks.setdefault(s, len(self.subtasks)) for s in subtasks])
        frame_index = np.arange(length, dtype=np.int64)
        columns["timestamp"] = (frame_index / self.fps).astype(np.float32)
        columns["frame_index"] = frame_index
        columns["episode_index"] = np.full(length, episode_index, dtype=np.int64)
        columns["index"] = start + frame_index
        columns["task_index"] = np.array([self.tasks.setdefault(t, len(self.tasks)) for t in tasks], dtype=np.int64)

        row: dict[str, Any] = {"episode_index": episode_index, "tasks": list(dict.fromkeys(tasks)), "length": length}
        row.update(self._write_data(columns, length))
        row["dataset_from_index"], row["dataset_to_index"] = start, start + length
        for key in self.video_keys:
            row.update(self._write_video(key, np.asarray(frames[key])))
        for key, values in columns.items():
            self._stats[key].update(values)
            row.update({f"stats/{key}/{s}": v.tolist() for s, v in compute_stats(values).items()})
        for key in self.video_keys:
            video = np.asarray(frames[key])[:: _image_stride(length)]
            pixels = image_values(video)
            self._stats[key].update(pixels)
            self._frames_sampled[key] += len(video)
            stats = compute_stats(pixels, is_image=True)
            stats["count"] = np.array([len(video)])  # LeRobot counts sampled frames, not pixels
            row.update({f"stats/{key}/{s}": v.tolist() for s, v in stats.items()})
        self._episode_rows.append(row)
        self.total_episodes += 1
        self.total_frames += length
        return episode_index

    def _check_episode(self, frames: Mapping[str, np.ndarray]) -> int:
        declared = set(self.data_keys) | set(self.video_keys)
        missing, extra = sorted(declared - set(frames)), sorted(set(frames) - declared)
        if missing or extra:
            raise ValueError(f"episode features do not match the dataset: missing {missing}, unexpected {extra}")
        lengths = {k: len(frames[k]) for k in declared}
        length = next(iter(lengths.values()))
        if length == 0 or len(set(lengths.values())) != 1:
            raise ValueError(f"every feature needs the same, non-zero number of frames; got {lengths}")
        for key in self.data_keys:
            want = self.features[key]["shape"][0]
            shape = np.shape(frames[key])
            if not (shape[1:] == (want,) or (want == 1 and len(shape) == 1)):
                raise ValueError(f"feature '{key}': expected shape ({length}, {want}), got {shape}")
        for key in self.video_keys:
            arr = frames[key]
            want = (length, *self.features[key]["shape"])
            if arr.shape != want or arr.dtype != np.uint8:
                raise ValueError(f"camera '{key}': expected {want} uint8 frames (RGB), got {arr.shape} {arr.dtype}")
        return length

    def _write_data(self, columns: dict[str, np.ndarray], length: int) -> dict[str, int]:
        limit = self.info["data_files_size_in_mb"] * 1024**2
        if self._data_sink is not None and self._data_file.tell() >= limit:
            self._close_data()
            self._data_pos = layout.next_chunk_file(*self._data_pos, self._chunks)
        if self._data_sink is None:
            path = self.staging / layout.DATA_PATH.format(chunk_index=self._data_pos[0], file_index=self._data_pos[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_file = open(path, "wb")  # noqa: SIM115 (closed in _close_data)
            self._data_sink = pq.ParquetWriter(self._data_file, self._schema, compression="snappy")
        arrays = []
        for field in self._schema:
            values = columns[field.name]
            if pa.types.is_fixed_size_list(field.type):
                flat = pa.array(values.reshape(-1), type=field.type.value_type)
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
            else:
                arrays.append(pa.array(values.reshape(-1), type=field.type))
        self._data_sink.write_table(pa.Table.from_arrays(arrays, schema=self._schema))
        return {"data/chunk_index": self._data_pos[0], "data/file_index": self._data_pos[1]}

    def _close_data(self) -> None:
        if self._data_sink is not None:
            self._data_sink.close()
            self._data_file.close()
            self._data_sink = self._data_file = None

    def _write_video(self, key: str, frames: np.ndarray) -> dict[str, Any]:
        enc = self._encoders.get(key)
        if enc is not None and enc.bytes >= self.info["video_files_size_in_mb"] * 1024**2:
            enc.close()
            enc = None
            self._video_pos[key] = layout.next_chunk_file(*self._video_pos[key], self._chunks)
        chunk, file = self._video_pos[key]
        if enc is None:
            path = self.staging / layout.VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            h, w, _ = self.features[key]["shape"]
            enc = self._encoders[key] = VideoEncoder(path, self.fps, h, w, self.encoder)
        start = enc.frames
        for frame in frames:
            enc.add(frame)
        return {
            f"videos/{key}/chunk_index": chunk,
            f"videos/{key}/file_index": file,
            f"videos/{key}/from_timestamp": start / self.fps,
            f"videos/{key}/to_timestamp": enc.frames / self.fps,
        }

    # ------------------------------------------------------------------ finishing

    def write_meta_json(self, name: str, obj: Any) -> None:
        """An extra file `meta/<name>` (JSON), committed with the rest; LeRobot readers ignore it."""
        if "/" in name or not name.endswith(".json") or name in ("info.json", "stats.json"):
            raise ValueError(f"extra meta files are plain *.json names other than info/stats, got {name!r}")
        layout.write_json_atomic(self.staging / "meta" / name, obj)

    def finalize(self) -> Path:
        """Close every file, write the meta files and swap the staging directory in."""
        if self._done:
            return self.root
        self._close_data()
        for enc in self._encoders.values():
            enc.close()
        self._write_episodes_meta()
        _write_index(self.staging / layout.TASKS_PATH, "task", self.tasks)
        if self.has_subtasks:
            _write_index(self.staging / layout.SUBTASKS_PATH, "subtask", self.subtasks)
        stats = {k: s.result() for k, s in self._stats.items() if s.count}
        for key, frames in self._frames_sampled.items():
            if key in stats:
                stats[key]["count"] = np.array([frames])
        if self._previous_stats:
            stats = {k: merge_stats([self._previous_stats[k], v]) if k in self._previous_stats else v
                     for k, v in stats.items()} if stats else self._previous_stats
        layout.write_json_atomic(self.staging / layout.STATS_PATH, stats_to_json(stats))
        self.info.update(total_episodes=self.total_episodes, total_frames=self.total_frames,
                         total_tasks=len(self.tasks))
        self.info["splits"] = {"train": f"0:{self.total_episodes}"} if self.total_episodes else {}
        layout.write_json_atomic(self.staging / layout.INFO_PATH, self.info)
        atomic.commit(self.staging, self.root)
        self._done = True
        log.info("wrote %s: %d episodes, %d frames", self.root, self.total_episodes, self.total_frames)
        return self.root

    def abort(self) -> None:
        """Discard everything written since this writer opened; the previous dataset is untouched."""
        self._close_data()
        for enc in self._encoders.values():
            with contextlib.suppress(Exception):  # the files are being thrown away
                enc.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._done = True

    def _write_episodes_meta(self) -> None:
        if not self._episode_rows:
            return
        chunk, file = self._episodes_pos
        for row in self._episode_rows:
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = chunk, file
        table = pa.Table.from_pylist(self._episode_rows)
        path = self.staging / layout.EPISODES_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="snappy")

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _write_index(path: Path, column: str, index: Mapping[str, int]) -> None:
    """tasks.parquet / subtasks.parquet: `<column>_index` (int64) and the string `<column>`."""
    import pandas as pd  # the ecosystem reads this file with pandas: the string is the frame's index

    items = sorted(index.items(), key=lambda kv: kv[1])
    frame = pd.DataFrame({f"{column}_index": np.array([i for _, i in items], dtype=np.int64)},
                         index=pd.Index([s for s, _ in items], name=column))
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)


def _read_index(path: Path, column: str) -> dict[str, int]:
    from physis.data.reader import read_parquet

    table = read_parquet(path, [f"{column}_index", column])
    return dict(zip(table[column].to_pylist(), table[f"{column}_index"].to_pylist(), strict=True))


def _encoder_name(info: Mapping[str, Any]) -> str:
    """Keep appending with the codec the dataset already uses."""
    for key in layout.video_keys(info["features"]):
        codec = info["features"][key].get("info", {}).get("video.codec")
        if codec:
            return encoder_for_codec(codec)
    return EncoderConfig().codec

