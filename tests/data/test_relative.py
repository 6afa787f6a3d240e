import numpy as np
import pytest

from physis.data.mixture import ENV_STATE
from physis.data.reader import LeRobotDataset
from physis.data.relative import add_relative_env_state, relative_positions, robot_position
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
