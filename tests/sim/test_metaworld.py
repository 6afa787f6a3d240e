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


def test_start_noise_moves_the_hand_per_seed_and_the_expert_still_succeeds():
    home = make_env("metaworld/mt10", "reach-v3", EnvConfig(render=False))
    moved = make_env("metaworld/mt10", "reach-v3", EnvConfig(render=False, start_noise=0.1))
    starts = []
    for seed in (0, 1, 0):
        h, _ = home.reset(seed=seed)
        m, _ = moved.reset(seed=seed)
        starts.append(m["state"]["eef_pos"].copy())
        assert np.abs(h["state"]["eef_pos"] - [0.0, 0.6, 0.2]).max() < 0.01  # the usual start, every seed
        assert 0.01 < np.abs(m["state"]["eef_pos"] - h["state"]["eef_pos"]).max() < 0.11
        assert np.allclose(moved.privileged_obs[-3:], home.privileged_obs[-3:])  # the same goal as without noise
    assert np.allclose(starts[0], starts[2]) and not np.allclose(starts[0], starts[1])  # drawn from the seed
    expert = moved.expert()
    expert.reset()
    obs, _ = moved.reset(seed=3)
    for _ in range(200):
        obs, _, done, _, info = moved.step(expert.act(obs)[0])
        if done:
            break
    assert info["success"]
    with pytest.raises(ValueError, match="start_noise must be >= 0 metres"):
        make_env("metaworld/mt10", "reach-v3", EnvConfig(render=False, start_noise=-1.0))
    for env in (home, moved):
        env.close()


def _marker_pixels(env, camera: str) -> int:
    """Pixels the goal marker covers in `camera`: the frame with the marker against the frame without it."""
    mw = env._env
    site = mw.model.site("goal").id
    shown = env.observe()["images"][camera].astype(int)
    alpha = mw.model.site_rgba[site, 3]
    mw.model.site_rgba[site, 3] = 0.0
    try:
        hidden = env.observe()["images"][camera].astype(int)
    finally:
        mw.model.site_rgba[site, 3] = alpha
    return int((np.abs(shown - hidden).sum(axis=-1) > 30).sum())


def test_the_near_front_camera_shows_the_reach_goal_larger_than_the_front_camera():
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=96, cameras=("front", "front_near")))
    try:
        for seed in (1_000_000, 1_000_001, 1_000_002, 1_000_003):
            env.reset(seed=seed)
            far, near = _marker_pixels(env, "front"), _marker_pixels(env, "front_near")
            assert far > 0, seed  # in view in both
            assert near > 1.5 * far, (seed, far, near)
    finally:
        env.close()


def _marker_centroid(env, camera: str) -> np.ndarray:
    """The goal marker's (row, col) centroid in `camera`: where the frame with it differs from the one without."""
    mw = env._env
    site = mw.model.site("goal").id
    shown = env.observe()["images"][camera].astype(int)
    alpha = mw.model.site_rgba[site, 3]
    mw.model.site_rgba[site, 3] = 0.0
    try:
        hidden = env.observe()["images"][camera].astype(int)
    finally:
        mw.model.site_rgba[site, 3] = alpha
    rows, cols = np.nonzero(np.abs(shown - hidden).sum(axis=-1) > 30)
    assert len(rows), camera
    return np.array([rows.mean(), cols.mean()])


def test_the_side_camera_sees_the_height_the_front_camera_confuses_with_depth():
    import mujoco

    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=96, cameras=("front", "side")))
    mw = env._env
    site = mw.model.site("goal").id
    try:
        env.reset(seed=1_000_000)
        before = {c: _marker_centroid(env, c) for c in ("front", "side")}
        # 5 cm up and 5 cm further from `front` (45 degrees down): about along its view ray
        mw.model.site_pos[site] += [0.0, 0.05, 0.05]
        mujoco.mj_forward(mw.model, mw.data)
        after = {c: _marker_centroid(env, c) for c in ("front", "side")}
    finally:
        env.close()
    assert np.abs(after["front"] - before["front"]).max() < 2.0  # one ray: hardly moves in `front`
    assert after["side"][0] < before["side"][0] - 4.0  # clearly higher in `side`
