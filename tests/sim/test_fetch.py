"""The Fetch suite: observation format, determinism, rendering, action checks and the scripted experts."""

from __future__ import annotations

import numpy as np
import pytest

from physis.embodiment import load_embodiment
from physis.sim.base import ActionError, EnvConfig
from physis.sim.fetch import TASKS, FetchEnv, make
from physis.sim.seeds import eval_seeds
from physis.sim.suites import make_env

SPEC = load_embodiment("fetch")
LABELS = {
    "reach": {"move to the target"},
    "push": {"move behind the block", "lower the gripper", "push the block to the target"},
    "pick_and_place": {"move above the block", "lower around the block", "grasp the block", "lift the block",
                       "carry it to the target"},
}


@pytest.fixture(scope="module", params=list(TASKS))
def env(request: pytest.FixtureRequest):
    e = make(request.param, EnvConfig(image_size=32))
    yield e
    e.close()


def run_expert(env: FetchEnv, seed: int) -> tuple[bool, set[str]]:
    expert = env.expert()
    obs, _ = env.reset(seed=seed)
    expert.reset()
    labels: set[str] = set()
    done = False
    while not done:
        action, label = expert.act(obs)
        labels.add(label)
        obs, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    return bool(info["success"]), labels


def test_observation_format(env: FetchEnv) -> None:
    assert env.suite == f"fetch/{env.task}"
    obs, info = env.reset(seed=eval_seeds(1)[0])
    assert info == {"success": False}
    assert list(obs["state"]) == [g.name for g in SPEC.state]
    for g in SPEC.state:
        assert obs["state"][g.name].shape == (g.size,) and obs["state"][g.name].dtype == np.float32
    assert list(obs["images"]) == ["front"]
    img = obs["images"]["front"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert obs["instruction"] == TASKS[env.task].instructions[0]
    assert env.observation_space["images"].contains(obs["images"])
    assert env.observation_space["state"].contains(obs["state"])
    assert env.action_space.shape == (SPEC.action_dim,) == (4,)
    # the red target sphere the image shows sits on this episode's goal
    np.testing.assert_allclose(env.raw.data.site("target0").xpos, env.goal, atol=1e-6)


def test_step_moves_the_arm_and_the_image(env: FetchEnv) -> None:
    obs, _ = env.reset(seed=eval_seeds(1)[0])
    start_img, start_pos = obs["images"]["front"], obs["state"]["grip_pos"].copy()
    for _ in range(4):
        obs, reward, terminated, truncated, info = env.step(np.array([0.0, 0.0, 1.0, 0.0]))
        assert isinstance(reward, float) and isinstance(info["success"], bool)
    assert obs["state"]["grip_pos"][2] > start_pos[2] + 0.05  # 4 steps of up to 5 cm each
    assert env.elapsed_steps == 4
    assert np.abs(obs["images"]["front"].astype(int) - start_img.astype(int)).sum() > 0


def test_velocities_are_in_metres_per_second(env: FetchEnv) -> None:
    obs, _ = env.reset(seed=eval_seeds(1)[0])
    for _ in range(3):
        prev = obs["state"]["grip_pos"].copy()
        obs, *_ = env.step(np.array([1.0, 0.0, 0.0, 0.0]))
    # the gripper's speed matches its displacement over one control step (0.04 s), not the displacement itself
    finite_diff = (obs["state"]["grip_pos"] - prev) / env.raw.dt
    assert obs["state"]["grip_velp"][0] > 0.3
    np.testing.assert_allclose(obs["state"]["grip_velp"], finite_diff, atol=0.25)


def test_same_seed_same_start(env: FetchEnv) -> None:
    seed = eval_seeds(2)[1]
    a, _ = env.reset(seed=seed)
    goal = env.goal
    env.step(env.action_space.high)
    b, _ = env.reset(seed=seed)
    for k in a["state"]:
        np.testing.assert_array_equal(a["state"][k], b["state"][k])
    np.testing.assert_array_equal(a["images"]["front"], b["images"]["front"])
    np.testing.assert_array_equal(goal, env.goal)
    env.reset(seed=seed + 1)
    assert not np.allclose(goal, env.goal)  # the seed decides the target


def test_check_action_rejects_bad_actions(env: FetchEnv) -> None:
    env.reset(seed=eval_seeds(1)[0])
    for bad in (np.zeros(3), np.zeros(5), np.zeros((2, 4)), [0.0, np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0, 0.0]):
        with pytest.raises(ActionError):
            env.step(bad)
    np.testing.assert_array_equal(env.check_action([5, -5, 0.5, 2]), [1, -1, 0.5, 1])


def test_expert_solves_eval_seeds(env: FetchEnv) -> None:
    seen: set[str] = set()
    for seed in eval_seeds(3):
        success, labels = run_expert(env, seed)
        assert success, f"fetch/{env.task} expert failed on seed {seed}"
        seen |= labels
    assert seen <= LABELS[env.task]
    if env.task != "reach":  # reach has one phase; the others must go through several
        assert len(seen) >= 3


def test_expert_holds_the_block_on_the_target() -> None:
    env = make("pick_and_place", EnvConfig(render=False, terminate_on_success=False, max_steps=60))
    success, labels = run_expert(env, eval_seeds(1)[0])
    assert success and env.elapsed_steps == 60 and labels == LABELS["pick_and_place"]
    env.close()


def test_block_and_target_are_privileged() -> None:
    env = make("push", EnvConfig(render=False))
    obs, _ = env.reset(seed=eval_seeds(1)[0])
    assert obs["images"] == {}
    state = np.concatenate(list(obs["state"].values()))
    for secret in (env.object_pos, env.goal):
        assert not any(np.allclose(state[i:i + 3], secret, atol=1e-4) for i in range(len(state) - 2))
    env.close()


def test_registry_limits_and_instructions() -> None:
    env = make_env("fetch/reach", config=EnvConfig(render=False, max_steps=3, paraphrase=True))
    assert env.suite == "fetch/reach" and env.task == "reach"
    assert len(env.instructions) >= 4
    drawn = set()
    for seed in eval_seeds(12):
        obs, _ = env.reset(seed=seed)
        drawn.add(obs["instruction"])
    assert drawn <= set(env.instructions) and len(drawn) > 1
    env.reset(seed=0)
    truncated = False
    for _ in range(3):
        _, _, terminated, truncated, _ = env.step(np.array([0.0, 0.0, 0.0, 0.0]))
    assert truncated or terminated
    env.close()
    assert make("pick_and_place", EnvConfig(render=False)).max_steps == TASKS["pick_and_place"].max_steps


def test_unknown_task_and_camera() -> None:
    with pytest.raises(ValueError, match="reach"):
        make("slide", EnvConfig(render=False))
    with pytest.raises(ValueError, match="front"):
        make("reach", EnvConfig(cameras=("wrist",), image_size=32))
