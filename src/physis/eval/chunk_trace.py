"""A closed-loop episode chunk by chunk: what the policy saw, said and did, beside the simulator's truth.

`physis eval --traces N` writes one JSON line per planned chunk for the first N episodes of each task: the step, the
subtask the policy named, the robot's native state, the first action of the chunk, the simulator's environment
state (object and goal positions, where the suite records them) and the policy's own estimate of it. Reading a
failed episode this way shows where it went wrong: a grasp closed too high, a hand hovering beside the object, an
estimate that follows the hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from physis.sim.base import state_vector
from physis.sim.suites import get_suite


def _values(names: Any, values: Any) -> dict[str, float] | None:
    if values is None or not names:
        return None
    return {str(n): round(float(v), 5) for n, v in zip(names, np.asarray(values).reshape(-1), strict=False)}


class ChunkTrace:
    """The chunks of one episode, written as JSON lines (one per chunk) by `write`."""

    def __init__(self, env: Any, estimate_names: Any = ()) -> None:
        self.env = env
        self.truth_names = list(get_suite(env.suite).environment_state or ())
        self.estimate_names = list(estimate_names or ())
        self.rows: list[dict[str, Any]] = []

    def add(self, step: int, obs: dict[str, Any], output: Any, chunk: np.ndarray) -> None:
        """One planned chunk: the observation it was planned from, the policy's output and the chunk itself."""
        out = output if isinstance(output, dict) else {}
        truth = self.env.environment_state() if self.truth_names else None
        self.rows.append({
            "step": step,
            "subtask": out.get("subtask"),
            "state": [round(float(v), 5) for v in state_vector(obs, self.env.embodiment)],
            "action": [round(float(v), 4) for v in np.asarray(chunk)[0]],
            "environment_state": _values(self.truth_names, truth),
            "estimate": _values(self.estimate_names, out.get("env_state")),
        })

    def write(self, path: Path, summary: dict[str, Any]) -> None:
        """The chunks, then one last line with the episode's outcome (`summary`), written whole or not at all."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            for row in [*self.rows, {"episode": summary}]:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
