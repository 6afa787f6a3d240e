"""Environment-state positions relative to the robot's own: what the robot must move by to reach them.

A camera on the hand sees an object where it is relative to the hand, not where it is in the world, and a
demonstrated approach is a function of that displacement. `add_relative_env_state` appends, to a dataset's
observation.environment_state, each of its positions minus the robot's position (from the state), so a
model can be trained to estimate both the world-frame and the robot-relative positions.
"""

from __future__ import annotations

import numpy as np

from physis.data.reader import LeRobotDataset
from physis.data.stats import compute_stats
from physis.embodiment import EmbodimentSpec

ENV_STATE = "observation.environment_state"  # LeRobot's name for privileged simulator state
POSITION_KINDS = ("eef_pos", "planar")  # state groups that hold the robot's position in the world frame


def robot_position(spec: EmbodimentSpec) -> slice:
    """The native state dimensions holding the robot's position: its first group of a position kind."""
    offset = 0
    for group in spec.state:
        if group.kind in POSITION_KINDS:
            return slice(offset, offset + group.size)
        offset += group.size
    raise ValueError(f"embodiment '{spec.name}' has no state group of kind {' or '.join(POSITION_KINDS)}, so the "
                     f"environment state cannot be made relative to the robot; its state groups are "
                     f"{[(g.name, g.kind) for g in spec.state]}")


def relative_positions(env: np.ndarray, state: np.ndarray, position: slice) -> np.ndarray:
    """env (..., E) positions of size P each, minus the robot's (state[..., position], size P): (..., E)."""
    size = position.stop - position.start
    if env.shape[-1] % size:
        raise ValueError(f"an environment state of {env.shape[-1]} values is not a list of {size}-D positions, so it "
                         f"cannot be made relative to the robot's {size}-D position")
    robot = state[..., position]
    return (env.reshape(*env.shape[:-1], -1, size) - robot[..., None, :]).reshape(env.shape)


def add_relative_env_state(ds: LeRobotDataset, spec: EmbodimentSpec, env_key: str = ENV_STATE,
                           state_key: str = "observation.state") -> None:
    """Extends ds's environment state (values, names, statistics) in place from E to 2E values: the world-frame
    positions, then the same minus the robot's position. A dataset without an environment state is left as is."""
    if env_key not in ds.features or env_key not in ds.columns:
        return
    env = np.asarray(ds.columns[env_key], dtype=np.float32)
    relative = relative_positions(env, np.asarray(ds.columns[state_key], dtype=np.float32), robot_position(spec))
    ds.columns[env_key] = np.concatenate([env, relative], axis=-1)
    feature = dict(ds.features[env_key])
    width = env.shape[-1]
    names = list(feature.get("names") or [str(i) for i in range(width)])
    feature["names"] = names + [f"{n}-robot" for n in names]
    feature["shape"] = [2 * width]
    ds.features[env_key] = feature
    ds.stats[env_key] = compute_stats(ds.columns[env_key])
