"""Environment-state values a policy holds for the rest of an episode once its localizer has read them.

A localizer learns from demonstrations, and along a demonstration the hand ends where the goal is: where the
images leave the goal uncertain, the estimate leans toward the hand. In closed loop that is a feedback loop:
the hand strays, the estimated goal follows it, and the policy stops short. A goal does not move within an
episode, so a policy can keep the estimate read at the episode's first chunk, before the hand has moved, and
feed it to the model from then on. The robot-relative counterparts ("NAME-robot", see
`physis.data.relative`) follow from the held value and the robot's current position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from physis.data.relative import robot_position
from physis.data.stats import EPS
from physis.embodiment import EmbodimentSpec

RELATIVE_SUFFIX = "-robot"


def latch_names(names: Sequence[str], env_state_names: Sequence[str]) -> tuple[str, ...]:
    """names, checked against a checkpoint's env_state_names: world-frame values, each once."""
    world = [n for n in env_state_names if not n.endswith(RELATIVE_SUFFIX)]
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
                 spec: EmbodimentSpec) -> None:
        """names: the values to hold, among env_state_names (the checkpoint's, in the model's order) and not
        robot-relative ones; mean/std: the checkpoint's environment-state normalization; spec: the robot."""
        env_state_names = list(env_state_names)
        self.names = latch_names(names, env_state_names)
        if len(mean) != len(env_state_names) or len(std) != len(env_state_names):
            raise ValueError(f"environment-state stats have {len(mean)} values, the names {len(env_state_names)}")
        self.width = len(env_state_names)
        self.index = np.array([env_state_names.index(n) for n in names], dtype=np.int64)
        self.mean, self.std = np.asarray(mean, np.float64), np.maximum(np.asarray(std, np.float64), EPS)
        # (relative index, world index, axis of the robot's position) for each held value with a counterpart
        self.relative: list[tuple[int, int, int]] = []
        rel_names = [n + RELATIVE_SUFFIX for n in names]
        if any(r in env_state_names for r in rel_names):
            self.position = robot_position(spec)
            size = self.position.stop - self.position.start
            for world_i, rel in zip(self.index, rel_names, strict=True):
                if rel in env_state_names:  # positions come in blocks of the robot's position size, as relative.py
                    self.relative.append((env_state_names.index(rel), int(world_i), int(world_i) % size))

    def hold(self, estimate: np.ndarray) -> np.ndarray:
        """The normalized estimate (env_state_dim,) -> the held values (len(names),) in the data's units."""
        return np.asarray(estimate, np.float64)[self.index] * self.std[self.index] + self.mean[self.index]

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
        robot = np.asarray(state, np.float64)[self.position] if self.relative else None
        for rel, world_i, axis in self.relative:
            native[rel] = native[world_i] - robot[axis]
            mask[rel] = True
        values[mask] = ((native - self.mean) / self.std)[mask]
        return values, mask
