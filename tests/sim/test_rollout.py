"""Expert rollouts: with DART noise the robot runs a perturbed action and the data keeps the expert's own."""

import numpy as np
import pytest

from physis.sim import EnvConfig, make_env
from physis.sim.collect import CollectConfig, collect
from physis.sim.rollout import record_expert_episode


def _rollout(noise: float, seed: int = 3):
    env = make_env("pointmaze/bimodal", "bimodal", EnvConfig(render=False))
    executed = []
    step = env.step
    env.step = lambda a: executed.append(np.array(a)) or step(a)
    try:
        return record_expert_episode(env, seed, action_noise=noise), np.stack(executed)
    finally:
        env.close()


def test_dart_noise_perturbs_what_runs_and_records_the_expert():
    clean, ran_clean = _rollout(0.0)
    noisy, ran_noisy = _rollout(0.3)
    again, _ = _rollout(0.3)
    np.testing.assert_array_equal(clean.frames["action"], ran_clean.astype(np.float32))  # no noise: as run
    gap = ran_noisy - noisy.frames["action"]
    assert 0.1 < gap.std() < 0.4  # the robot ran the expert's action plus noise (clipped at the limits) ...
    assert np.all(np.abs(ran_noisy) <= 1.0)
    assert not np.allclose(noisy.frames["observation.state"][:50], clean.frames["observation.state"][:50])
    np.testing.assert_array_equal(noisy.frames["action"], again.frames["action"])  # ... drawn from the seed


def test_negative_action_noise_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--action-noise must be >= 0"):
        collect(CollectConfig(suite="pointmaze/bimodal", out=tmp_path / "d", action_noise=-0.1, progress=False))


def test_start_noise_is_checked_and_meta_world_only(tmp_path):
    with pytest.raises(ValueError, match="--start-noise must be >= 0 metres"):
        collect(CollectConfig(suite="metaworld/mt10", out=tmp_path / "d", start_noise=-0.1, progress=False))
    with pytest.raises(ValueError, match="--start-noise is implemented for the Meta-World suites, not pointmaze"):
        collect(CollectConfig(suite="pointmaze/bimodal", out=tmp_path / "d", start_noise=0.1, progress=False))


class _ConstantDriver:
    """A policy that always asks for the same small push (the real checkpoint driver is tested in test_collect)."""

    def __init__(self, action_dim: int, horizon: int = 5):
        self.chunk = np.full((horizon, action_dim), 0.25, dtype=np.float32)
        self.chunk[:, 1] = -0.25
        self.calls = 0
        self.resets = 0

    def reset(self):
        self.resets += 1

    def infer(self, obs):
        self.calls += 1
        return {"actions": self.chunk}


def test_a_driver_moves_the_robot_and_the_expert_labels_each_state():
    env = make_env("pointmaze/bimodal", "bimodal", EnvConfig(render=False, max_steps=30))
    executed = []
    step = env.step
    env.step = lambda a: executed.append(np.array(a)) or step(a)
    driver = _ConstantDriver(env.embodiment.action_dim)
    try:
        driven = record_expert_episode(env, 3, driver=driver, replan_every=3)
    finally:
        env.close()
    clean, _ = _rollout(0.0)
    ran = np.stack(executed)
    assert driven.length == len(ran) == 30 and not driven.success  # the push never reaches the goal
    assert driver.resets == 1 and driver.calls == 10  # asked again every 3 steps
    np.testing.assert_allclose(ran, np.tile(driver.chunk[0], (30, 1)))  # the driver's moves ran ...
    # ... while each frame's action is the expert's: from the same start, the same first label as the expert's own
    np.testing.assert_array_equal(driven.frames["action"][0], clean.frames["action"][0])
    assert not np.allclose(driven.frames["action"], ran)
    assert not np.allclose(driven.frames["observation.state"][1:10], clean.frames["observation.state"][1:10])
