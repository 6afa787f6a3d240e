"""hand/reach: the Shadow hand HandReach suite and its IK expert."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from physis.sim.base import EnvConfig  # noqa: E402
from physis.sim.hand import INSTRUCTIONS, LABEL_HOLD, LABEL_SHAPE, make  # noqa: E402
from physis.sim.seeds import eval_seeds  # noqa: E402
from physis.sim.suites import make_env  # noqa: E402


@pytest.fixture(scope="module")
def env():
    e = make("reach", EnvConfig(image_size=32))
    yield e
    e.close()


def test_constructs_resets_steps_and_renders(env):
    assert env.suite == "hand/reach" and env.max_steps == 50
    obs, info = env.reset(seed=eval_seeds(1)[0])
    assert info == {"success": False}
    assert obs["instruction"] == INSTRUCTIONS[0]
    img = obs["images"]["front"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img.std() > 5  # a hand in front of the floor, not a blank frame
    obs2, reward, terminated, truncated, info = env.step(np.zeros(20))
    assert reward in (-1.0, 0.0) and not truncated and "distance" in info
    assert not np.array_equal(obs2["state"]["joint_pos"], obs["state"]["joint_pos"])  # the hand moved
    with pytest.raises(ValueError):
        env.step(np.zeros(19))


def test_state_groups_match_spec(env):
    obs, _ = env.reset(seed=eval_seeds(2)[1])
    spec = env.embodiment
    assert list(obs["state"]) == [g.name for g in spec.state]
    for g in spec.state:
        assert obs["state"][g.name].shape == (g.size,) and obs["state"][g.name].dtype == np.float32
    assert list(obs["images"]) == [c.name for c in spec.cameras]
    np.testing.assert_allclose(obs["state"]["target_fingertip_pos"], env.goal, atol=1e-6)
    np.testing.assert_allclose(obs["state"]["fingertip_pos"], env.fingertips(), atol=1e-6)
    assert env.action_space.shape == (20,)


def test_same_seed_same_initial_observation(env):
    seed = eval_seeds(3)[2]
    first, _ = env.reset(seed=seed)
    env.step(np.ones(20))
    again, _ = env.reset(seed=seed)
    for k in first["state"]:
        np.testing.assert_array_equal(first["state"][k], again["state"][k])
    np.testing.assert_array_equal(first["images"]["front"], again["images"]["front"])
    goals = {tuple(env.reset(seed=s)[0]["state"]["target_fingertip_pos"].round(4)) for s in eval_seeds(5)}
    assert len(goals) > 1  # the seed draws the target


def test_paraphrases():
    e = make_env("hand/reach", config=EnvConfig(render=False, paraphrase=True))
    seen = {e.reset(seed=s)[0]["instruction"] for s in range(30)}
    assert seen <= set(INSTRUCTIONS) and len(seen) > 1


def test_expert_solves_eval_seeds():
    e = make("reach", EnvConfig(render=False))
    for seed in eval_seeds(3):
        obs, _ = e.reset(seed=seed)
        expert = e.expert()
        expert.reset()
        labels, done = [], False
        while not done:
            action, label = expert.act(obs)
            assert action.shape == (20,) and np.all(np.abs(action) <= 1)
            labels.append(label)
            obs, _, terminated, truncated, info = e.step(action)
            done = terminated or truncated
        assert e.success and info["distance"] < 0.01, f"seed {seed}: {info['distance']:.4f} m from the targets"
        assert labels[0] in (LABEL_SHAPE, LABEL_HOLD)
        assert all(label.islower() for label in labels)
