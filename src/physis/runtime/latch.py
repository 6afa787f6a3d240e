"""Environment-state values a policy holds for the rest of an episode once its localizer has read them.

A localizer learns from demonstrations, and along a demonstration the hand ends where the goal is: where the
images leave the goal uncertain, the estimate leans toward the hand. In closed loop that is a feedback loop:
the hand strays, the estimated goal follows it, and the policy stops short. A goal does not move within an
episode, so a policy can keep the estimate read at the episode's first chunk, before the hand has moved, and
feed it to the model from then on. The robot-relative counterparts ("NAME-robot" and, on the near-field
scale, "NAME-robot-near"; see `physis.data.relative`) follow from the held value and the robot's current
position.

An object stays put only until the hand reaches it. With a release distance, held values are let go once the
robot's position comes within that distance of the held position, and the model's own estimate is fed again
for the rest of the episode: the first reading steers the approach, the live one the grasp.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from physis.data.relative import NEAR_SUFFIX, RELATIVE_SUFFIX, near_positions, robot_position
from physis.data.stats import EPS
from physis.embodiment import EmbodimentSpec


def latch_names(names: Sequence[str], env_state_names: Sequence[str]) -> tuple[str, ...]:
    """names, checked against a checkpoint's env_state_names: world-frame values, each once."""
    world = [n for n in env_state_names if not n.endswith((RELATIVE_SUFFIX, NEAR_SUFFIX))]
    if not env_state_names:
        raise ValueError("latching needs a checkpoint whose localizer estimates a named environment state "
                         "(config.json env_state_names); this one lists none")
    bad = [n for n in names if n not in world]
    if bad:
        raise ValueError(f"cannot latch {bad}: the checkpoint's world-frame environment-state values are {world} "
                         f"(robot-relative ones follow from them)")
    if len(set(names)) != len(names):
        raise ValueError(f"latch names repeat: {list(names)}")
    return tuple(names)


class EnvStateLatch:
    """Which environment-state values are held, and how they go to and from the model's normalized units."""

    def __init__(self, names: Sequence[str], env_state_names: Sequence[str], mean: np.ndarray, std: np.ndarray,
                 spec: EmbodimentSpec, near: float = 0.0, release: float = 0.0) -> None:
        """names: the values to hold, among env_state_names (the checkpoint's, in the model's order) and not
        robot-relative ones; mean/std: the checkpoint's environment-state normalization; spec: the robot;
        near: the near-field scale of the "-robot-near" values (the checkpoint's data.env_state_near); release:
        let the held values go once the robot is within this distance of them (0: hold for the whole episode)."""
        env_state_names = list(env_state_names)
        self.names = latch_names(names, env_state_names)
        if len(mean) != len(env_state_names) or len(std) != len(env_state_names):
            raise ValueError(f"environment-state stats have {len(mean)} values, the names {len(env_state_names)}")
        self.width = len(env_state_names)
        self.index = np.array([env_state_names.index(n) for n in names], dtype=np.int64)
        self.mean, self.std = np.asarray(mean, np.float64), np.maximum(np.asarray(std, np.float64), EPS)
        # (relative index, world index, axis of the robot's position) for each held value with a counterpart,
        # and the same for the near-field counterparts
        self.relative: list[tuple[int, int, int]] = []
        self.near_relative: list[tuple[int, int, int]] = []
        self.near = near
        for suffix, found in ((RELATIVE_SUFFIX, self.relative), (NEAR_SUFFIX, self.near_relative)):
            for world_i, name in zip(self.index, names, strict=True):
                if name + suffix in env_state_names:  # positions come in blocks of the robot's position size
                    self.position = robot_position(spec)
                    size = self.position.stop - self.position.start
                    found.append((env_state_names.index(name + suffix), int(world_i), int(world_i) % size))
        if self.near_relative and not near > 0:
            raise ValueError("the checkpoint estimates near-field positions (NAME-robot-near) but no near-field "
                             "scale was given (its data.env_state_near)")
        if not (release >= 0 and np.isfinite(release)):
            raise ValueError(f"the release distance must be a finite number >= 0, got {release}")
        self.release = float(release)
        if release > 0:
            axes = [axis for _, _, axis in self.relative or self.near_relative]
            if not axes or len(set(axes)) != len(axes):
                raise ValueError(f"a release distance needs the held values to be one position with robot-relative "
                                 f"counterparts (e.g. object_x object_y object_z), not {list(self.names)}")

    def hold(self, estimate: np.ndarray) -> np.ndarray:
        """The normalized estimate (env_state_dim,) -> the held values (len(names),) in the data's units."""
        return np.asarray(estimate, np.float64)[self.index] * self.std[self.index] + self.mean[self.index]

    def reached(self, held: np.ndarray | None, state: np.ndarray) -> bool:
        """Whether the robot (native state) has come within the release distance of the held position."""
        if held is None or self.release <= 0:
            return False
        robot = np.asarray(state, np.float64)[self.position]
        pairs = self.relative or self.near_relative
        where = np.array([held[list(self.index).index(world_i)] for _, world_i, _ in pairs])
        return bool(np.linalg.norm(where - robot[[axis for _, _, axis in pairs]]) <= self.release)

    def given(self, held: np.ndarray | None, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the model is fed instead of its estimate: normalized values (env_state_dim,) and where they apply
        (a bool mask), from the held values (None: nothing held yet) and the robot's native state."""
        values = np.zeros(self.width, np.float32)
        mask = np.zeros(self.width, bool)
        if held is None:
            return values, mask
        native = np.zeros(self.width, np.float64)
        native[self.index] = held
        mask[self.index] = True
        robot = np.asarray(state, np.float64)[self.position] if self.relative or self.near_relative else None
        for rel, world_i, axis in self.relative:
            native[rel] = native[world_i] - robot[axis]
            mask[rel] = True
        for rel, world_i, axis in self.near_relative:
            native[rel] = near_positions(native[world_i] - robot[axis], self.near)
            mask[rel] = True
        values[mask] = ((native - self.mean) / self.std)[mask]
        return values, mask
