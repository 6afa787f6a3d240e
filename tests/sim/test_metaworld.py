"""The Meta-World wrapper: what the first frame of an episode shows."""

import numpy as np
import pytest

from physis.sim import EnvConfig, make_env


@pytest.mark.parametrize("task", ["reach-v3", "push-v3"])
def test_the_first_frame_shows_this_episodes_goal(task):
    env = make_env("metaworld/mt10", task, EnvConfig(image_size=32, cameras=("front",)))
    try:
        for seed in (1_000_000, 1_000_001):  # the second reset is where a stale marker would show
            env.reset(seed=seed)
            mw = env._env
            goal = mw.data.site_xpos[mw.model.site("goal").id]
            np.testing.assert_allclose(goal, mw._target_pos, atol=1e-6)  # where the renderer draws the marker
    finally:
        env.close()
