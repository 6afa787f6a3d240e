import numpy as np
import pytest

from physis.data.mixture import ENV_STATE
from physis.data.reader import LeRobotDataset
from physis.data.relative import add_relative_env_state, near_positions, relative_positions, robot_position
from physis.embodiment import load_embodiment


def test_the_robot_position_is_its_first_position_group() -> None:
    assert robot_position(load_embodiment("metaworld_sawyer")) == slice(0, 3)
    assert robot_position(load_embodiment("pointmaze")) == slice(0, 2)
    with pytest.raises(ValueError, match="'aloha' has no state group of kind eef_pos or planar"):
        robot_position(load_embodiment("aloha"))


def test_relative_positions_subtract_the_robot_from_each_position() -> None:
    env = np.array([[1.0, 2.0, 3.0, 10.0, 20.0, 30.0]])
    state = np.array([[0.5, 0.25, 1.0, 0.7]])  # x, y, z, gripper
    np.testing.assert_allclose(relative_positions(env, state, slice(0, 3)),
                               [[0.5, 1.75, 2.0, 9.5, 19.75, 29.0]])
    with pytest.raises(ValueError, match="5 values is not a list of 3-D positions"):
        relative_positions(np.zeros((1, 5)), state, slice(0, 3))


def test_a_dataset_gains_the_relative_positions_with_names_and_statistics(tiny_run) -> None:
    root = tiny_run[0] / "demos"
    plain, ds = LeRobotDataset(root), LeRobotDataset(root)
    add_relative_env_state(ds, load_embodiment("metaworld_sawyer"))
    env, state = plain.columns[ENV_STATE], plain.columns["observation.state"]
    assert ds.features[ENV_STATE]["shape"] == [12]
    assert ds.features[ENV_STATE]["names"][6:] == [f"{n}-robot" for n in plain.features[ENV_STATE]["names"]]
    np.testing.assert_allclose(ds[5][ENV_STATE][:6], plain[5][ENV_STATE])
    np.testing.assert_allclose(ds[5][ENV_STATE][6:9], env[5, :3] - state[5, :3], atol=1e-6)
    np.testing.assert_allclose(ds.stats[ENV_STATE]["mean"][9:], (env[:, 3:] - state[:, :3]).mean(0), atol=1e-5)
    assert plain.stats[ENV_STATE]["mean"].shape == (6,)  # the file on disk is untouched


def test_near_positions_resolve_centimetres_close_up_and_saturate_far_away() -> None:
    near = near_positions(np.array([0.0, 0.01, -0.01, 0.5]), 0.04)
    np.testing.assert_allclose(near[:3], [0.0, np.tanh(0.25), -np.tanh(0.25)])
    assert near[3] > 0.9999  # 50 cm away: saturated, the plain relative value carries it
    # a centimetre near the object moves the near value about 10x more than it moves at 10 cm away
    assert near_positions(np.array(0.01), 0.04) - near_positions(np.array(0.0), 0.04) > \
        10 * (near_positions(np.array(0.11), 0.04) - near_positions(np.array(0.10), 0.04))
    with pytest.raises(ValueError, match="positive distance"):
        near_positions(np.zeros(3), 0.0)


def test_a_dataset_gains_the_near_field_positions_after_the_relative_ones(tiny_run) -> None:
    root = tiny_run[0] / "demos"
    relative, ds = LeRobotDataset(root), LeRobotDataset(root)
    spec = load_embodiment("metaworld_sawyer")
    add_relative_env_state(relative, spec)
    add_relative_env_state(ds, spec, near=0.04)
    names = relative.features[ENV_STATE]["names"]
    assert ds.features[ENV_STATE]["shape"] == [18]
    assert ds.features[ENV_STATE]["names"] == names + [f"{n}-near" for n in names[6:]]
    np.testing.assert_allclose(ds[5][ENV_STATE][:12], relative[5][ENV_STATE])
    np.testing.assert_allclose(ds[5][ENV_STATE][12:], np.tanh(relative[5][ENV_STATE][6:] / 0.04), atol=1e-6)
    assert ds.stats[ENV_STATE]["std"].shape == (18,)
