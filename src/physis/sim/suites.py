"""The suite registry: names -> tasks and environment factories (imported lazily, simulators are heavy)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence
from dataclasses import dataclass

from physis.sim.base import EnvConfig, SimEnv
from physis.sim.metaworld_tasks import MT10, MT50


class UnknownNameError(KeyError):
    """An unknown suite or task; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Suite:
    name: str
    embodiment: str
    tasks: tuple[str, ...]
    factory: str  # "module:function" taking (task, EnvConfig) -> SimEnv
    description: str = ""
    # Names of the privileged simulator state its environments report through `environment_state()` (object
    # and goal positions), recorded by `physis collect` as observation.environment_state: a training target
    # only, never a policy input. Empty: the suite does not report one.
    environment_state: tuple[str, ...] = ()

    def make(self, task: str, config: EnvConfig | None = None) -> SimEnv:
        if task not in self.tasks:
            raise UnknownNameError(_unknown("task", task, self.tasks, f" in suite {self.name!r}"))
        module, func = self.factory.split(":")
        env = getattr(importlib.import_module(module), func)(task, config or EnvConfig())
        env.suite = self.name  # a task shared by two suites (MT10 within MT50) reports the one asked for
        return env


_MW = "physis.sim.metaworld:make"
_MW_ENV_STATE = ("object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z")
_FETCH = "physis.sim.fetch:make"

SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("metaworld/mt10", "metaworld_sawyer", MT10, _MW, "Meta-World MT10: ten Sawyer manipulation tasks",
          _MW_ENV_STATE),
    Suite("metaworld/mt50", "metaworld_sawyer", MT50, _MW, "Meta-World MT50: all fifty Sawyer manipulation tasks",
          _MW_ENV_STATE),
    Suite("fetch", "fetch", ("reach", "push", "pick_and_place"), _FETCH,
          "Fetch reach, push and pick-and-place (gymnasium-robotics)"),
    Suite("fetch/reach", "fetch", ("reach",), _FETCH, "Fetch: move the gripper to a target in the air"),
    Suite("fetch/push", "fetch", ("push",), _FETCH, "Fetch: push a block to a target on the table"),
    Suite("fetch/pick_and_place", "fetch", ("pick_and_place",), _FETCH,
          "Fetch: pick a block up and place it at a target"),
    Suite("hand/reach", "shadow_hand", ("reach",), "physis.sim.hand:make",
          "Shadow hand: bring the fingertips to their target positions"),
    Suite("adroit/relocate", "adroit_hand", ("relocate",), "physis.sim.adroit:make",
          "Adroit hand on an arm: pick up a ball and carry it to a target in the air"),
    Suite("pointmaze/bimodal", "pointmaze", ("bimodal",), "physis.sim.pointmaze:make",
          "PointMaze Medium, start/goal pairs with two equally short routes", ("goal_x", "goal_y")),
    Suite("pusht", "pusht", ("pusht",), "physis.sim.pusht:make",
          "Push a T-shaped block onto its target pose (gym-pusht)"),
)}


def _unknown(what: str, name: str, valid: Sequence[str], where: str = "") -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {name!r}{where}.{hint} Valid {what}s: {', '.join(valid)}"


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UnknownNameError(_unknown("suite", name, list(SUITES)))
    return SUITES[name]


def resolve_tasks(suite: str, tasks: Sequence[str] | None = None) -> list[str]:
    """The suite's tasks, or the requested ones after checking each exists."""
    s = get_suite(suite)
    if not tasks:
        return list(s.tasks)
    for t in tasks:
        if t not in s.tasks:
            raise UnknownNameError(_unknown("task", t, s.tasks, f" in suite {suite!r}"))
    return list(tasks)


def make_env(suite: str, task: str | None = None, config: EnvConfig | None = None) -> SimEnv:
    """Build one task's environment; a single-task suite needs no task name."""
    s = get_suite(suite)
    if task is None:
        if len(s.tasks) != 1:
            raise UnknownNameError(f"suite {suite!r} has {len(s.tasks)} tasks; name one of: {', '.join(s.tasks)}")
        task = s.tasks[0]
    return s.make(task, config)
