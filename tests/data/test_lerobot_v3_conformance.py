"""Runs the independent LeRobot v3.0 conformance checker on a dataset written by physis's DatasetWriter,
and checks that the checker itself catches deliberate corruptions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from physis.data.writer import DatasetWriter
from tests.data.lerobot_v3_conformance import check_lerobot_v3, read_episode_video

FPS = 20
SIZE = 64
LENGTHS = (30, 28, 32)
CORNER = "observation.images.corner"
WRIST = "observation.images.wrist"
TASKS = ("open the drawer", "close the drawer")



def _features() -> dict:
    return {
        "observation.state": {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "g"]},
        "action": {"dtype": "float32", "shape": [4], "names": None},
        CORNER: {"dtype": "video", "shape": [SIZE, SIZE, 3]},
        WRIST: {"dtype": "video", "shape": [SIZE, SIZE, 3]},
    }


def _render(length: int, seed: int, flip: bool) -> np.ndarray:
    """Smooth frames: a gaussian blob moving across gradients; the three channels differ on purpose so that
    channel swaps and frame misalignment are visible."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if flip:
        xx, yy = yy, xx
    t = np.arange(length, dtype=np.float32)[:, None, None]
    cx = 8 + 48 * t / (length - 1)
    cy = 32 + 16 * np.sin(2 * np.pi * t / length + seed)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 5.0**2))
    red = 30 + 220 * blob
    green = np.broadcast_to(40 + 170 * xx / (SIZE - 1), blob.shape)
    blue = np.broadcast_to(200 - 150 * yy / (SIZE - 1), blob.shape)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).round().astype(np.uint8)


def _episode(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length, dtype=np.float32)[:, None]
    state = (np.sin(2 * np.pi * t * np.array([1, 2, 3, 0.5])) + rng.normal(0, 0.01, (length, 4))).astype(
        np.float32
    )
    return {
        "observation.state": state,
        "action": np.diff(state, axis=0, prepend=state[:1]).astype(np.float32),
        CORNER: _render(length, seed, flip=False),
        WRIST: _render(length, seed + 1, flip=True),
    }


@pytest.fixture(scope="module")
def v3_dataset(tmp_path_factory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("lerobot_v3") / "dataset"
    episodes = [_episode(n, seed) for seed, n in enumerate(LENGTHS)]
    with DatasetWriter.create(root, fps=FPS, features=_features(), robot_type="test", subtasks=True) as w:
        for i, ep in enumerate(episodes):
            n = len(ep["action"])
            w.add_episode(ep, task=TASKS[i % 2], subtasks=["reach"] * (n // 2) + ["grasp"] * (n - n // 2))
    return root, episodes


def test_physis_output_is_lerobot_v3(v3_dataset):
    root, _ = v3_dataset
    assert check_lerobot_v3(root) == []


def test_decoded_video_matches_written_frames(v3_dataset):
    root, episodes = v3_dataset
    for e, ep in enumerate(episodes):
        for key in (CORNER, WRIST):
            decoded = read_episode_video(root, key, e).astype(np.float64)
            original = ep[key].astype(np.float64)
            assert decoded.shape == original.shape
            aligned = np.mean((decoded - original) ** 2)
            psnr = 10 * np.log10(255.0**2 / max(aligned, 1e-12))
            assert psnr > 28, f"{key} episode {e}: PSNR {psnr:.1f} dB"
            shifted = np.mean((decoded[1:] - original[:-1]) ** 2)  # off-by-one frame alignment
            assert aligned < shifted, f"{key} episode {e}: frames look shifted by one"


def test_checker_tolerates_allowed_extensions(v3_dataset, tmp_path):
    """README.md at the root, extra meta files and unknown info.json keys are not violations."""
    source, _ = v3_dataset
    root = tmp_path / "dataset"
    shutil.copytree(source, root)
    before = check_lerobot_v3(root)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files: data/*/*.parquet\n---\n"
    )
    (root / "meta" / "notes.json").write_text("{}")
    _edit_json(root / "meta/info.json", lambda o: o.update(tools=[], custom_key={"a": 1}))
    assert check_lerobot_v3(root) == before


# ---------------------------------------------------------------------------------------------- corruptions
def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=4))


def _replace_column(path: Path, name: str, fn: Callable[[list], list]) -> None:
    table = pq.read_table(path)
    i = table.schema.get_field_index(name)
    field = table.schema.field(i)
    table = table.set_column(i, field, pa.array(fn(table.column(name).to_pylist()), type=field.type))
    pq.write_table(table, path)


def _episode_one_rows(values: list) -> list:
    start = LENGTHS[0]
    return (
        values[:start] + [v + 0.01 for v in values[start : start + LENGTHS[1]]] + values[start + LENGTHS[1] :]
    )


def _only_data_file(root: Path) -> Path:
    (path,) = sorted((root / "data").glob("*/*.parquet"))
    return path


def _only_episodes_file(root: Path) -> Path:
    (path,) = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    return path


def _bump(key: str, delta: float) -> Callable[[dict], None]:
    def fn(obj: dict) -> None:
        obj[key] += delta

    return fn


def _rewrite_tasks_without_index_name(root: Path) -> None:
    table = pq.read_table(root / "meta/tasks.parquet")
    plain = pa.table({"task_index": table.column("task_index"), "name": table.column("task")})
    pq.write_table(plain, root / "meta/tasks.parquet")


def _action_as_double(root: Path) -> None:
    path = _only_data_file(root)
    table = pq.read_table(path)
    i = table.schema.get_field_index("action")
    values = table.column("action").to_pylist()
    table = table.set_column(i, "action", pa.array(values, type=pa.list_(pa.float64(), 4)))
    pq.write_table(table, path)


def _edit_stats_mean(stats: dict) -> None:
    stats["action"]["mean"][0] += 0.5


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "info_total_frames": (
        lambda r: _edit_json(r / "meta/info.json", _bump("total_frames", 1)),
        f"meta/info.json: total_frames: {sum(LENGTHS) + 1} but sum of meta/episodes length is {sum(LENGTHS)}",
    ),
    "info_v21_key": (
        lambda r: _edit_json(r / "meta/info.json", lambda o: o.update(total_videos=6)),
        "v2.1-only key 'total_videos'",
    ),
    "info_timestamp_dtype": (
        lambda r: _edit_json(
            r / "meta/info.json", lambda o: o["features"]["timestamp"].update(dtype="float64")
        ),
        "features['timestamp'].dtype: expected 'float32', found 'float64'",
    ),
    "missing_video_file": (
        lambda r: (r / f"videos/{WRIST}/chunk-000/file-000.mp4").unlink(),
        f"videos/{WRIST}/chunk-000/file-000.mp4: missing video file",
    ),
    "data_wrong_timestamp": (
        lambda r: _replace_column(_only_data_file(r), "timestamp", _episode_one_rows),
        "episode 1: timestamp[0] = 0.010000, expected frame_index/fps = 0.000000",
    ),
    "data_action_double": (
        _action_as_double,
        "column 'action': expected element type float for dtype 'float32'",
    ),
    "episodes_to_index": (
        lambda r: _replace_column(_only_episodes_file(r), "dataset_to_index", lambda v: [v[0] + 1, *v[1:]]),
        "episode 0: dataset_to_index - dataset_from_index = 31, expected length 30",
    ),
    "episodes_from_timestamp": (
        lambda r: _replace_column(
            _only_episodes_file(r),
            f"videos/{CORNER}/from_timestamp",
            lambda v: [v[0], v[1] + 0.5 / FPS, *v[2:]],
        ),
        "episode 1: no decodable frame within 0.0001 s",
    ),
    "tasks_index_name": (
        _rewrite_tasks_without_index_name,
        "meta/tasks.parquet: index name: expected 'task'",
    ),
    "stats_mean": (
        lambda r: _edit_json(r / "meta/stats.json", _edit_stats_mean),
        "meta/stats.json: action: 'mean' = ",
    ),
    "stray_staging_dir": (
        lambda r: (r / "images").mkdir(),
        "images/: stray entry at dataset root",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_checker_catches_corruption(name, v3_dataset, tmp_path):
    source, _ = v3_dataset
    root = tmp_path / "dataset"
    shutil.copytree(source, root)
    before = set(check_lerobot_v3(root))
    corrupt, expected = CORRUPTIONS[name]
    corrupt(root)
    new = [v for v in check_lerobot_v3(root) if v not in before]
    assert any(expected in v for v in new), f"expected {expected!r} among new violations {new}"
