"""The localizer in closed loop: its estimates of object and goal positions against the simulator's truth.

On demonstrations a checkpoint's environment-state head can be scored offline (`physis eval-heads`), but a
policy drives the hand off the demonstrated paths, and there the estimate is what decides a grasp. During
`physis eval` each chunk's estimate (`Policy.infer(...)["env_state"]`) is compared with the simulator's
`environment_state()` at the same step: world-frame names (object_x, goal_y, ...) directly, robot-relative ones
("NAME-robot") as truth minus the robot's position from the observed state. Near-field values are a transform
of the relative ones and are not scored. Errors are also kept for the chunks where the position is within
NEAR_RADIUS of the robot, where a few millimetres decide a grasp, and for the first chunk, before the policy
has moved anything: whether a failure starts from a wrong reading or drifts into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from physis.data.relative import RELATIVE_SUFFIX, robot_position
from physis.embodiment import EmbodimentSpec

NEAR_RADIUS = 0.05  # metres: a position this close to the robot counts as near


class LocalizerLog:
    """Absolute errors of one episode's estimates, chunk by chunk, for the names the simulator can check."""

    def __init__(self, names: Sequence[str], truth_names: Sequence[str], spec: EmbodimentSpec) -> None:
        """names: the checkpoint's env_state_names (the estimate's order); truth_names: the suite's
        environment_state names (the simulator's order); spec: the robot (its position in the state)."""
        self.position = robot_position(spec)
        size = self.position.stop - self.position.start
        truth_names = list(truth_names)
        # (estimate index, truth index, robot axis or None) per scored name; positions come in blocks of `size`
        self.scored: list[tuple[str, int, int, int | None]] = []
        for i, name in enumerate(names):
            base = name[: -len(RELATIVE_SUFFIX)] if name.endswith(RELATIVE_SUFFIX) else name
            if base in truth_names:
                j = truth_names.index(base)
                self.scored.append((name, i, j, j % size if base != name else None))
        self.errors: list[np.ndarray] = []  # per chunk, one absolute error per scored name
        self.near: list[np.ndarray] = []  # per chunk, whether that name's position is within NEAR_RADIUS

    def add(self, estimate: np.ndarray, truth: np.ndarray, state: np.ndarray) -> None:
        """One chunk: the estimate (E,) in the data's units, the simulator's truth and the robot's native state."""
        estimate, truth, state = (np.asarray(a, np.float64) for a in (estimate, truth, state))
        robot = state[self.position]
        size = len(robot)
        errors, near = [], []
        for _, i, j, axis in self.scored:
            block = truth[j - j % size : j - j % size + size]
            target = truth[j] if axis is None else truth[j] - robot[axis]
            errors.append(abs(estimate[i] - target))
            near.append(np.linalg.norm(block - robot) < NEAR_RADIUS)
        self.errors.append(np.array(errors))
        self.near.append(np.array(near))

    def summary(self) -> dict[str, Any] | None:
        """{"chunks", "mae": {name: m}, "first": {name: error at the first chunk}, "near_chunks": {name: n},
        "near_mae": {name: m}}, None without chunks."""
        if not self.errors:
            return None
        errors, near = np.stack(self.errors), np.stack(self.near)
        names = [s[0] for s in self.scored]
        return {
            "chunks": len(errors),
            "mae": {n: round(float(errors[:, k].mean()), 5) for k, n in enumerate(names)},
            "first": {n: round(float(errors[0, k]), 5) for k, n in enumerate(names)},
            "near_chunks": {n: int(near[:, k].sum()) for k, n in enumerate(names)},
            "near_mae": {n: round(float(errors[near[:, k], k].mean()), 5) for k, n in enumerate(names)
                         if near[:, k].any()},
        }


def pooled(summaries: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Episode summaries pooled chunk-weighted: the same keys, over every chunk of those episodes ("first": the
    mean over episodes)."""
    summaries = [s for s in summaries if s]
    if not summaries:
        return None
    chunks = sum(s["chunks"] for s in summaries)
    names = list(summaries[0]["mae"])
    near_n = {n: sum(s["near_chunks"].get(n, 0) for s in summaries) for n in names}
    return {
        "episodes": len(summaries),
        "chunks": chunks,
        "mae": {n: round(sum(s["mae"][n] * s["chunks"] for s in summaries) / chunks, 5) for n in names},
        "first": {n: round(sum(s["first"][n] for s in summaries) / len(summaries), 5) for n in names},
        "near_chunks": near_n,
        "near_mae": {n: round(sum(s["near_mae"][n] * s["near_chunks"][n] for s in summaries if n in s["near_mae"])
                              / near_n[n], 5) for n in names if near_n[n]},
    }
