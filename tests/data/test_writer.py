import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from physis.data import layout
from physis.data.reader import LeRobotDataset
from physis.data.writer import DatasetWriter

from .conftest import FPS, LENGTHS, features, make_episode, psnr, write


def test_round_trip_numeric_exact_and_video_within_codec_tolerance(written, tmp_path):
    root, episodes = written
    ds = LeRobotDataset(root, cache_dir=tmp_path / "cache")
    assert len(ds) == sum(LENGTHS) and len(ds.episodes) == len(LENGTHS)
    i = 0
    for e, ep in enumerate(episodes):
        for t in range(len(ep["action"])):
            s = ds[i]
            assert np.array_equal(s["observation.state"].numpy(), ep["observation.state"][t])
            assert np.array_equal(s["action"].numpy(), ep["action"][t])
            assert int(s["episode_index"]) == e and int(s["frame_index"]) == t and int(s["index"]) == i
            assert float(s["timestamp"]) == pytest.approx(t / FPS)
            assert s["task"] == f"task {e % 2}"
            assert s["subtask"] == ("reach" if t < len(ep["action"]) // 2 else "grasp")
            frame = (s["observation.images.top"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            assert psnr(frame, ep["observation.images.top"][t]) >= 35.0
            i += 1


def test_layout_on_disk(written):
    root, _ = written
    info = json.loads((root / layout.INFO_PATH).read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["total_episodes"] == 3 and info["total_frames"] == sum(LENGTHS) and info["total_tasks"] == 2
    assert info["features"]["observation.images.top"]["info"]["video.codec"] == "av1"
    assert info["features"]["subtask_index"] == {"dtype": "int64", "shape": [1], "names": None}
    ep = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [r["dataset_from_index"] for r in ep] == [0, 12, 21]
    assert [r["videos/observation.images.top/from_timestamp"] for r in ep] == [0.0, 12 / FPS, 21 / FPS]
    assert ep[1]["stats/action/mean"] == pytest.approx(np.mean(make_episode(9, 1)["action"], 0).tolist(), rel=1e-5)
    subtasks = pq.read_table(root / layout.SUBTASKS_PATH).to_pydict()
    assert subtasks["subtask"] == ["reach", "grasp"] and subtasks["subtask_index"] == [0, 1]
    stats = json.loads((root / layout.STATS_PATH).read_text())
    assert np.array(stats["observation.images.top"]["mean"]).shape == (3, 1, 1)
    assert stats["action"]["count"] == [sum(LENGTHS)]


def test_data_files_roll_over_by_size(tmp_path):
    root = tmp_path / "ds"
    # the encoder buffers a few frames before it emits bytes, so episodes here are long enough to emit some
    write(root, lengths=(40, 40, 40), data_files_size_in_mb=1e-6, video_files_size_in_mb=1e-6)
    files = sorted(p.name for p in (root / "data/chunk-000").iterdir())
    assert files == ["file-000.parquet", "file-001.parquet", "file-002.parquet"]
    assert len(list((root / "videos/observation.images.top/chunk-000").iterdir())) == 3
    ds = LeRobotDataset(root, video_mode="seek")
    assert int(ds[85]["episode_index"]) == 2 and ds[85]["observation.images.top"].shape == (3, 32, 32)


def test_chunk_directories_roll_over():
    assert layout.next_chunk_file(0, 998, 1000) == (0, 999)
    assert layout.next_chunk_file(0, 999, 1000) == (1, 0)


def test_append_adds_episodes_in_new_files(written, tmp_path):
    root = tmp_path / "ds"
    write(root, lengths=(6, 7))
    with DatasetWriter.append(root) as w:
        labels = ["carry"] * 5
        w.add_episode(make_episode(5, 9), task="task new", subtasks=labels)
    ds = LeRobotDataset(root, video_mode="seek")
    assert len(ds.episodes) == 3 and len(ds) == 18
    assert ds.tasks == ["task 0", "task 1", "task new"] and ds.subtasks == ["reach", "grasp", "carry"]
    assert (root / "data/chunk-000/file-001.parquet").is_file()
    assert ds[17]["task"] == "task new" and int(ds[17]["index"]) == 17
    assert ds.stats["action"]["count"].tolist() == [18]


def test_crash_while_appending_leaves_previous_dataset(tmp_path):
    root = tmp_path / "ds"
    write(root, lengths=(6,))
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="simulated crash"), DatasetWriter.append(root) as w:
        w.add_episode(make_episode(5, 3), task="t", subtasks=["a"] * 5)
        raise RuntimeError("simulated crash")
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # staging removed


def test_new_dataset_appears_only_when_finalized(tmp_path):
    root = tmp_path / "ds"
    w = DatasetWriter.create(root, fps=FPS, features=features())
    w.add_episode(make_episode(4, 0), task="t")
    assert not root.exists()
    w.finalize()
    assert (root / layout.INFO_PATH).is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ep: ep.pop("action"), "missing \\['action'\\]"),
        (lambda ep: ep.update(extra=np.zeros(4)), "unexpected \\['extra'\\]"),
        (lambda ep: ep.update(action=np.zeros((4, 3), np.float32)), "expected shape \\(4, 2\\)"),
        (lambda ep: ep.update({"observation.images.top": np.zeros((4, 32, 32, 3), np.float32)}), "uint8"),
        (lambda ep: ep.update(action=np.zeros((3, 2), np.float32)), "same, non-zero number of frames"),
    ],
)
def test_bad_episodes_are_rejected_with_a_clear_error(tmp_path, change, message):
    ep = make_episode(4, 0)
    change(ep)
    with pytest.raises(ValueError, match=message), DatasetWriter.create(tmp_path / "ds", FPS, features()) as w:
        w.add_episode(ep, task="t")
    assert not (tmp_path / "ds").exists()


def test_bad_features_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="must be even"):
        DatasetWriter.create(tmp_path / "a", FPS, {"cam": {"dtype": "video", "shape": [33, 32, 3]}})
    with pytest.raises(ValueError, match="written by the writer itself"):
        DatasetWriter.create(tmp_path / "b", FPS, {"timestamp": {"dtype": "float32", "shape": [1]}})
    with pytest.raises(FileExistsError):
        write(tmp_path / "c", lengths=(3,))
        DatasetWriter.create(tmp_path / "c", FPS, features())
