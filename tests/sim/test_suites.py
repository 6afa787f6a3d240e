"""Every suite builds, resets, steps and renders in the one observation format."""

import numpy as np
import pytest

from physis.sim import SUITES, ActionError, EnvConfig, UnknownNameError, get_suite, make_env, resolve_tasks
from physis.sim.base import state_vector

SMALL = EnvConfig(image_size=32, max_steps=5)
# One environment per distinct simulator (fetch/reach is the same env as the fetch suite's reach).
CASES = [("metaworld/mt10", "pick-place-v3"), ("metaworld/mt50", "basketball-v3"), ("fetch/reach", None),
         ("fetch/push", None), ("fetch/pick_and_place", None), ("hand/reach", None), ("pointmaze/bimodal", None),
         ("pusht", None), ("adroit/relocate", None)]


def test_every_registered_suite_is_covered():
    assert {s for s, _ in CASES} | {"fetch"} == set(SUITES)


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def env(request):
    suite, task = request.param
    e = make_env(suite, task, SMALL)
    yield e
    e.close()


def test_observation_format(env):
    obs, info = env.reset(seed=1_000_000)
    spec = env.embodiment
    assert info["success"] is False
    assert set(obs) == {"images", "state", "instruction"}
    assert isinstance(obs["instruction"], str) and obs["instruction"]
    assert list(obs["images"]) == [c.name for c in spec.cameras]
    for img in obs["images"].values():
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert img.std() > 1.0  # a real picture, not a blank buffer
    assert list(obs["state"]) == [g.name for g in spec.state]
    for g in spec.state:
        assert obs["state"][g.name].shape == (g.size,) and obs["state"][g.name].dtype == np.float32
    assert state_vector(obs, spec).shape == (spec.state_dim,)
    assert env.observation_space.contains(obs)


def test_steps_until_the_limit(env):
    env.reset(seed=1_000_001)
    lo, hi = env.embodiment.action_limits()
    action = (np.where(np.isfinite(lo), lo, -1) + np.where(np.isfinite(hi), hi, 1)) / 2
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(info["success"], bool) and np.isfinite(reward)
        if terminated:
            break
    assert truncated or terminated
    assert env.render().shape == (32, 32, 3)


def test_bad_actions_are_refused(env):
    env.reset(seed=1_000_002)
    with pytest.raises(ActionError, match="shape"):
        env.step(np.zeros(env.embodiment.action_dim + 1))
    with pytest.raises(ActionError, match="non-finite"):
        env.step(np.full(env.embodiment.action_dim, np.nan))


def test_same_seed_same_start(env):
    a, _ = env.reset(seed=1_000_003)
    b, _ = env.reset(seed=1_000_003)
    for k in a["state"]:
        np.testing.assert_array_equal(a["state"][k], b["state"][k])
    for k in a["images"]:
        np.testing.assert_array_equal(a["images"][k], b["images"][k])


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownNameError, match="metaworld/mt10") as e:
        get_suite("metaworld/mt11")
    assert "Did you mean 'metaworld/mt10'" in str(e.value)
    with pytest.raises(UnknownNameError, match="reach-v3"):
        resolve_tasks("metaworld/mt10", ["reach-v2"])
    with pytest.raises(UnknownNameError, match="name one of"):
        make_env("fetch")
    assert resolve_tasks("fetch") == ["reach", "push", "pick_and_place"]


def test_reset_needs_a_seed():
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(render=False))
    with pytest.raises(ValueError, match="seed"):
        env.reset()
    obs, _ = env.reset(seed=0)
    assert obs["images"] == {}
    assert env.suite == "metaworld/mt10"
