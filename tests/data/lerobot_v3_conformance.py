"""Independent, strict checker of the LeRobot v3.0 on-disk dataset layout.

The rules below are derived from the LeRobot v3.0 format description (written from LeRobot's own source:
``lerobot/datasets/*``, ``configs/video.py``, ``utils/constants.py``), *not* from physis. This module
deliberately imports nothing from ``physis`` so that it can catch writer bugs instead of mirroring them. It
only uses pyarrow, pandas, numpy, json and PyAV.

Entry point: :func:`check_lerobot_v3` returns a list of human-readable violations (empty list = conformant).
:func:`read_episode_video` decodes one episode of one camera the way a LeRobot reader locates it (via the
episode's row in ``meta/episodes`` and ``info.video_path``), which tests use to compare against the frames
that were written.

Extensions are tolerated: extra features declared in ``info.json`` (e.g. ``subtask_index``) are checked
like any other feature, extra files anywhere under ``meta/`` (e.g. ``meta/subtasks.parquet``) and unknown
extra keys in ``info.json`` / ``stats.json`` / the episodes table are ignored.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CODEBASE_VERSION = "v3.0"
DEFAULT_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
DEFAULT_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"

DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
V21_ONLY_INFO_KEYS = ("total_chunks", "total_videos")
REQUIRED_INFO_KEYS = (
    "codebase_version",
    "fps",
    "features",
    "total_episodes",
    "total_frames",
    "total_tasks",
    "chunks_size",
    "data_files_size_in_mb",
    "video_files_size_in_mb",
    "data_path",
    "video_path",
    "robot_type",
    "splits",
)
REQUIRED_STATS = ("min", "max", "mean", "std", "count")
QUANTILE_STATS = ("q01", "q10", "q50", "q90", "q99")
VIDEO_NAMES = ["height", "width", "channels"]
# dtypes without numeric statistics (optional language columns are skipped entirely)
NON_NUMERIC_DTYPES = {"string", "language"}
VISUAL_DTYPES = {"video", "image"}

TIMESTAMP_TOL_S = 1e-4  # LeRobot's default decoding tolerance_s
DURATION_TOL_S = 1e-3
STATS_RTOL = 1e-4
STATS_ATOL = 1e-6
VIDEO_MEAN_TOL = 0.05  # decoded (lossy) pixel means vs stored per-channel mean, in [0,1] units

_EPISODES_RE = re.compile(r"^meta/episodes/chunk-(\d{3,})/file-(\d{3,})\.parquet$")
_DATA_RE = re.compile(r"^data/chunk-(\d{3,})/file-(\d{3,})\.parquet$")
_VIDEO_RE = re.compile(r"^videos/(.+)/chunk-(\d{3,})/file-(\d{3,})\.mp4$")


# --------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _roll(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    """LeRobot's update_chunk_file_indices."""
    return (chunk + 1, 0) if file == chunks_size - 1 else (chunk, file + 1)


def _is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_string_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _numpy_leaf_type(dtype: str) -> pa.DataType | None:
    try:
        return pa.from_numpy_dtype(np.dtype(dtype))
    except (TypeError, pa.ArrowNotImplementedError):
        return None


def _feature_kind(ft: dict[str, Any]) -> str:
    dtype = ft.get("dtype")
    if dtype in VISUAL_DTYPES:
        return "visual"
    if dtype in NON_NUMERIC_DTYPES:
        return "text"
    return "numeric"


def _arrow_type_problem(t: pa.DataType, dtype: str, shape: list[int]) -> str | None:
    """Expected arrow type of a data-parquet column for a feature (HF datasets mapping, spec section 6)."""
    if dtype == "image":
        names = (
            {t.field(i).name: t.field(i).type for i in range(t.num_fields)} if pa.types.is_struct(t) else {}
        )
        ok = (
            "bytes" in names
            and (pa.types.is_binary(names["bytes"]) or pa.types.is_large_binary(names["bytes"]))
            and "path" in names
            and _is_string_type(names["path"])
        )
        return None if ok else f"expected struct<bytes: binary, path: string>, found {t}"
    if dtype == "string":
        return None if _is_string_type(t) else f"expected string, found {t}"
    leaf = _numpy_leaf_type(dtype)
    if leaf is None:
        return f"unsupported dtype {dtype!r}"
    dims = [] if list(shape) == [1] else list(shape)
    cur = t
    for d in dims:
        if pa.types.is_fixed_size_list(cur):
            if cur.list_size != d:
                return f"expected list of length {d}, found {t}"
        elif not (pa.types.is_list(cur) or pa.types.is_large_list(cur)):
            what = f"fixed_size_list<{leaf}>[{d}] (or list<{leaf}>)" if len(dims) == 1 else "nested lists"
            return f"expected {what} for shape {shape}, found {t}"
        cur = cur.value_type
    if cur != leaf:
        return f"expected element type {leaf} for dtype {dtype!r} shape {shape}, found {t}"
    return None


def _column_to_numpy(arr: pa.Array, shape: list[int]) -> tuple[np.ndarray | None, str | None]:
    """(N, *shape) float64/int array from a scalar / (nested) list column, validating list lengths."""
    if arr.null_count:
        return None, f"{arr.null_count} null value(s)"
    dims = [] if list(shape) == [1] else list(shape)
    n = len(arr)
    cur = arr
    for d in dims:
        if not pa.types.is_fixed_size_list(cur.type):
            lengths = pc.list_value_length(cur).to_numpy(zero_copy_only=False)
            if lengths.size and not np.all(lengths == d):
                bad = int(np.flatnonzero(lengths != d)[0])
                return None, f"list length {int(lengths[bad])} at row {bad}, expected {d}"
        cur = cur.flatten()
        if cur.null_count:
            return None, f"{cur.null_count} null element(s)"
    values = cur.to_numpy(zero_copy_only=False)
    return values.reshape((n, *dims)) if dims else values.reshape(n), None


def _read_table(path: Path) -> tuple[pa.Table | None, str | None]:
    try:
        return pq.read_table(path), None
    except Exception as exc:  # noqa: BLE001 - any read failure is a violation
        return None, f"{type(exc).__name__}: {exc}"


def _nearest(times: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of sorted ``times`` for each query."""
    if len(times) == 1:
        return np.zeros(len(queries), dtype=int)
    j = np.clip(np.searchsorted(times, queries), 1, len(times) - 1)
    return np.where(np.abs(times[j - 1] - queries) <= np.abs(times[j] - queries), j - 1, j)


def _fmt(x: Any) -> str:
    a = np.asarray(x)
    return np.array2string(a, precision=6, threshold=12) if a.ndim else repr(a.item())


# --------------------------------------------------------------------------------------------------------
# the checker
# ----------------------------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.errors: list[str] = []
        self.info: dict[str, Any] = {}
        self.fps: int | None = None
        self.chunks_size: int = 1000
        self.features: dict[str, dict[str, Any]] = {}
        self.video_keys: list[str] = []
        self.tasks: list[str] | None = None
        self.episodes: list[dict[str, Any]] | None = None  # non-stats columns, one dict per row
        self.ep_stats: list[dict[str, dict[str, np.ndarray]]] = []  # per row: feature -> stat -> array
        # per feature: per episode data array (filled by the data check), for stats cross-checks
        self.ep_data: dict[str, dict[int, np.ndarray]] = {}
        # per video key: per episode decoded per-frame channel means (L, 3) in [0,1]
        self.ep_video_means: dict[str, dict[int, np.ndarray]] = {}

    def err(self, msg: str) -> None:
        self.errors.append(msg)

    # -----------------------------------------------------------------------------------------------------
    def run(self) -> list[str]:
        if not self.root.is_dir():
            return [f"{self.root}: dataset root is not a directory"]
        if not self._check_info():
            return self.errors
        self._check_features()
        self._check_tasks()
        self._check_episodes()
        if self.episodes is not None:
            self._check_data()
            self._check_videos()
            self._check_episode_stats()
        self._check_stats_json()
        self._check_stray_files()
        return self.errors

    # ------------------------------------------------------------------------------------------------ info
    def _check_info(self) -> bool:
        path = self.root / INFO_PATH
        if not path.is_file():
            self.err(f"{INFO_PATH}: missing")
            return False
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.err(f"{INFO_PATH}: not valid JSON ({exc})")
            return False
        if not isinstance(info, dict):
            self.err(f"{INFO_PATH}: top level must be an object, found {type(info).__name__}")
            return False
        self.info = info
        for key in REQUIRED_INFO_KEYS:
            if key not in info:
                self.err(f"{INFO_PATH}: missing required key {key!r}")
        for key in V21_ONLY_INFO_KEYS:
            if key in info:
                self.err(f"{INFO_PATH}: v2.1-only key {key!r} must not be present in a v3.0 dataset")

        if "codebase_version" in info and info["codebase_version"] != CODEBASE_VERSION:
            self.err(
                f"{INFO_PATH}: codebase_version: expected {CODEBASE_VERSION!r}, "
                f"found {info['codebase_version']!r}"
            )
        fps = info.get("fps")
        if "fps" in info:
            if not _is_int(fps) or fps <= 0:
                self.err(f"{INFO_PATH}: fps: expected int > 0, found {fps!r}")
            else:
                self.fps = fps
        for key in ("total_episodes", "total_frames", "total_tasks"):
            if key in info and (not _is_int(info[key]) or info[key] < 0):
                self.err(f"{INFO_PATH}: {key}: expected int >= 0, found {info[key]!r}")
        if "chunks_size" in info:
            cs = info["chunks_size"]
            if not _is_int(cs) or cs <= 0:
                self.err(f"{INFO_PATH}: chunks_size: expected int > 0, found {cs!r}")
            else:
                self.chunks_size = cs
        for key in ("data_files_size_in_mb", "video_files_size_in_mb"):
            if key in info and (not _is_number(info[key]) or info[key] <= 0):
                self.err(f"{INFO_PATH}: {key}: expected number > 0, found {info[key]!r}")
        if "data_path" in info and info["data_path"] != DEFAULT_DATA_PATH:
            self.err(f"{INFO_PATH}: data_path: expected {DEFAULT_DATA_PATH!r}, found {info['data_path']!r}")
        if "robot_type" in info and not (info["robot_type"] is None or isinstance(info["robot_type"], str)):
            self.err(f"{INFO_PATH}: robot_type: expected string or null, found {info['robot_type']!r}")
        if "tools" in info and not isinstance(info["tools"], list):
            self.err(f"{INFO_PATH}: tools: expected a list, found {type(info['tools']).__name__}")

        splits = info.get("splits")
        total_eps = info.get("total_episodes")
        if "splits" in info:
            if not isinstance(splits, dict):
                self.err(f"{INFO_PATH}: splits: expected an object, found {splits!r}")
            elif _is_int(total_eps):
                if total_eps > 0 and splits.get("train") != f"0:{total_eps}":
                    self.err(
                        f"{INFO_PATH}: splits['train']: expected '0:{total_eps}', "
                        f"found {splits.get('train')!r}"
                    )
                for name, rng in splits.items():
                    m = re.fullmatch(r"(\d+):(\d+)", rng) if isinstance(rng, str) else None
                    if m is None or not (0 <= int(m.group(1)) <= int(m.group(2)) <= total_eps):
                        self.err(
                            f"{INFO_PATH}: splits[{name!r}]: expected 'a:b' with "
                            f"0<=a<=b<={total_eps}, found {rng!r}"
                        )

        features = info.get("features")
        if not isinstance(features, dict) or not features:
            self.err(f"{INFO_PATH}: features: expected a non-empty object, found {features!r}")
            return False
        self.features = {k: v for k, v in features.items() if isinstance(v, dict)}
        self.video_keys = [k for k, v in self.features.items() if v.get("dtype") == "video"]
        if "video_path" in info:
            vp = info["video_path"]
            if self.video_keys and vp != DEFAULT_VIDEO_PATH:
                self.err(f"{INFO_PATH}: video_path: expected {DEFAULT_VIDEO_PATH!r}, found {vp!r}")
            elif not self.video_keys and vp not in (None, DEFAULT_VIDEO_PATH):
                self.err(f"{INFO_PATH}: video_path: expected null (no video features), found {vp!r}")
        return self.fps is not None

    # -------------------------------------------------------------------------------------------- features
    def _check_features(self) -> None:
        where = f"{INFO_PATH}: features"
        for key, ft in self.info["features"].items():
            if not isinstance(ft, dict):
                self.err(f"{where}[{key!r}]: expected an object, found {ft!r}")
                continue
            for field in ("dtype", "shape", "names"):
                if field not in ft:
                    self.err(f"{where}[{key!r}]: missing {field!r}")
            dtype, shape, names = ft.get("dtype"), ft.get("shape"), ft.get("names")
            if not isinstance(dtype, str) or (
                dtype not in VISUAL_DTYPES | NON_NUMERIC_DTYPES and _numpy_leaf_type(dtype) is None
            ):
                self.err(f"{where}[{key!r}].dtype: not a valid dtype: {dtype!r}")
            if not (isinstance(shape, list) and shape and all(_is_int(d) and d > 0 for d in shape)):
                self.err(
                    f"{where}[{key!r}].shape: expected a non-empty list of positive ints, found {shape!r}"
                )
            if "names" in ft and not (names is None or isinstance(names, (list, dict))):
                self.err(f"{where}[{key!r}].names: expected list, object or null, found {names!r}")
            elif (
                isinstance(names, list)
                and dtype not in VISUAL_DTYPES
                and isinstance(shape, list)
                and len(shape) == 1
                and len(names) != shape[0]
            ):
                self.err(f"{where}[{key!r}].names: {len(names)} names for shape {shape}")

        for key, expected in DEFAULT_FEATURES.items():
            ft = self.features.get(key)
            if ft is None:
                self.err(f"{where}: missing default feature {key!r}")
                continue
            for field in ("dtype", "shape", "names"):
                if ft.get(field, "<absent>") != expected[field]:
                    self.err(
                        f"{where}[{key!r}].{field}: expected {expected[field]!r}, "
                        f"found {ft.get(field, '<absent>')!r}"
                    )

        for key in self.video_keys:
            self._check_video_feature(key, self.features[key])

    def _check_video_feature(self, key: str, ft: dict[str, Any]) -> None:
        where = f"{INFO_PATH}: features[{key!r}]"
        shape = ft.get("shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(d) and d > 0 for d in shape)):
            self.err(f"{where}.shape: expected [height, width, channels], found {shape!r}")
            shape = None
        elif shape[2] != 3:
            self.err(f"{where}.shape: expected 3 channels (HWC), found {shape!r}")
        if ft.get("names") != VIDEO_NAMES:
            self.err(f"{where}.names: expected {VIDEO_NAMES!r}, found {ft.get('names')!r}")
        vinfo = ft.get("info")
        if not isinstance(vinfo, dict):
            self.err(f"{where}.info: expected an object with video.* fields, found {vinfo!r}")
            return
        checks = {
            "video.height": lambda v: _is_int(v) and (shape is None or v == shape[0]),
            "video.width": lambda v: _is_int(v) and (shape is None or v == shape[1]),
            "video.codec": lambda v: isinstance(v, str) and v != "",
            "video.pix_fmt": lambda v: isinstance(v, str) and v != "",
            "video.fps": lambda v: _is_int(v) and v == self.fps,
            "video.channels": lambda v: _is_int(v) and (shape is None or v == shape[2]),
            "has_audio": lambda v: isinstance(v, bool),
        }
        expect = {
            "video.height": f"int == shape[0] ({shape[0] if shape else '?'})",
            "video.width": f"int == shape[1] ({shape[1] if shape else '?'})",
            "video.codec": "non-empty codec name",
            "video.pix_fmt": "non-empty pixel format",
            "video.fps": f"int == info.fps ({self.fps})",
            "video.channels": f"int == shape[2] ({shape[2] if shape else '?'})",
            "has_audio": "bool",
        }
        for name, ok in checks.items():
            if name not in vinfo:
                self.err(f"{where}.info: missing {name!r}")
            elif not ok(vinfo[name]):
                self.err(f"{where}.info[{name!r}]: expected {expect[name]}, found {vinfo[name]!r}")
        for name in ("is_depth_map", "video.is_depth_map"):
            if name in vinfo and not isinstance(vinfo[name], bool):
                self.err(f"{where}.info[{name!r}]: expected bool, found {vinfo[name]!r}")
        if vinfo.get("has_audio") is True:
            for name in ("audio.channels", "audio.codec", "audio.sample_rate"):
                if name not in vinfo:
                    self.err(f"{where}.info: has_audio is true but {name!r} is missing")

    # ----------------------------------------------------------------------------------------------- tasks
    def _check_tasks(self) -> None:
        path = self.root / TASKS_PATH
        if not path.is_file():
            self.err(f"{TASKS_PATH}: missing")
            return
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001
            self.err(f"{TASKS_PATH}: not readable by pandas.read_parquet ({type(exc).__name__}: {exc})")
            return
        ok = True
        if df.index.name != "task":
            self.err(f"{TASKS_PATH}: index name: expected 'task', found {df.index.name!r}")
            ok = False
        if "task_index" not in df.columns:
            self.err(f"{TASKS_PATH}: missing column 'task_index'")
            return
        if str(df["task_index"].dtype) != "int64":
            self.err(f"{TASKS_PATH}: task_index dtype: expected int64, found {df['task_index'].dtype}")
            ok = False
        idx = df["task_index"].to_numpy()
        if not np.array_equal(idx, np.arange(len(df))):
            self.err(
                f"{TASKS_PATH}: task_index: expected 0..{len(df) - 1} in row order, found {idx.tolist()}"
            )
            ok = False
        task_names = [str(t) for t in df.index]
        if not all(isinstance(t, str) and t for t in df.index):
            self.err(f"{TASKS_PATH}: task (index) values must be non-empty strings")
            ok = False
        if len(set(task_names)) != len(task_names):
            self.err(f"{TASKS_PATH}: duplicate task strings")
            ok = False
        total = self.info.get("total_tasks")
        if _is_int(total) and total != len(df):
            self.err(f"{INFO_PATH}: total_tasks: {total} but {TASKS_PATH} has {len(df)} rows")
        if ok:
            self.tasks = task_names

    # -------------------------------------------------------------------------------------------- episodes
    def _expected_episode_columns(self) -> dict[str, Any]:
        """column -> predicate on arrow type (None = int64 scalar)."""
        cols: dict[str, Any] = {
            name: pa.int64()
            for name in (
                "episode_index",
                "length",
                "data/chunk_index",
                "data/file_index",
                "dataset_from_index",
                "dataset_to_index",
                "meta/episodes/chunk_index",
                "meta/episodes/file_index",
            )
        }
        cols["tasks"] = "list<string>"
        for vk in self.video_keys:
            cols[f"videos/{vk}/chunk_index"] = pa.int64()
            cols[f"videos/{vk}/file_index"] = pa.int64()
            cols[f"videos/{vk}/from_timestamp"] = pa.float64()
            cols[f"videos/{vk}/to_timestamp"] = pa.float64()
        return cols

    def _stats_depth(self, ft: dict[str, Any]) -> int:
        if ft.get("dtype") in VISUAL_DTYPES:
            return 3
        shape = ft.get("shape") or [1]
        return max(1, len(shape))

    def _check_episodes(self) -> None:
        ep_dir = self.root / "meta" / "episodes"
        files = (
            sorted(p.relative_to(self.root).as_posix() for p in ep_dir.glob("*/*.parquet"))
            if ep_dir.is_dir()
            else []
        )
        files = [f for f in files if _EPISODES_RE.match(f)]
        if not files:
            self.err("meta/episodes: no meta/episodes/chunk-XXX/file-XXX.parquet files")
            return
        expected_cols = self._expected_episode_columns()
        stat_features = {k: ft for k, ft in self.features.items() if _feature_kind(ft) != "text"}
        rows: list[dict[str, Any]] = []
        stats_rows: list[dict[str, dict[str, np.ndarray]]] = []
        fatal = False
        for rel in files:
            m = _EPISODES_RE.match(rel)
            assert m is not None
            own = (int(m.group(1)), int(m.group(2)))
            if DEFAULT_EPISODES_PATH.format(chunk_index=own[0], file_index=own[1]) != rel:
                self.err(f"{rel}: file name does not follow {DEFAULT_EPISODES_PATH!r}")
            table, problem = _read_table(self.root / rel)
            if table is None:
                self.err(f"{rel}: unreadable parquet ({problem})")
                fatal = True
                continue
            schema = table.schema
            for col, typ in expected_cols.items():
                if col not in schema.names:
                    self.err(f"{rel}: missing required column {col!r}")
                    fatal = True
                    continue
                t = schema.field(col).type
                if typ == "list<string>":
                    if not (
                        (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_string_type(t.value_type)
                    ):
                        self.err(f"{rel}: column {col!r}: expected list<string>, found {t}")
                elif t != typ:
                    self.err(f"{rel}: column {col!r}: expected {typ}, found {t}")
            for fkey, ft in stat_features.items():
                present_q = [q for q in QUANTILE_STATS if f"stats/{fkey}/{q}" in schema.names]
                if present_q and len(present_q) != len(QUANTILE_STATS):
                    self.err(
                        f"{rel}: stats/{fkey}: partial quantile columns {present_q} "
                        f"(all of {QUANTILE_STATS} or none)"
                    )
                for stat in (*REQUIRED_STATS, *present_q):
                    col = f"stats/{fkey}/{stat}"
                    if col not in schema.names:
                        self.err(f"{rel}: missing required column {col!r}")
                        continue
                    t = schema.field(col).type
                    depth = 1 if stat == "count" else self._stats_depth(ft)
                    leaf_ok = pa.types.is_int64 if stat == "count" else pa.types.is_float64
                    cur, ok = t, True
                    for _ in range(depth):
                        if not _is_list_type(cur):
                            ok = False
                            break
                        cur = cur.value_type
                    if not ok or not leaf_ok(cur):
                        want = "list<int64>" if stat == "count" else "list<" * depth + "double" + ">" * depth
                        self.err(f"{rel}: column {col!r}: expected {want}, found {t}")
            if any(c not in schema.names for c in expected_cols):
                continue
            base_cols = [c for c in expected_cols if c != "tasks"]
            pylists = {c: table.column(c).to_pylist() for c in [*base_cols, "tasks"]}
            stat_cols = {c: table.column(c).to_pylist() for c in schema.names if c.startswith("stats/")}
            for i in range(table.num_rows):
                row = {c: pylists[c][i] for c in pylists}
                row["_file"] = rel
                rows.append(row)
                st: dict[str, dict[str, np.ndarray]] = {}
                for col, values in stat_cols.items():
                    parts = col.split("/")
                    fkey, stat = "/".join(parts[1:-1]), parts[-1]
                    if values[i] is not None:
                        st.setdefault(fkey, {})[stat] = np.asarray(values[i], dtype=np.float64)
                stats_rows.append(st)
            for i in range(table.num_rows):
                r = rows[len(rows) - table.num_rows + i]
                found = (r["meta/episodes/chunk_index"], r["meta/episodes/file_index"])
                if found != own:
                    self.err(
                        f"{rel}: episode {r['episode_index']}: meta/episodes/chunk_index,file_index: "
                        f"expected {own}, found {found}"
                    )
        if fatal or not rows:
            return

        total_eps = self.info.get("total_episodes")
        n = len(rows)
        if _is_int(total_eps) and total_eps != n:
            self.err(f"{INFO_PATH}: total_episodes: {total_eps} but meta/episodes has {n} rows")
        ep_idx = [r["episode_index"] for r in rows]
        if ep_idx != list(range(n)):
            self.err(f"meta/episodes: episode_index: expected 0..{n - 1} in file/row order, found {ep_idx}")
            return
        for col in self._expected_episode_columns():
            if col != "tasks" and any(r[col] is None for r in rows):
                self.err(f"meta/episodes: column {col!r} contains nulls")
                return

        total_frames = self.info.get("total_frames")
        lengths = [r["length"] for r in rows]
        if _is_int(total_frames) and sum(lengths) != total_frames:
            self.err(
                f"{INFO_PATH}: total_frames: {total_frames} but sum of meta/episodes length is {sum(lengths)}"
            )
        expected_from = 0
        for r in rows:
            e, length = r["episode_index"], r["length"]
            if length <= 0:
                self.err(f"meta/episodes: episode {e}: length must be > 0, found {length}")
            if r["dataset_from_index"] != expected_from:
                self.err(
                    f"meta/episodes: episode {e}: dataset_from_index: expected {expected_from}, "
                    f"found {r['dataset_from_index']}"
                )
            if r["dataset_to_index"] - r["dataset_from_index"] != length:
                self.err(
                    f"meta/episodes: episode {e}: dataset_to_index - dataset_from_index = "
                    f"{r['dataset_to_index'] - r['dataset_from_index']}, expected length {length}"
                )
            expected_from = r["dataset_to_index"]
            tasks = r["tasks"]
            if not tasks or not all(isinstance(t, str) for t in tasks):
                self.err(
                    f"meta/episodes: episode {e}: tasks: expected a non-empty list of strings, "
                    f"found {tasks!r}"
                )
            elif len(set(tasks)) != len(tasks):
                self.err(f"meta/episodes: episode {e}: tasks: duplicate entries {tasks!r}")
            elif self.tasks is not None:
                for t in tasks:
                    if t not in self.tasks:
                        self.err(f"meta/episodes: episode {e}: task {t!r} is not in {TASKS_PATH}")

        # chunk/file progression: start at (0,0), then stay or roll by one; indices within chunks_size
        prefixes = ["data", "meta/episodes"] + [f"videos/{vk}" for vk in self.video_keys]
        for prefix in prefixes:
            locs = [(r[f"{prefix}/chunk_index"], r[f"{prefix}/file_index"]) for r in rows]
            prev = None
            for e, loc in enumerate(locs):
                if loc[0] < 0 or not (0 <= loc[1] < self.chunks_size):
                    self.err(
                        f"meta/episodes: episode {e}: {prefix} chunk/file {loc} out of range "
                        f"(chunks_size {self.chunks_size})"
                    )
                    break
                allowed = [(0, 0)] if prev is None else [prev, _roll(*prev, self.chunks_size)]
                if loc not in allowed:
                    self.err(
                        f"meta/episodes: episode {e}: {prefix} chunk/file index {loc}: "
                        f"expected one of {allowed}"
                    )
                    break
                prev = loc

        self.episodes = rows
        self.ep_stats = stats_rows

    # ------------------------------------------------------------------------------------------------ data
    def _check_data(self) -> None:
        assert self.episodes is not None
        fps = self.fps
        assert fps is not None
        by_file: dict[str, list[dict[str, Any]]] = {}
        for r in self.episodes:
            rel = DEFAULT_DATA_PATH.format(chunk_index=r["data/chunk_index"], file_index=r["data/file_index"])
            by_file.setdefault(rel, []).append(r)
        existing = sorted(
            p.relative_to(self.root).as_posix() for p in (self.root / "data").rglob("*") if p.is_file()
        )
        for rel in existing:
            if not _DATA_RE.match(rel):
                self.err(f"{rel}: stray file under data/ (does not match {DEFAULT_DATA_PATH!r})")
            elif rel not in by_file:
                self.err(f"{rel}: data file not referenced by any episode in meta/episodes")

        data_features = {k: ft for k, ft in self.features.items() if ft.get("dtype") != "video"}
        total_rows = 0
        for rel in sorted(by_file):
            eps = by_file[rel]
            path = self.root / rel
            if not path.is_file():
                self.err(
                    f"{rel}: missing data file (referenced by episodes {[r['episode_index'] for r in eps]})"
                )
                continue
            table, problem = _read_table(path)
            if table is None:
                self.err(f"{rel}: unreadable parquet ({problem})")
                continue
            total_rows += table.num_rows
            schema = table.schema
            self._check_hf_metadata(rel, schema, data_features)
            for vk in self.video_keys:
                if vk in schema.names:
                    self.err(f"{rel}: video feature {vk!r} must not be stored in the data parquet")
            for col in schema.names:
                if col not in self.features:
                    self.err(f"{rel}: column {col!r} is not declared in {INFO_PATH} features")
            columns: dict[str, np.ndarray] = {}
            for key, ft in data_features.items():
                if key not in schema.names:
                    self.err(f"{rel}: missing column {key!r} for feature {key!r}")
                    continue
                if ft.get("dtype") == "language":
                    continue
                problem = _arrow_type_problem(schema.field(key).type, ft["dtype"], ft["shape"])
                if problem:
                    self.err(f"{rel}: column {key!r}: {problem}")
                    continue
                if _feature_kind(ft) != "numeric":
                    continue
                arr = table.column(key).combine_chunks()
                values, problem = _column_to_numpy(arr, ft["shape"])
                if problem:
                    self.err(f"{rel}: column {key!r}: {problem}")
                    continue
                columns[key] = values
            if any(k not in columns for k in DEFAULT_FEATURES):
                continue

            expected_rows = sum(r["length"] for r in eps)
            if table.num_rows != expected_rows:
                self.err(
                    f"{rel}: {table.num_rows} rows, but its episodes {[r['episode_index'] for r in eps]} "
                    f"have {expected_rows} frames in total"
                )
            index = columns["index"]
            first = min(r["dataset_from_index"] for r in eps)
            if not np.array_equal(index, np.arange(first, first + table.num_rows)):
                self.err(f"{rel}: index column is not contiguous and increasing from {first}")
            for r in eps:
                self._check_episode_rows(rel, r, columns, fps)
        total_frames = self.info.get("total_frames")
        if _is_int(total_frames) and total_rows and total_rows != total_frames:
            self.err(
                f"{INFO_PATH}: total_frames: {total_frames} but the data parquet files hold {total_rows} rows"
            )

    def _check_hf_metadata(self, rel: str, schema: pa.Schema, data_features: dict[str, Any]) -> None:
        meta = schema.metadata or {}
        raw = meta.get(b"huggingface")
        if raw is None:
            return  # optional (pandas-rewritten files lose it)
        try:
            hf = json.loads(raw)
            hf_feats = hf["info"]["features"]
        except (ValueError, KeyError, TypeError):
            self.err(f"{rel}: schema metadata 'huggingface' is not {{'info': {{'features': ...}}}} JSON")
            return
        missing = [k for k in data_features if k not in hf_feats]
        if missing:
            self.err(f"{rel}: schema metadata 'huggingface' lacks features {missing}")

    def _check_episode_rows(
        self, rel: str, r: dict[str, Any], columns: dict[str, np.ndarray], fps: int
    ) -> None:
        e, length = r["episode_index"], r["length"]
        lo, hi = r["dataset_from_index"], r["dataset_to_index"]
        index = columns["index"]
        pos = np.flatnonzero((index >= lo) & (index < hi))
        where = f"{rel}: episode {e}"
        if len(pos) != length:
            self.err(f"{where}: {len(pos)} rows with index in [{lo}, {hi}), expected length {length}")
            return
        if len(pos) and not np.array_equal(pos, np.arange(pos[0], pos[0] + length)):
            self.err(f"{where}: rows are not contiguous in the file")
            return
        sl = slice(int(pos[0]), int(pos[0]) + length)
        epi = columns["episode_index"][sl]
        if not np.all(epi == e):
            self.err(f"{where}: episode_index column: expected all {e}, found {sorted(set(epi.tolist()))}")
        fi = columns["frame_index"][sl]
        if not np.array_equal(fi, np.arange(length)):
            bad = int(np.flatnonzero(fi != np.arange(length))[0])
            self.err(f"{where}: frame_index: expected 0..{length - 1}, found {int(fi[bad])} at frame {bad}")
        ts = columns["timestamp"][sl].astype(np.float64)
        expected_ts = np.arange(length, dtype=np.float64) / fps
        diff = np.abs(ts - expected_ts)
        if np.any(diff > TIMESTAMP_TOL_S):
            bad = int(np.argmax(diff > TIMESTAMP_TOL_S))
            self.err(
                f"{where}: timestamp[{bad}] = {ts[bad]:.6f}, "
                f"expected frame_index/fps = {expected_ts[bad]:.6f} "
                f"(tol {TIMESTAMP_TOL_S}; {int(np.sum(diff > TIMESTAMP_TOL_S))} bad frames)"
            )
        ti = columns["task_index"][sl]
        if self.tasks is not None:
            if np.any((ti < 0) | (ti >= len(self.tasks))):
                self.err(
                    f"{where}: task_index out of range 0..{len(self.tasks) - 1}: {sorted(set(ti.tolist()))}"
                )
            elif isinstance(r["tasks"], list):
                used = {self.tasks[int(t)] for t in np.unique(ti)}
                extra = used - set(r["tasks"])
                if extra:
                    self.err(
                        f"{where}: frames use tasks {sorted(extra)} not listed in the episode's "
                        f"tasks {r['tasks']}"
                    )
        for key, values in columns.items():
            self.ep_data.setdefault(key, {})[e] = values[sl]

    # ---------------------------------------------------------------------------------------------- videos
    def _check_videos(self) -> None:
        assert self.episodes is not None and self.fps is not None
        videos_dir = self.root / "videos"
        existing = (
            sorted(p.relative_to(self.root).as_posix() for p in videos_dir.rglob("*") if p.is_file())
            if videos_dir.is_dir()
            else []
        )
        referenced: set[str] = set()
        for vk in self.video_keys:
            by_file: dict[str, list[dict[str, Any]]] = {}
            for r in self.episodes:
                rel = DEFAULT_VIDEO_PATH.format(
                    video_key=vk,
                    chunk_index=r[f"videos/{vk}/chunk_index"],
                    file_index=r[f"videos/{vk}/file_index"],
                )
                by_file.setdefault(rel, []).append(r)
            referenced |= set(by_file)
            for rel, eps in sorted(by_file.items()):
                self._check_video_file(vk, rel, eps)
        for rel in existing:
            m = _VIDEO_RE.match(rel)
            if not m or m.group(1) not in self.video_keys:
                self.err(
                    f"{rel}: stray file under videos/ (not {DEFAULT_VIDEO_PATH!r} for a declared video key)"
                )
            elif rel not in referenced:
                self.err(f"{rel}: video file not referenced by any episode in meta/episodes")

    def _check_video_file(self, vk: str, rel: str, eps: list[dict[str, Any]]) -> None:
        fps = self.fps
        assert fps is not None
        path = self.root / rel
        ep_ids = [r["episode_index"] for r in eps]
        if not path.is_file():
            self.err(f"{rel}: missing video file (referenced by episodes {ep_ids})")
            return
        vinfo = self.features[vk].get("info") if isinstance(self.features[vk].get("info"), dict) else {}
        shape = self.features[vk].get("shape")
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    self.err(f"{rel}: no video stream")
                    return
                stream = container.streams.video[0]
                has_audio = len(container.streams.audio) > 0
                codec = stream.codec_context.codec.canonical_name
                pix_fmt = stream.codec_context.pix_fmt
                width, height = stream.codec_context.width, stream.codec_context.height
                rate = stream.average_rate
                pts: list[float] = []
                means: list[np.ndarray] = []
                for frame in container.decode(stream):
                    if frame.pts is None:
                        self.err(f"{rel}: decoded frame without pts")
                        return
                    pts.append(float(frame.pts * frame.time_base))
                    rgb = frame.to_ndarray(format="rgb24")
                    means.append(rgb.reshape(-1, 3).mean(axis=0) / 255.0)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a violation
            self.err(f"{rel}: cannot be decoded with PyAV ({type(exc).__name__}: {exc})")
            return
        if not pts:
            self.err(f"{rel}: no frames could be decoded")
            return

        where = f"{rel}"
        if vinfo.get("video.codec") is not None and codec != vinfo.get("video.codec"):
            self.err(f"{where}: codec: info.json says {vinfo.get('video.codec')!r}, stream is {codec!r}")
        if vinfo.get("video.pix_fmt") is not None and pix_fmt != vinfo.get("video.pix_fmt"):
            self.err(
                f"{where}: pix_fmt: info.json says {vinfo.get('video.pix_fmt')!r}, stream is {pix_fmt!r}"
            )
        if isinstance(shape, list) and len(shape) == 3 and (height, width) != (shape[0], shape[1]):
            self.err(f"{where}: frame size {height}x{width} (HxW), feature shape says {shape[0]}x{shape[1]}")
        if rate is None or abs(float(rate) - fps) > 1e-6:
            self.err(f"{where}: stream average frame rate {rate}, expected {fps}")
        if isinstance(vinfo.get("has_audio"), bool) and vinfo["has_audio"] != has_audio:
            self.err(
                f"{where}: has_audio is {vinfo['has_audio']} in info.json but file has audio={has_audio}"
            )

        order = np.argsort(pts)
        times = np.asarray(pts)[order]
        frame_means = np.asarray(means)[order]
        prev_to: float | None = None
        for r in eps:
            e, length = r["episode_index"], r["length"]
            t0, t1 = r[f"videos/{vk}/from_timestamp"], r[f"videos/{vk}/to_timestamp"]
            w = f"{rel}: episode {e}"
            expected_from = 0.0 if prev_to is None else prev_to
            if abs(t0 - expected_from) > 1e-6:
                what = "first episode of the file" if prev_to is None else "previous episode's to_timestamp"
                self.err(f"{w}: from_timestamp = {t0:.6f}, expected {expected_from:.6f} ({what})")
            prev_to = t1
            if abs((t1 - t0) - length / fps) > DURATION_TOL_S:
                self.err(
                    f"{w}: to_timestamp - from_timestamp = {t1 - t0:.6f} s, expected length/fps = "
                    f"{length / fps:.6f} s (tol {DURATION_TOL_S})"
                )
            queries = t0 + np.arange(length, dtype=np.float64) / fps
            data_ts = self.ep_data.get("timestamp", {}).get(e)
            if data_ts is not None and len(data_ts) == length:
                queries = np.concatenate([queries, t0 + data_ts.astype(np.float64)])
            nearest = _nearest(times, queries)
            dist = np.abs(times[nearest] - queries)
            if np.any(dist > TIMESTAMP_TOL_S):
                bad = int(np.argmax(dist > TIMESTAMP_TOL_S))
                self.err(
                    f"{w}: no decodable frame within {TIMESTAMP_TOL_S} s of t={queries[bad]:.6f} "
                    f"(frame {bad % length}; nearest pts {times[nearest[bad]]:.6f}; "
                    f"{int(np.sum(dist > TIMESTAMP_TOL_S))} bad queries)"
                )
            in_range = int(np.sum((times >= t0 - TIMESTAMP_TOL_S) & (times < t1 - TIMESTAMP_TOL_S)))
            if in_range != length:
                self.err(
                    f"{w}: {in_range} decoded frames in [from_timestamp, to_timestamp), "
                    f"expected length {length}"
                )
            self.ep_video_means.setdefault(vk, {})[e] = frame_means[nearest[:length]]

    # ----------------------------------------------------------------------------------- per-episode stats
    def _check_stat_block(
        self,
        where: str,
        ft: dict[str, Any],
        st: dict[str, np.ndarray],
        data: np.ndarray | None,
        n_frames: int | None,
    ) -> None:
        """Shared checks for a {stat: array} block (stats.json entry or one episode's stats/* columns)."""
        kind = _feature_kind(ft)
        for stat in REQUIRED_STATS:
            if stat not in st:
                self.err(f"{where}: missing {stat!r}")
        present_q = [q for q in QUANTILE_STATS if q in st]
        if present_q and len(present_q) != len(QUANTILE_STATS):
            self.err(f"{where}: partial quantiles {present_q} (all of {QUANTILE_STATS} or none)")
        if any(s not in st for s in REQUIRED_STATS):
            return
        if kind == "visual":
            channels = (ft.get("shape") or [0, 0, 3])[-1]
            expected_shape: tuple[int, ...] = (channels, 1, 1)
        else:
            shape = ft.get("shape") or [1]
            expected_shape = tuple(shape)
        for stat in (*REQUIRED_STATS[:4], *present_q):
            a = st[stat]
            if a.shape != expected_shape:
                self.err(f"{where}: {stat!r} has shape {a.shape}, expected {expected_shape}")
                return
            if not np.all(np.isfinite(a)):
                self.err(f"{where}: {stat!r} has non-finite values {_fmt(a)}")
                return
        count = st["count"]
        if count.shape != (1,) or count[0] != int(count[0]) or count[0] < 1:
            self.err(f"{where}: 'count' must be [int >= 1], found {_fmt(count)}")
            return
        mn, mx, mean, std = st["min"], st["max"], st["mean"], st["std"]
        tol = 1e-6 + 1e-6 * np.abs(mx - mn)
        if np.any(mn > mean + tol) or np.any(mean > mx + tol):
            self.err(
                f"{where}: expected min <= mean <= max, found min {_fmt(mn)} mean {_fmt(mean)} max {_fmt(mx)}"
            )
        if np.any(std < 0):
            self.err(f"{where}: negative std {_fmt(std)}")
        if present_q:
            qs = [st[q] for q in QUANTILE_STATS]
            qtol = 1e-6 + 1e-3 * np.abs(mx - mn)
            for lo_q, hi_q, a, b in zip(QUANTILE_STATS, QUANTILE_STATS[1:], qs, qs[1:], strict=False):
                if np.any(a > b + qtol):
                    self.err(f"{where}: quantiles not ordered: {lo_q} {_fmt(a)} > {hi_q} {_fmt(b)}")
            if np.any(qs[0] < mn - qtol) or np.any(qs[-1] > mx + qtol):
                self.err(f"{where}: quantiles outside [min, max]")
        if kind == "visual":
            for stat in ("min", "max", "mean"):
                if np.any(st[stat] < -1e-6) or np.any(st[stat] > 1 + 1e-6):
                    self.err(f"{where}: {stat!r} must be in [0, 1] (pixels / 255), found {_fmt(st[stat])}")
            if n_frames is not None and count[0] > n_frames:
                self.err(
                    f"{where}: 'count' = {int(count[0])} exceeds the number of frames ({n_frames}); "
                    "image/video count is the number of sampled frames"
                )
            if data is not None and count[0] >= len(data):  # all frames sampled: compare with decoded pixels
                decoded = data.mean(axis=0).reshape(expected_shape)
                if np.any(np.abs(decoded - mean) > VIDEO_MEAN_TOL):
                    self.err(
                        f"{where}: per-channel 'mean' {_fmt(mean.ravel())} differs from decoded video "
                        f"{_fmt(decoded.ravel())} by more than {VIDEO_MEAN_TOL} "
                        "(channel order / content mismatch?)"
                    )
            return
        if data is None:
            return
        if count[0] != len(data):
            self.err(f"{where}: 'count' = {int(count[0])}, expected number of frames {len(data)}")
        d = data.astype(np.float64)
        truth = {"min": d.min(axis=0), "max": d.max(axis=0), "mean": d.mean(axis=0), "std": d.std(axis=0)}
        for stat, value in truth.items():
            if not np.allclose(st[stat], value.reshape(expected_shape), rtol=STATS_RTOL, atol=STATS_ATOL):
                self.err(f"{where}: {stat!r} = {_fmt(st[stat])}, but the data gives {_fmt(value)}")

    def _check_episode_stats(self) -> None:
        assert self.episodes is not None
        for r, st in zip(self.episodes, self.ep_stats, strict=True):
            e = r["episode_index"]
            for key, ft in self.features.items():
                if _feature_kind(ft) == "text" or key not in st:
                    continue  # missing columns already reported
                data = (
                    (self.ep_video_means if ft.get("dtype") == "video" else self.ep_data).get(key, {}).get(e)
                )
                self._check_stat_block(
                    f"{r['_file']}: episode {e}: stats/{key}", ft, st[key], data, r["length"]
                )

    # ------------------------------------------------------------------------------------------ stats.json
    def _check_stats_json(self) -> None:
        path = self.root / STATS_PATH
        if not path.is_file():
            self.err(f"{STATS_PATH}: missing")
            return
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.err(f"{STATS_PATH}: not valid JSON ({exc})")
            return
        if not isinstance(stats, dict):
            self.err(f"{STATS_PATH}: top level must be an object")
            return
        n_eps = len(self.episodes) if self.episodes is not None else 0
        for key, ft in self.features.items():
            if _feature_kind(ft) == "text":
                continue
            entry = stats.get(key)
            where = f"{STATS_PATH}: {key}"
            if not isinstance(entry, dict):
                self.err(f"{where}: missing stats entry for feature {key!r}")
                continue
            try:
                st = {
                    k: np.asarray(v, dtype=np.float64)
                    for k, v in entry.items()
                    if k in (*REQUIRED_STATS, *QUANTILE_STATS)
                }
            except (TypeError, ValueError):
                self.err(f"{where}: stats must be (nested) lists of numbers")
                continue
            per_ep = self.ep_data.get(key) if ft.get("dtype") != "video" else self.ep_video_means.get(key)
            data = None
            if per_ep is not None and n_eps and len(per_ep) == n_eps:
                data = np.concatenate([per_ep[e] for e in range(n_eps)])
            total = self.info.get("total_frames") if _is_int(self.info.get("total_frames")) else None
            self._check_stat_block(where, ft, st, data, total)
            # dataset count must equal the sum of the per-episode counts (aggregation rule)
            ep_counts = (
                [s.get(key, {}).get("count") for s in self.ep_stats] if self.episodes is not None else []
            )
            if ep_counts and all(c is not None and c.shape == (1,) for c in ep_counts) and "count" in st:
                total_count = float(sum(c[0] for c in ep_counts))
                if st["count"].shape == (1,) and st["count"][0] != total_count:
                    self.err(
                        f"{where}: 'count' = {_fmt(st['count'])}, "
                        f"expected sum of episode counts {int(total_count)}"
                    )

    # ---------------------------------------------------------------------------------------------- strays
    def _check_stray_files(self) -> None:
        for p in sorted(self.root.iterdir()):
            name = p.name
            if name in ("meta", "data") and p.is_dir():
                continue
            if name == "videos" and p.is_dir():
                continue  # files inside are checked by the video check
            if name == "README.md" and p.is_file():
                continue
            self.err(
                f"{name}{'/' if p.is_dir() else ''}: stray entry at dataset root "
                "(only meta/, data/, videos/, README.md)"
            )
        if (self.root / "videos").is_dir() and not self.video_keys:
            files = [p for p in (self.root / "videos").rglob("*") if p.is_file()]
            if files:
                self.err(f"videos/: {len(files)} file(s) but the dataset declares no video features")
        ep_dir = self.root / "meta" / "episodes"
        if ep_dir.is_dir():
            for p in sorted(ep_dir.rglob("*")):
                rel = p.relative_to(self.root).as_posix()
                if p.is_file() and not _EPISODES_RE.match(rel):
                    self.err(
                        f"{rel}: stray file under meta/episodes/ (does not match {DEFAULT_EPISODES_PATH!r})"
                    )
        for rel in (STATS_PATH, TASKS_PATH):
            if not (self.root / rel).is_file() and f"{rel}: missing" not in self.errors:
                self.err(f"{rel}: missing")


def check_lerobot_v3(root: Path | str) -> list[str]:
    """Check ``root`` against the LeRobot v3.0 layout; returns violations (empty list = conformant)."""
    return _Checker(Path(root)).run()


def read_episode_video(root: Path | str, video_key: str, episode_index: int) -> np.ndarray:
    """Decode episode ``episode_index`` of camera ``video_key`` as (L, H, W, 3) uint8 RGB, the LeRobot way.

    Locates the episode via its meta/episodes row and ``info.video_path``, then takes, for each frame, the
    decoded frame nearest to ``from_timestamp + timestamp`` (raising if further than the 1e-4 s tolerance).
    """
    root = Path(root)
    info = json.loads((root / INFO_PATH).read_text(encoding="utf-8"))
    files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    episodes = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    row = episodes.iloc[episode_index]
    assert int(row["episode_index"]) == episode_index
    rel = info["video_path"].format(
        video_key=video_key,
        chunk_index=int(row[f"videos/{video_key}/chunk_index"]),
        file_index=int(row[f"videos/{video_key}/file_index"]),
    )
    data_rel = info["data_path"].format(
        chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"])
    )
    data = pd.read_parquet(root / data_rel, columns=["index", "timestamp"])
    lo, hi = int(row["dataset_from_index"]), int(row["dataset_to_index"])
    ts = data.loc[(data["index"] >= lo) & (data["index"] < hi), "timestamp"].to_numpy(np.float64)
    queries = float(row[f"videos/{video_key}/from_timestamp"]) + ts
    with av.open(str(root / rel)) as container:
        stream = container.streams.video[0]
        decoded = [
            (float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(stream)
        ]
    times = np.asarray([t for t, _ in decoded])
    out = []
    for q in queries:
        k = int(np.argmin(np.abs(times - q)))
        if abs(times[k] - q) > TIMESTAMP_TOL_S:
            raise ValueError(f"{rel}: no frame within {TIMESTAMP_TOL_S} s of {q}")
        out.append(decoded[k][1])
    return np.stack(out)
