"""Meta-World's scripted experts, each step labelled with the phase of the policy it is in.

Most v3 policies in `metaworld.policies` pick their target position in `_desired_pos` through an if/elif chain
of `return` statements, so the index of the return taken is the policy's own phase. `_desired_pos` is
recompiled from its source with every `return X` rewritten to `return (k, X)` (k: the statement's index in
source order) and installed on the policy instance in place of the original. Nothing else changes: the
statements, their order and the module globals they run against are the original ones, so the action is
bit-identical to `policy.get_action` (the tests check this). Running the rewritten function *instead of*
next to the original matters: some policies (door-open, door-close) modify the parsed observation in place,
so running both would move the target twice.

`PHASE_LABELS` gives one short label per return statement, written from each policy's conditions and
comments. Policies without `_desired_pos` (drawer-open, reach) get a small function mirroring their
branches instead. Where a single branch covers two phases that differ only in the grab effort, `GRIP_LABELS`
refines the label with the sign of the action's grab effort.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np

from physis.sim.metaworld_tasks import MT50, POLICIES

# One label per `return` of the policy's `_desired_pos`, in source order (not in the order the phases occur).
PHASE_LABELS: dict[str, tuple[str, ...]] = {
    "assembly-v3": (
        "move above the nut", "lower the nut onto the peg", "lower onto the nut", "lift the nut",
        "carry the nut above the peg",
    ),
    "basketball-v3": ("move above the ball", "lower onto the ball", "lift the ball", "carry the ball to the hoop"),
    "bin-picking-v3": (
        "move above the cube", "lower onto the cube", "lift the cube", "carry the cube over the target bin",
        "lower the cube into the target bin",
    ),
    "box-close-v3": ("move above the lid", "lower onto the lid", "lift the lid", "carry the lid onto the box"),
    "button-press-topdown-v3": ("move above the button", "press the button down"),
    "button-press-topdown-wall-v3": ("move above the button", "press the button down"),
    "button-press-v3": ("line up with the button", "press the button"),
    "button-press-wall-v3": (
        "rise above the wall", "move over the wall to the button", "lower in front of the button",
        "press the button",
    ),
    "coffee-button-v3": ("line up with the coffee machine button", "press the coffee machine button"),
    "coffee-pull-v3": ("move above the mug", "lower onto the mug", "pull the mug to the goal"),
    "coffee-push-v3": ("move above the mug", "lower onto the mug", "push the mug under the coffee machine"),
    "dial-turn-v3": ("move above the dial", "lower onto the dial", "turn the dial"),
    "disassemble-v3": ("move above the nut", "lower onto the nut", "lift the nut off the peg"),
    "door-close-v3": (
        "rise above the door", "move over the door handle", "move beside the door handle", "push the door closed",
    ),
    "door-lock-v3": ("rise away from the door", "move above the lock", "lower onto the lock", "push the lock down"),
    "door-open-v3": ("move above the door handle", "lower to the door handle", "pull the door open"),
    "door-unlock-v3": ("lower toward the lock", "move to the lock", "turn the lock up"),
    "hand-insert-v3": (
        "move above the block", "lower onto the block", "carry the block above the hole",
        "lower the block into the hole",
    ),
    "drawer-close-v3": (
        "rise above the drawer", "move in front of the drawer handle", "lower in front of the drawer handle",
        "push the drawer closed",
    ),
    "drawer-open-v3": ("move above the drawer handle", "lower to the drawer handle", "pull the drawer open"),
    "faucet-open-v3": ("move above the faucet handle", "lower to the faucet handle", "turn the faucet open"),
    "faucet-close-v3": ("move above the faucet handle", "lower to the faucet handle", "turn the faucet closed"),
    "hammer-v3": (
        "move above the hammer", "lower onto the hammer", "line the hammer up with the nail",
        "hit the nail with the hammer",
    ),
    "handle-press-side-v3": ("move above the handle", "press the handle down"),
    "handle-press-v3": ("move above the handle", "press the handle down"),
    "handle-pull-side-v3": ("move above the handle", "lower onto the handle", "pull the handle up"),
    "handle-pull-v3": ("move under the handle", "line up with the handle", "pull the handle up"),
    "lever-pull-v3": ("move under the lever", "rise to the lever", "push the lever up"),
    "pick-place-wall-v3": (
        "move above the puck", "lower onto the puck", "lift the puck above the wall",
        "carry the puck over the wall", "bring the puck to the goal height", "carry the puck to the goal",
    ),
    "pick-out-of-hole-v3": (
        "move above the puck", "lower onto the puck", "lift the puck out of the hole", "carry the puck to the goal",
    ),
    "pick-place-v3": ("move above the puck", "lower onto the puck", "grasp the puck", "carry the puck to the goal"),
    "plate-slide-v3": ("move above the plate edge", "lower to the plate edge", "slide the plate into the cabinet"),
    "plate-slide-side-v3": (
        "move above the plate edge", "lower to the plate edge", "slide the plate toward the cabinet",
        "slide the plate into the cabinet",
    ),
    "plate-slide-back-v3": (
        "move above the plate", "lower onto the plate", "pull the plate out of the cabinet",
        "slide the plate toward the goal", "slide the plate sideways to the goal",
    ),
    "plate-slide-back-side-v3": ("move above the plate", "lower onto the plate", "slide the plate out of the cabinet"),
    "peg-insert-side-v3": (
        "move above the peg", "lower onto the peg", "line the peg up with the hole",
        "insert the peg into the hole",
    ),
    "peg-unplug-side-v3": ("move above the peg", "lower onto the peg", "pull the peg out"),
    "soccer-v3": ("move behind the ball", "push the ball toward the goal"),
    "stick-push-v3": (
        "move above the stick", "lower onto the stick", "line the stick up with the thermos",
        "lift the stick to the thermos", "move the stick to the thermos", "push the thermos to the goal",
    ),
    "stick-pull-v3": (
        "move above the stick", "lower onto the stick", "line the stick up with the thermos",
        "lift the stick to the thermos", "hook the stick into the thermos", "pull the thermos to the goal",
    ),
    "push-v3": ("move above the puck", "lower onto the puck", "push the puck to the goal"),
    "push-wall-v3": (
        "move above the puck", "lower onto the puck", "push the puck sideways around the wall",
        "push the puck past the wall", "push the puck to the goal",
    ),
    "push-back-v3": ("move above the block", "lower onto the block", "pull the block back to the goal"),
    "reach-v3": ("move to the goal", "hold at the goal"),
    "reach-wall-v3": ("rise over the wall", "move to the goal"),
    "shelf-place-v3": (
        "move above the block", "lower onto the block", "line the block up with the shelf",
        "lift the block to the shelf", "place the block on the shelf",
    ),
    "sweep-into-v3": ("move above the block", "lower onto the block", "sweep the block into the hole"),
    "sweep-v3": ("move above the block", "lower onto the block", "sweep the block off the table"),
    "window-open-v3": ("move above the window handle", "lower to the window handle", "slide the window open"),
    "window-close-v3": ("move above the window handle", "lower to the window handle", "slide the window closed"),
}

# Policies that start closing the gripper while still lowering onto the object (their `_grab_effort` turns
# positive within a few centimetres of it): there "lower onto the X" reads "grasp the X" while closing.
_GRASP_WHILE_LOWERING = (
    "assembly-v3", "basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3",
    "disassemble-v3", "hammer-v3", "hand-insert-v3", "handle-pull-side-v3", "pick-place-wall-v3", "pick-out-of-hole-v3",
    "pick-place-v3", "peg-insert-side-v3", "peg-unplug-side-v3", "push-v3", "push-wall-v3", "shelf-place-v3",
    "stick-push-v3", "stick-pull-v3", "sweep-into-v3", "sweep-v3",
)


def _grip_labels() -> dict[str, dict[int, tuple[str, str]]]:
    grip = {task: {k: (label.replace("lower onto", "grasp", 1), label)
                   for k, label in enumerate(PHASE_LABELS[task]) if label.startswith("lower onto the ")}
            for task in _GRASP_WHILE_LOWERING}
    # The last branch carries the block toward the edge and lets go of it once it is near (cube x >= 0.4).
    grip["sweep-v3"][2] = ("sweep the block off the table", "release the block")
    return grip


# Branches that span two phases told apart only by the grab effort:
# task -> {branch: (label while the gripper closes, label otherwise)}.
GRIP_LABELS: dict[str, dict[int, tuple[str, str]]] = _grip_labels()
# The gripper closes when the effort exceeds this; box-close keeps a light 0.5 grip until it nears the lid.
_OPEN_EFFORT: dict[str, float] = {"box-close-v3": 0.5}


def _drawer_open_phase(obs: np.ndarray) -> int:
    """The branches of SawyerDrawerOpenV3Policy.get_action (which has no `_desired_pos`)."""
    hand, drawer = obs[:3], obs[4:7] + np.array([0.0, 0.0, -0.02])
    if np.linalg.norm(hand[:2] - drawer[:2]) > 0.06:
        return 0
    if abs(hand[2] - drawer[2]) > 0.04:
        return 1
    return 2


# Where the fingertips (Meta-World's `tcp_center`, where reach's success is measured) sit relative to the hand
# position the observation reports: 4.5 cm below it.
FINGERTIP_OFFSET = np.array([0.0, 0.0, -0.045])


def _reach_phase(obs: np.ndarray) -> int:
    """SawyerReachV3Policy has a single branch, a proportional move to the goal. Call it holding once the
    fingertips are within the environment's 0.05 success radius."""
    return int(np.linalg.norm(obs[:3] + FINGERTIP_OFFSET - obs[-3:]) <= 0.05)


# Meta-World's reach policy brings the hand to the goal, which leaves the fingertips 4.5 cm below it: inside the
# 5 cm success radius by 0.5 cm, so a policy that imitates it must place the hand to about 2 cm. physis's reach
# expert aims the fingertips at the goal instead (the policy sees the goal raised by this much), which gives the
# same demonstrations the whole 5 cm of margin.
AIM_OFFSETS: dict[str, np.ndarray] = {"reach-v3": -FINGERTIP_OFFSET}

# Policies without `_desired_pos`: a function from the 39-d observation to the phase index.
_EXPLICIT_PHASES: dict[str, Callable[[np.ndarray], int]] = {
    "drawer-open-v3": _drawer_open_phase,
    "reach-v3": _reach_phase,
}


def aimed(task: str, obs39: np.ndarray) -> np.ndarray:
    """The observation the task's Meta-World policy is given: the goal moved by the task's aim offset, if any."""
    offset = AIM_OFFSETS.get(task)
    if offset is None:
        return obs39
    moved = np.array(obs39, copy=True)
    moved[-3:] += offset
    return moved


def _policy_class(task: str) -> type:
    import metaworld.policies  # heavy; imported only when an expert is built

    return getattr(metaworld.policies, POLICIES[task])


def _own_returns(fn: ast.FunctionDef) -> list[ast.Return]:
    """The function's own return statements in source order (not those of nested functions or classes)."""
    found: list[ast.Return] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                continue
            if isinstance(child, ast.Return):
                found.append(child)
            visit(child)

    visit(fn)
    return sorted(found, key=lambda r: (r.lineno, r.col_offset))


def _desired_pos_function(cls: type) -> tuple[Callable[..., Any], bool] | None:
    """The plain function behind `cls._desired_pos` and whether it is a staticmethod, or None if absent."""
    for klass in cls.__mro__:
        if "_desired_pos" in klass.__dict__:
            attr = klass.__dict__["_desired_pos"]
            if isinstance(attr, staticmethod):
                return attr.__func__, True
            return attr, False
    return None


def _parse(func: Callable[..., Any]) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef):
        raise TypeError(f"{func.__qualname__} is not a plain function definition")
    return fn


def instrument(func: Callable[..., Any]) -> Callable[..., tuple[int, Any]]:
    """`func` recompiled from its source so that it returns (index of the return taken, original value)."""
    fn = _parse(func)
    for k, ret in enumerate(_own_returns(fn)):
        ret.value = ast.Tuple(elts=[ast.Constant(k), ret.value or ast.Constant(None)], ctx=ast.Load())
    fn.decorator_list = []  # staticmethod is re-applied by binding on the instance
    # Drop annotations so that defining the function evaluates nothing the original did not.
    fn.returns = None
    for arg in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs, fn.args.vararg, fn.args.kwarg):
        if arg is not None:
            arg.annotation = None
    module = ast.Module(body=[fn], type_ignores=[])
    ast.fix_missing_locations(module)
    # Keep tracebacks pointing at the policy's own file and lines.
    ast.increment_lineno(module, inspect.getsourcelines(func)[1] - 1)
    namespace: dict[str, Any] = {}
    exec(compile(module, inspect.getsourcefile(func) or "<policy>", "exec"), sys.modules[func.__module__].__dict__,
         namespace)
    return namespace[fn.name]


def instrumented_tasks() -> list[str]:
    """The MT50 tasks labelled through their rewritten `_desired_pos` (the rest use `_EXPLICIT_PHASES`)."""
    return [t for t in MT50 if t not in _EXPLICIT_PHASES]


class PhaseLabeledExpert:
    """A Meta-World scripted policy that also says which of its phases each action comes from.

    `act` takes the full 39-d Meta-World observation (goal in the last three entries) and returns exactly the
    policy's action for it (for reach, for the goal moved by `AIM_OFFSETS`) together with the phase's label.
    The policies are stateless, so `reset` only forgets the last phase.
    """

    def __init__(self, task: str) -> None:
        if task not in PHASE_LABELS:
            raise KeyError(f"unknown Meta-World task {task!r}")
        self.task = task
        self.labels = PHASE_LABELS[task]
        self.policy = _policy_class(task)()
        self.phase: int | None = None
        self._explicit = _EXPLICIT_PHASES.get(task)
        if self._explicit is not None:
            return
        found = _desired_pos_function(type(self.policy))
        if found is None:
            raise TypeError(f"{POLICIES[task]} has no _desired_pos and no explicit phase function")
        func, is_static = found
        n_returns = len(_own_returns(_parse(func)))
        if n_returns != len(self.labels):
            raise ValueError(f"{task}: {n_returns} return statements but {len(self.labels)} labels")
        labelled = instrument(func)

        def desired_pos(*args: Any) -> Any:
            self.phase, target = labelled(*args)
            return target

        # An instance attribute shadows the class's method, so get_action itself stays the original.
        if is_static:
            self.policy._desired_pos = desired_pos
        else:
            self.policy._desired_pos = lambda *args: desired_pos(self.policy, *args)

    def reset(self) -> None:
        self.phase = None

    def act(self, obs39: np.ndarray) -> tuple[np.ndarray, str]:
        # A copy: some policies write into the parsed observation, which is a view of the caller's array.
        obs = np.array(obs39, copy=True)
        self.phase = None if self._explicit is None else self._explicit(obs)
        action = self.policy.get_action(aimed(self.task, obs))
        if self.phase is None:
            raise RuntimeError(f"{POLICIES[self.task]}.get_action did not call _desired_pos")
        label = self.labels[self.phase]
        grip = GRIP_LABELS.get(self.task, {}).get(self.phase)
        if grip is not None:
            label = grip[0] if action[-1] > _OPEN_EFFORT.get(self.task, 0.0) else grip[1]
        return action, label
