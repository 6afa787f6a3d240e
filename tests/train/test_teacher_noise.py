"""Teacher noise: the positions the localizer teacher feeds move together, and only those."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from physis.data.stats import stats_from_json
from physis.train.run import build, command_batches
from physis.train.teacher_noise import TeacherNoise

WORLD = ["object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z"]
NAMES = WORLD + [f"{n}-robot" for n in WORLD] + [f"{n}-robot-near" for n in WORLD]
NEAR = 0.04


def _native(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    world = rng.uniform(-0.3, 0.9, (rows, 6))
    relative = world - rng.uniform(-0.2, 0.7, (rows, 1))
    return np.concatenate([world, relative, np.tanh(relative / NEAR)], axis=1)


def test_a_displacement_moves_a_position_and_its_relative_counterparts_together() -> None:
    native = _native(64)
    mean, std = native.mean(0), native.std(0)
    noise = TeacherNoise(NAMES, mean, std, sigma=0.02, near=NEAR)
    moved = noise(torch.tensor((native - mean) / std, dtype=torch.float32), torch.Generator().manual_seed(0))
    out = moved.double().numpy() * std + mean
    shift = out[:, :6] - native[:, :6]
    assert 0.01 < shift.std() < 0.03  # about sigma per axis
    assert np.allclose(out[:, 6:12] - native[:, 6:12], shift, atol=1e-4)  # the hand did not move
    assert np.allclose(out[:, 12:], np.tanh(out[:, 6:12] / NEAR), atol=1e-3)  # still the tanh of the relative
    again = noise(torch.tensor((native - mean) / std, dtype=torch.float32), torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)  # a pure function of the generator


def test_bad_settings_are_refused() -> None:
    mean, std = np.zeros(18), np.ones(18)
    with pytest.raises(ValueError, match="positive distance"):
        TeacherNoise(NAMES, mean, std, sigma=0.0, near=NEAR)
    with pytest.raises(ValueError, match="near-field scale"):
        TeacherNoise(NAMES, mean, std, sigma=0.02)
    with pytest.raises(ValueError, match="stats have 12 values"):
        TeacherNoise(NAMES, mean[:12], std[:12], sigma=0.02, near=NEAR)


def test_training_batches_carry_a_displaced_copy_for_the_teacher_only(tiny_run) -> None:
    _, cmd, _ = tiny_run
    cmd = dataclasses.replace(cmd, env_state_weight=1.0, keypoints=4, localizer=True, env_state_relative=True,
                              env_state_near=NEAR, localizer_teacher=0.5, localizer_teacher_noise=0.02)
    _, data, meta = build(cmd)
    assert meta["augment"]["localizer_teacher_noise"] == 0.02
    batch = next(iter(command_batches(cmd, data, seed=0, steps=1)))
    truth, fed = batch["env_state"], batch["env_state_teacher"]
    assert truth.shape == fed.shape and not torch.equal(truth, fed)
    stats = stats_from_json(data.stats["metaworld_sawyer"]["stats"])["observation.environment_state"]
    width = len(data.env_state_names) // 3
    shift = (fed - truth).numpy()[:, :width] * stats["std"][:width]  # metres, world frame
    assert np.abs(shift).max() < 0.15 and np.abs(shift).mean() > 0.003
    plain = next(iter(command_batches(dataclasses.replace(cmd, localizer_teacher_noise=0.0), data, seed=0, steps=1)))
    assert "env_state_teacher" not in plain and torch.equal(plain["env_state"], truth)  # the target stays exact


def test_the_noise_needs_the_teacher(tiny_run) -> None:
    _, cmd, _ = tiny_run
    cmd = dataclasses.replace(cmd, env_state_weight=1.0, keypoints=4, localizer=True, localizer_teacher_noise=0.02)
    with pytest.raises(Exception, match="needs|--localizer-teacher too"):
        build(cmd)
