"""v2.1 datasets (one parquet and one mp4 per episode, jsonl meta), generated here in that layout."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from physis.data.layout import DatasetFormatError
from physis.data.reader import LeRobotDataset
from physis.data.video import VideoEncoder

from .conftest import FPS, SIZE, make_episode, psnr

LENGTHS = (7, 5)
TASKS = ["push the block", "open the drawer"]


def write_v21(root):
    features = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": None},
        "action": {"dtype": "float32", "shape": [2], "names": None},
        "observation.images.top": {"dtype": "video", "shape": [SIZE, SIZE, 3],
                                   "names": ["height", "width", "channel"],
                                   "info": {"video.fps": FPS, "video.codec": "av1", "video.is_depth_map": False}},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {"codebase_version": "v2.1", "robot_type": "test", "total_episodes": 2, "total_frames": sum(LENGTHS),
            "total_tasks": 2, "total_videos": 2, "total_chunks": 1, "chunks_size": 1000, "fps": FPS,
            "splits": {"train": "0:2"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": features}
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                   for i, t in enumerate(TASKS)))
    episodes, start, ep_lines, stat_lines = [], 0, [], []
    for e, n in enumerate(LENGTHS):
        ep = make_episode(n, 10 + e)
        episodes.append(ep)
        table = pa.table({
            "observation.state": pa.array(list(ep["observation.state"]), pa.list_(pa.float32(), 3)),
            "action": pa.array(list(ep["action"]), pa.list_(pa.float32())),  # variable-size lists occur too
            "timestamp": pa.array(np.arange(n) / FPS, pa.float32()),
            "frame_index": pa.array(np.arange(n), pa.int64()),
            "episode_index": pa.array([e] * n, pa.int64()),
            "index": pa.array(start + np.arange(n), pa.int64()),
            "task_index": pa.array([e] * n, pa.int64()),
        })
        path = root / f"data/chunk-000/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        enc = VideoEncoder(root / f"videos/chunk-000/observation.images.top/episode_{e:06d}.mp4", FPS, SIZE, SIZE)
        for frame in ep["observation.images.top"]:
            enc.add(frame)
        enc.close()
        ep_lines.append(json.dumps({"episode_index": e, "tasks": [TASKS[e]], "length": n}))
        a = ep["action"]
        stat_lines.append(json.dumps({"episode_index": e, "stats": {"action": {
            "min": a.min(0).tolist(), "max": a.max(0).tolist(), "mean": a.mean(0).tolist(),
            "std": a.std(0).tolist(), "count": [n]}}}))
        start += n
    (root / "meta/episodes.jsonl").write_text("\n".join(ep_lines) + "\n")
    (root / "meta/episodes_stats.jsonl").write_text("\n".join(stat_lines) + "\n")
    return episodes


def test_v21_dataset_loads(tmp_path):
    root = tmp_path / "v21"
    episodes = write_v21(root)
    ds = LeRobotDataset(root, delta_timestamps={"action": [0.0, 1 / FPS, 2 / FPS]}, cache_dir=tmp_path / "c")
    assert len(ds) == 12 and ds.tasks == TASKS
    s = ds[9]  # episode 1, frame 2
    assert s["task"] == "open the drawer" and int(s["episode_index"]) == 1
    assert np.array_equal(s["action"].numpy(), episodes[1]["action"][[2, 3, 4]])
    assert s["action_is_pad"].tolist() == [False, False, False]
    assert ds[11]["action_is_pad"].tolist() == [False, True, True]
    frame = (s["observation.images.top"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert psnr(frame, episodes[1]["observation.images.top"][2]) >= 35.0
    all_actions = np.concatenate([e["action"] for e in episodes])
    np.testing.assert_allclose(ds.stats["action"]["mean"], all_actions.mean(0), rtol=1e-5)
    np.testing.assert_allclose(ds.stats["action"]["std"], all_actions.std(0), rtol=1e-5)


def test_v21_missing_episode_file(tmp_path):
    root = tmp_path / "v21"
    write_v21(root)
    (root / "data/chunk-000/episode_000001.parquet").unlink()
    with pytest.raises(DatasetFormatError, match="episode_000001.parquet: parquet file is missing"):
        LeRobotDataset(root)


def test_v21_bad_jsonl(tmp_path):
    root = tmp_path / "v21"
    write_v21(root)
    (root / "meta/episodes.jsonl").write_text('{"episode_index": 0, "length": 7}\n{oops\n')
    with pytest.raises(DatasetFormatError, match="episodes.jsonl:2: not valid JSON"):
        LeRobotDataset(root)
