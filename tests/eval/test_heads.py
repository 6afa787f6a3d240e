"""eval-heads refuses held-out data it cannot read the way the checkpoint was trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from physis.eval.heads import _check_cameras, env_state_by_task, hand_pull


def test_held_out_data_with_other_cameras_is_refused() -> None:
    trained = {"metaworld_sawyer": ["front", "gripper"]}
    _check_cameras(trained, {"metaworld_sawyer": ["front", "gripper"]}, Path("demos"))
    with pytest.raises(ValueError, match=r"cameras \['corner', 'gripper'\].*trained on \['front', 'gripper'\]"):
        _check_cameras(trained, {"metaworld_sawyer": ["corner", "gripper"]}, Path("demos"))


def test_per_task_errors_come_with_a_baseline_that_knows_the_task_but_not_the_scene() -> None:
    # normalized targets (x, y) of three first frames of "a" and one of "b"; std 0.1 m per coordinate
    target = np.array([[1.0, 0.0], [2.0, 0.0], [6.0, 0.0], [5.0, 5.0]])
    err = np.array([[0.5, 0.0], [0.5, 0.0], [0.5, 1.0], [1.0, 1.0]])
    tasks = np.array(["a", "a", "a", "b"])
    r = env_state_by_task(err, target, tasks, np.array([0, 1, 2, 3]), ["x", "y"], np.array([0.1, 0.1]))
    assert r["a"]["episodes"] == 3 and r["a"]["frames"] == 3
    assert r["a"]["mae"] == pytest.approx({"x": 0.05, "y": 1 / 30})
    # each frame against the mean of the other episodes: |1 - 4|, |2 - 3.5|, |6 - 1.5| -> mean 3.0 -> 0.3 m
    assert r["a"]["task_baseline_mae"] == pytest.approx({"x": 0.3, "y": 0.0})
    assert r["b"]["task_baseline_mae"] is None  # one episode: no other to average


def test_episodes_the_expert_failed_are_not_given_a_task(tmp_path: Path) -> None:
    import json

    from physis.eval.heads import _episode_tasks

    meta = tmp_path / "meta"
    meta.mkdir()
    episodes = [{"task": "push-v3", "seed": 7, "success": False, "episode_index": None},  # tried, not written
                {"task": "push-v3", "seed": 8, "success": True, "episode_index": 0},
                {"task": "reach-v3", "seed": 9, "success": True, "episode_index": 1}]
    (meta / "collection.json").write_text(json.dumps({"episodes": episodes}))
    assert _episode_tasks(tmp_path) == {0: "push-v3", 1: "reach-v3"}
    assert _episode_tasks(tmp_path / "elsewhere") is None  # not made by `physis collect`


def test_a_near_object_radius_must_be_a_distance_and_needs_relative_targets() -> None:
    from physis.eval.heads import _check_near_object

    relative = ["object_x", "object_x-robot"]
    _check_near_object(0.05, relative)
    _check_near_object(0.0, ["object_x"])  # off: nothing to check
    for bad in (-0.05, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="distance in metres"):
            _check_near_object(bad, relative)
    with pytest.raises(ValueError, match="trained without --env-state-relative"):
        _check_near_object(0.05, ["object_x"])


def test_the_pull_toward_the_hand_is_the_share_of_the_hand_offset_in_the_error() -> None:
    rng = np.random.default_rng(0)
    names = ["object_x", "object_y", "object_x-robot", "object_y-robot"]
    mean, std = np.array([0.0, 0.6, 0.05, -0.02]), np.array([0.1, 0.05, 0.08, 0.08])
    obj = np.stack([rng.uniform(-0.1, 0.1, 200), rng.uniform(0.55, 0.65, 200)], 1)
    hand = obj + rng.normal(0, 0.1, (200, 2))
    estimate = obj + np.array([0.25, 0.0]) * (hand - obj)  # x leans a quarter of the way to the hand, y not
    target = (np.concatenate([obj, obj - hand], 1) - mean) / std
    signed = np.concatenate([(estimate - obj) / std[:2], np.zeros((200, 2))], 1)
    assert hand_pull(signed, target, names, mean, std) == pytest.approx({"object_x": 0.25, "object_y": 0.0})
    assert hand_pull(signed[:, :2], target[:, :2], names[:2], mean[:2], std[:2]) is None  # no object-minus-hand
