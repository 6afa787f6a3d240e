"""`physis train` as a command: what it validates up front, and what a chosen camera subset leaves behind."""

import dataclasses

import pytest

from physis.cli import main
from physis.runtime import Policy, example_observation
from physis.train.run import train


def test_a_negative_image_shift_is_refused_before_any_data_is_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--image-shift", "-2"])
    assert e.value.code == 2
    assert "--image-shift must be 0 (off) or a positive number of pixels, got -2" in capsys.readouterr().out


def test_training_on_a_camera_subset_gives_a_policy_that_asks_for_those_cameras(tiny_run, tmp_path):
    _, cmd, _ = tiny_run
    sub = dataclasses.replace(cmd, out=tmp_path / "gripper-only", steps=1, save_every=1, cameras=("gripper",))
    train(sub)
    obs = example_observation(sub.out)
    assert list(obs["images"]) == ["gripper"]
    policy = Policy.from_checkpoint(sub.out)
    assert policy.infer(obs)["actions"].shape[0] == cmd.horizon
