"""`physis collect`: expert rollouts -> a LeRobot v3.0 dataset with subtasks, on training seeds only."""

import json

import numpy as np
import pytest

from physis.data.reader import LeRobotDataset
from physis.sim.collect import COLLECTION_META, CollectConfig, collect
from physis.sim.metaworld_expert import FINGERTIP_OFFSET
from physis.sim.metaworld_tasks import INSTRUCTIONS
from physis.sim.seeds import EVAL_SEEDS, TRAIN_SEEDS
from tests.data.lerobot_v3_conformance import check_lerobot_v3

TASKS = ("reach-v3", "drawer-close-v3")


def test_collect_writes_a_dataset_the_reader_loads_with_subtasks(tmp_path):
    out = tmp_path / "demos"
    summary = collect(CollectConfig(suite="metaworld/mt10", tasks=TASKS, episodes=2, out=out, image_size=32,
                                    workers=2, progress=False))
    assert summary.episodes == 4
    assert all(t.kept == 2 and t.successes >= 2 for t in summary.tallies.values())
    check_lerobot_v3(out)

    ds = LeRobotDataset(out)
    assert len(ds.episodes) == 4
    assert set(ds.features) >= {"observation.state", "action", "observation.images.corner",
                                "observation.images.gripper", "subtask_index"}
    assert set(ds.tasks) <= {p for t in TASKS for p in INSTRUCTIONS[t]}
    assert len(ds.subtasks) >= 2  # the experts go through phases
    item = ds[0]
    assert item["observation.images.corner"].shape == (3, 32, 32)
    assert item["subtask"] in ds.subtasks and item["task"] in ds.tasks
    assert np.isfinite(item["action"].numpy()).all()

    meta = json.loads((out / "meta" / COLLECTION_META).read_text())
    assert meta["suite"] == "metaworld/mt10" and meta["seed_split"] == "train"
    seeds = [e["seed"] for e in meta["episodes"]]
    assert all(TRAIN_SEEDS.start <= s < TRAIN_SEEDS.stop for s in seeds)
    assert not set(seeds) & set(EVAL_SEEDS)
    assert meta["seed_ranges"]["eval"] == [EVAL_SEEDS.start, EVAL_SEEDS.stop]
    kept = [e for e in meta["episodes"] if e["episode_index"] is not None]
    assert sorted(e["episode_index"] for e in kept) == [0, 1, 2, 3]
    assert meta["expert"]["reach-v3"]["success_rate"] > 0


def test_collect_is_deterministic(tmp_path):
    def run(out):
        collect(CollectConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, out=out, image_size=16,
                              workers=1, progress=False))
        return LeRobotDataset(out)

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    np.testing.assert_array_equal(a[5]["action"].numpy(), b[5]["action"].numpy())
    assert a[5]["subtask"] == b[5]["subtask"] and a[5]["task"] == b[5]["task"]


def test_collect_in_h264_reads_back_like_av1(tmp_path):
    common = dict(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, image_size=32, workers=1, progress=False)
    collect(CollectConfig(out=tmp_path / "h264", codec="h264", **common))
    collect(CollectConfig(out=tmp_path / "av1", **common))
    check_lerobot_v3(tmp_path / "h264")
    info = json.loads((tmp_path / "h264" / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.corner"]["info"]["video.codec"] == "h264"
    h264, av1 = LeRobotDataset(tmp_path / "h264")[7], LeRobotDataset(tmp_path / "av1")[7]
    np.testing.assert_array_equal(h264["action"].numpy(), av1["action"].numpy())
    # two lossy codecs of one rendered frame: close, not equal
    diff = (h264["observation.images.corner"] - av1["observation.images.corner"]).abs().float().mean()
    assert diff < 0.05


def test_collect_crf_sets_the_h264_quality_and_zero_keeps_the_rendered_frames(tmp_path):
    from physis.sim.base import EnvConfig
    from physis.sim.rollout import record_expert_episode
    from physis.sim.suites import make_env

    common = dict(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, image_size=32, workers=1, progress=False,
                  codec="h264")
    collect(CollectConfig(out=tmp_path / "q0", crf=0, **common))
    collect(CollectConfig(out=tmp_path / "q23", **common))
    info = json.loads((tmp_path / "q0" / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.corner"]["info"]["video.crf"] == 0
    seed = json.loads((tmp_path / "q0" / "meta" / COLLECTION_META).read_text())["episodes"][0]["seed"]
    rendered = record_expert_episode(make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=32)), seed)
    truth = rendered.frames["observation.images.corner"][7].astype(np.float32) / 255

    def error(name: str) -> float:
        img = LeRobotDataset(tmp_path / name)[7]["observation.images.corner"].permute(1, 2, 0).numpy()
        return float(np.abs(img - truth).mean())

    assert error("q0") < error("q23")  # only the colour subsampling is left at crf 0
    with pytest.raises(ValueError, match="--crf"):
        collect(CollectConfig(out=tmp_path / "bad", crf=99, **common))


def test_collect_records_the_environment_state_as_a_target(tmp_path):
    collect(CollectConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, out=tmp_path / "d", image_size=16,
                          workers=1, progress=False))
    ds = LeRobotDataset(tmp_path / "d")
    feature = ds.features["observation.environment_state"]
    assert feature["names"] == ["object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z"]
    env = ds.columns["observation.environment_state"]
    hand = ds.columns["observation.state"][:, :3]
    assert env.shape == (len(ds), 6) and np.isfinite(env).all()
    assert np.ptp(env[:, 3:], axis=0).max() < 1e-6  # reach: the goal stays put during the episode
    # The expert succeeded, so its fingertips end where the recorded goal is (reach succeeds within 5 cm; the
    # last recorded frame is the one before the successful step).
    tips = hand + FINGERTIP_OFFSET
    assert np.linalg.norm(tips[-1] - env[-1, 3:]) < 0.06
    assert np.linalg.norm(tips[0] - env[0, 3:]) > 0.06


def test_collect_max_frames_records_each_episode_s_opening_and_keeps_every_one(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = dict(suite="metaworld/mt10", tasks=("reach-v3",), episodes=2, image_size=16, workers=1, progress=False)
    collect(CollectConfig(out=whole, **common))
    summary = collect(CollectConfig(out=cut, max_frames=5, **common))
    assert summary.episodes == 2 and summary.attempts == 2  # kept without knowing whether the expert succeeds
    full, opening = LeRobotDataset(whole), LeRobotDataset(cut)
    assert [e.length for e in opening.episodes] == [5, 5]
    first = full.episodes[0].length  # the same seeds: the openings are the whole episodes' first frames
    np.testing.assert_array_equal(opening.columns["action"][:5], full.columns["action"][:5])
    states = full.columns["observation.state"]
    np.testing.assert_array_equal(opening.columns["observation.state"][5:], states[first : first + 5])
    meta = json.loads((cut / "meta" / COLLECTION_META).read_text())
    assert meta["config"]["max_frames"] == 5


def test_collect_refuses_a_negative_max_frames(tmp_path):
    with pytest.raises(ValueError, match="--max-frames must be 0"):
        collect(CollectConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, out=tmp_path / "d",
                              max_frames=-1, progress=False))


def test_a_checkpoint_drives_collection_and_every_episode_is_kept_with_expert_labels(tiny_checkpoint, tmp_path):
    from physis.sim.base import EnvConfig
    from physis.sim.rollout import record_expert_episode
    from physis.sim.suites import make_env

    out = tmp_path / "dagger"
    summary = collect(CollectConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, out=out, image_size=32,
                                    workers=1, progress=False, driver=tiny_checkpoint, replan_every=4))
    assert summary.episodes == 1 and summary.attempts == 1  # kept whatever the driver made of it
    meta = json.loads((out / "meta" / COLLECTION_META).read_text())
    assert meta["driver"] == str(tiny_checkpoint) and meta["config"]["replan_every"] == 4
    ds = LeRobotDataset(out)
    first = meta["episodes"][0]
    assert first["length"] == len(ds) and meta["expert"]["reach-v3"]["successes"] == int(first["success"])
    # The first frame is the same start as the expert's own episode on that seed, so it carries the same label;
    # later the 4-step-trained driver goes its own way, and the states part.
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=32))
    try:
        expert = record_expert_episode(env, first["seed"])
    finally:
        env.close()
    np.testing.assert_allclose(ds.columns["action"][0], expert.frames["action"][0], atol=1e-6)
    n = min(len(ds), expert.length)
    assert not np.allclose(ds.columns["observation.state"][:n], expert.frames["observation.state"][:n])


def test_a_driver_is_checked_before_collecting(tiny_checkpoint, tmp_path):
    common = dict(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, out=tmp_path / "d", progress=False)
    with pytest.raises(FileNotFoundError, match="--driver checkpoint"):
        collect(CollectConfig(driver=tmp_path / "missing", **common))
    with pytest.raises(ValueError, match="--replan-every must be >= 1"):
        collect(CollectConfig(driver=tiny_checkpoint, replan_every=0, **common))
    with pytest.raises(ValueError, match="does not combine with --action-noise"):
        collect(CollectConfig(driver=tiny_checkpoint, action_noise=0.1, **common))
