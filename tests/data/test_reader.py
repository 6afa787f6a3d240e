import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from physis.data import layout
from physis.data.layout import DatasetFormatError
from physis.data.reader import LeRobotDataset
from physis.data.video import FrameTimestampError, VideoDecodeError

from .conftest import FPS, LENGTHS, write


@pytest.fixture
def copy(written, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(written[0], root)
    return root


def test_windows_pad_at_both_episode_edges(written, tmp_path):
    root, episodes = written
    deltas = {"action": [k / FPS for k in range(4)], "observation.state": [-2 / FPS, -1 / FPS, 0.0],
              "observation.images.top": [-1 / FPS, 0.0]}
    ds = LeRobotDataset(root, delta_timestamps=deltas, cache_dir=tmp_path / "c")
    first = ds[LENGTHS[0]]  # frame 0 of episode 1: history padded, chunk inside
    assert first["observation.state_is_pad"].tolist() == [True, True, False]
    assert np.array_equal(first["observation.state"][0].numpy(), episodes[1]["observation.state"][0])  # clamped
    assert first["action_is_pad"].tolist() == [False] * 4
    assert first["observation.images.top"].shape == (2, 3, 32, 32)
    assert first["observation.images.top_is_pad"].tolist() == [True, False]
    last = ds[LENGTHS[0] + LENGTHS[1] - 2]  # second-to-last frame of episode 1: chunk runs off the end
    assert last["action_is_pad"].tolist() == [False, False, True, True]
    assert np.array_equal(last["action"].numpy(), episodes[1]["action"][[7, 8, 8, 8]])
    assert last["observation.state_is_pad"].tolist() == [False] * 3


def test_delta_timestamps_must_be_multiples_of_the_frame_period(written):
    with pytest.raises(ValueError, match="not multiples of 1/fps"):
        LeRobotDataset(written[0], delta_timestamps={"action": [0.0, 0.013]})
    with pytest.raises(ValueError, match="unknown feature"):
        LeRobotDataset(written[0], delta_timestamps={"actions": [0.0]})


def test_episode_selection_and_random_access(written):
    root, episodes = written
    ds = LeRobotDataset(root, episodes=[2], video_mode="seek")
    assert len(ds) == LENGTHS[2]
    assert int(ds[0]["episode_index"]) == 2 and int(ds[0]["index"]) == LENGTHS[0] + LENGTHS[1]
    assert np.array_equal(ds[-1]["action"].numpy(), episodes[2]["action"][-1])
    with pytest.raises(IndexError, match="out of range"):
        ds[LENGTHS[2]]
    with pytest.raises(IndexError, match="do not exist"):
        LeRobotDataset(root, episodes=[7])


def test_dataloader_batches(written, tmp_path):
    ds = LeRobotDataset(written[0], delta_timestamps={"action": [0.0, 1 / FPS]}, cache_dir=tmp_path / "c")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1)))
    assert batch["action"].shape == (5, 2, 2) and batch["observation.images.top"].shape == (5, 3, 32, 32)
    assert batch["task"] == ["task 0"] * 5


def test_cache_and_seek_give_the_same_frames(written, tmp_path):
    cached = LeRobotDataset(written[0], video_mode="cache", cache_dir=tmp_path / "c")
    seek = LeRobotDataset(written[0], video_mode="seek")
    for i in (0, 11, 12, 20, 35):
        assert torch.equal(cached[i]["observation.images.top"], seek[i]["observation.images.top"])


def test_unknown_codebase_version(copy):
    info = json.loads((copy / layout.INFO_PATH).read_text())
    info["codebase_version"] = "v1.6"
    (copy / layout.INFO_PATH).write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match="codebase_version 'v1.6' is not supported"):
        LeRobotDataset(copy)


def test_missing_info(copy):
    (copy / layout.INFO_PATH).unlink()
    with pytest.raises(DatasetFormatError, match="info.json: file is missing"):
        LeRobotDataset(copy)


def test_truncated_parquet(copy):
    path = copy / "data/chunk-000/file-000.parquet"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetFormatError, match="file-000.parquet: cannot read parquet"):
        LeRobotDataset(copy)


def test_missing_parquet(copy):
    (copy / "data/chunk-000/file-000.parquet").unlink()
    with pytest.raises(DatasetFormatError, match="file-000.parquet: parquet file is missing"):
        LeRobotDataset(copy)


def test_missing_video(copy):
    (copy / "videos/observation.images.top/chunk-000/file-000.mp4").unlink()
    with pytest.raises(DatasetFormatError, match="file-000.mp4: video file of camera 'observation.images.top'"):
        LeRobotDataset(copy)


def test_truncated_video(copy, tmp_path):
    path = copy / "videos/observation.images.top/chunk-000/file-000.mp4"
    path.write_bytes(path.read_bytes()[:300])
    ds = LeRobotDataset(copy, cache_dir=tmp_path / "c")
    with pytest.raises((VideoDecodeError, FrameTimestampError), match="file-000.mp4"):
        ds[30]


def test_timestamps_out_of_sync(copy):
    path = copy / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    ts = table["timestamp"].to_numpy().copy()
    ts[5] += 0.01
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                                    pa.array(ts, pa.float32())), path)
    with pytest.raises(DatasetFormatError, match="episode 0 frame 5 has timestamp 0.260000s, expected 0.250000s"):
        LeRobotDataset(copy)


def test_frame_missing_from_video_names_file_and_timestamp(copy, tmp_path):
    ep = copy / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(ep)
    col = "videos/observation.images.top/from_timestamp"
    shifted = pa.array([t + 10.0 for t in table[col].to_pylist()], pa.float64())
    pq.write_table(table.set_column(table.schema.get_field_index(col), col, shifted), ep)
    ds = LeRobotDataset(copy, cache_dir=tmp_path / "c")
    with pytest.raises(FrameTimestampError, match=r"file-000.mp4: no frame within 0.0001s of timestamp 10.0000"):
        ds[0]


def test_wrong_vector_width(copy):
    info = json.loads((copy / layout.INFO_PATH).read_text())
    info["features"]["action"]["shape"] = [3]
    (copy / layout.INFO_PATH).write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match="column 'action': expected 3 values per row, found 2"):
        LeRobotDataset(copy)


def test_frame_count_mismatch(copy):
    info = json.loads((copy / layout.INFO_PATH).read_text())
    info["total_episodes"] = 4
    (copy / layout.INFO_PATH).write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match="total_episodes is 4 but meta/episodes holds 3"):
        LeRobotDataset(copy)


def test_dataset_without_subtasks(tmp_path):
    write(tmp_path / "plain", lengths=(4,), subtasks=False)
    ds = LeRobotDataset(tmp_path / "plain", video_mode="seek")
    assert ds.subtasks is None and "subtask" not in ds[0]
