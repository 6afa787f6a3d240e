"""Fetch benchmark suite: reach, push and pick-and-place with the Fetch arm (gymnasium-robotics).

The raw MuJoCo environments of gymnasium-robotics (`FetchReach-v4`, `FetchPush-v4`,
`FetchPickAndPlace-v4`) run underneath; physis counts steps, ends episodes and renders one free
"front" camera that looks at the table from the side opposite the robot, so the gripper, the block
and the red target sphere are in view. The policy's state is the robot's only (gripper position,
finger positions and their velocities); where the block and the target are must be read from the
image. Success is gymnasium-robotics' own criterion: the gripper (reach) or the block (push,
pick-and-place) within 5 cm of the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from physis.sim.base import EnvConfig, MujocoCameras, Observation, SimEnv

# Episode limits. gymnasium-robotics truncates all three at 50 steps (2 s). Reach keeps 50: the
# scripted expert needs at most 4 steps. Push and pick-and-place get 100 (4 s): the experts average
# about 24 and 18 steps, but a push that has to walk around the block again takes up to ~45, and a
# learned policy that misses a grasp needs room to go back for the block.


@dataclass(frozen=True)
class FetchTask:
    env_id: str
    max_steps: int
    instructions: tuple[str, ...]  # the canonical instruction first, then paraphrases


TASKS: dict[str, FetchTask] = {
    "reach": FetchTask("FetchReach-v4", 50, (
        "reach the red target",
        "move the gripper to the red target",
        "put the gripper on the red dot",
        "bring the hand to the red marker",
    )),
    "push": FetchTask("FetchPush-v4", 100, (
        "push the block to the red target",
        "slide the block over to the red dot",
        "push the black cube onto the red marker",
        "move the block to the red target by pushing it",
    )),
    "pick_and_place": FetchTask("FetchPickAndPlace-v4", 100, (
        "pick up the block and place it at the red target",
        "grasp the block and move it to the red dot",
        "lift the black cube and bring it to the red marker",
        "pick the block up and put it on the red target",
    )),
}

# The front camera: from beyond the far edge of the table, looking back at the robot. Straight on
# (azimuth 180) the arm stays behind the workspace, so it hides the block and the target less often
# than oblique views do; 28 degrees down keeps targets up to 45 cm above the table in the frame.
FRONT_CAMERA = {"lookat": (1.32, 0.75, 0.6), "distance": 0.9, "azimuth": 180.0, "elevation": -28.0}

STEP_SIZE = 0.05  # metres the gripper's target moves for an action of 1 (gymnasium-robotics' scale)


class FetchEnv(SimEnv):
    """One Fetch task behind physis's observation format."""

    suite = "fetch"

    def __init__(self, task: str, config: EnvConfig | None = None) -> None:
        import gymnasium as gym
        import gymnasium_robotics

        if task not in TASKS:
            raise ValueError(f"unknown fetch task {task!r}; valid tasks: {', '.join(TASKS)}")
        spec = TASKS[task]
        self.default_max_steps = spec.max_steps
        super().__init__(task, "fetch", spec.instructions, config)
        self.suite = f"fetch/{task}"
        gym.register_envs(gymnasium_robotics)
        # The raw environment: no TimeLimit or checker wrappers, physis does the bookkeeping.
        self.raw = gym.make(spec.env_id, disable_env_checker=True).unwrapped
        self.has_object = bool(self.raw.has_object)
        model = self.raw.model
        self._finger_joints = [model.joint(f"robot0:{side}_gripper_finger_joint") for side in ("l", "r")]
        self._cameras: MujocoCameras | None = None
        model_cameras = {model.camera(i).name for i in range(model.ncam)}
        unknown = [c for c in self.camera_names if c != "front" and c not in model_cameras]
        if unknown:
            raise ValueError(f"fetch has no camera {unknown[0]!r}; cameras: front, {', '.join(sorted(model_cameras))}")
        if self.config.render:
            # The mocap body's green cross-hair marks where the controller pulls the gripper, i.e. the
            # last action; hide it so that images show only the scene.
            model.geom_rgba[model.geom_bodyid == model.body("robot0:mocap").id, 3] = 0.0
            h, w = self.config.hw
            self._cameras = MujocoCameras(model, h, w)
            self._cameras.add_free_camera("front", **FRONT_CAMERA)

    # --- privileged simulator state (for experts and tests, never for the policy) ---------------
    @property
    def grip_pos(self) -> np.ndarray:
        return self.raw.data.site("robot0:grip").xpos.copy()

    @property
    def object_pos(self) -> np.ndarray:
        if not self.has_object:
            raise AttributeError(f"fetch/{self.task} has no block")
        return self.raw.data.site("object0").xpos.copy()

    @property
    def finger_pos(self) -> np.ndarray:
        """Left and right finger joint positions (m); each opens from 0 to 0.05."""
        return np.array([self.raw.data.qpos[j.qposadr[0]] for j in self._finger_joints])

    @property
    def goal(self) -> np.ndarray:
        return np.asarray(self.raw.goal, dtype=np.float64).copy()

    @property
    def table_height(self) -> float:
        """The height of the block's centre when it rests on the table."""
        return float(self.raw.height_offset)

    # --- SimEnv hooks ----------------------------------------------------------------------------
    def _sim_reset(self, seed: int) -> None:
        self.raw.reset(seed=seed)
        # Moves the red target site to the sampled goal; gymnasium-robotics does this only when rendering.
        self.raw._render_callback()

    def _sim_step(self, action: np.ndarray) -> tuple[float, bool, dict[str, Any]]:
        _, reward, _, _, info = self.raw.step(action.astype(np.float64))
        return float(reward), bool(info["is_success"]), {"is_success": float(info["is_success"])}

    def _sim_state(self) -> dict[str, np.ndarray]:
        data = self.raw.data
        finger_vel = np.array([data.qvel[j.dofadr[0]] for j in self._finger_joints])
        # Velocities in m/s (gymnasium-robotics' own observation scales them by the step time).
        velp = np.asarray(self.raw._utils.get_site_xvelp(self.raw.model, data, "robot0:grip"))
        return {"grip_pos": self.grip_pos, "fingers": self.finger_pos, "grip_velp": velp, "finger_vel": finger_vel}

    def _sim_render(self, camera: str) -> np.ndarray:
        if self._cameras is None:
            raise RuntimeError("this environment was built with render=False")
        return self._cameras.render(self.raw.data, camera)

    def expert(self) -> FetchExpert:
        return {"reach": ReachExpert, "push": PushExpert, "pick_and_place": PickAndPlaceExpert}[self.task](self)

    def _sim_close(self) -> None:
        self.raw.close()


# --- scripted experts ----------------------------------------------------------------------------
def _toward(grip: np.ndarray, target: np.ndarray, gain: float = 2.0) -> np.ndarray:
    """A position action that moves the gripper toward `target`: proportional, scaled down as a whole
    (not clipped per axis) when saturated so that it keeps pointing at the target."""
    move = gain * (target - grip) / STEP_SIZE
    return move / max(1.0, float(np.abs(move).max()))


def _action(move: np.ndarray, grip: float) -> np.ndarray:
    return np.concatenate([move, [grip]]).astype(np.float32)


OPEN, CLOSED = 1.0, -1.0


class FetchExpert:
    """A phase machine over privileged state; `act` returns (action, subtask label)."""

    def __init__(self, env: FetchEnv) -> None:
        self.env = env
        self.reset()

    def reset(self) -> None:
        self.phase = ""
        self.phase_steps = 0

    def _enter(self, phase: str) -> None:
        if phase != self.phase:
            self.phase, self.phase_steps = phase, 0

    def act(self, obs: Observation) -> tuple[np.ndarray, str]:
        action, label = self._act()
        self.phase_steps += 1
        return action, label

    def _act(self) -> tuple[np.ndarray, str]:
        raise NotImplementedError


class ReachExpert(FetchExpert):
    def _act(self) -> tuple[np.ndarray, str]:
        self._enter("move to the target")
        return _action(_toward(self.env.grip_pos, self.env.goal), CLOSED), self.phase


class PushExpert(FetchExpert):
    """Get behind the block on the line to the target, come down to table height, push along the line."""

    BEHIND = 0.065  # gripper-to-block distance when starting a push (block half-width + finger + margin)
    CONTACT = 0.045  # gripper-to-block distance while pushing
    HOVER = 0.08  # height above the block while moving around it
    PUSH_GAIN = 1.0  # gentler than free moves, so the block does not slide on past the target
    PUSH_AHEAD = 0.03  # how far ahead of the block's current place the gripper is sent while pushing
    HOLD = 0.02  # the block is this close to the target: stop pushing
    OFF_LINE = 0.02  # lateral error that sends the expert back behind the block

    def _act(self) -> tuple[np.ndarray, str]:
        env = self.env
        grip, block, goal = env.grip_pos, env.object_pos, env.goal
        to_goal = goal[:2] - block[:2]
        d = to_goal / max(np.linalg.norm(to_goal), 1e-6)
        low_z = env.table_height - 0.01
        rel = grip[:2] - block[:2]
        along = float(rel @ d)  # negative: behind the block
        lateral = abs(float(rel[0] * d[1] - rel[1] * d[0]))
        behind = np.array([*(block[:2] - self.BEHIND * d), low_z])

        if np.linalg.norm(to_goal) < self.HOLD:  # on the target: stop, or the block slides past it
            self._enter("push the block to the target")
            return _action(np.zeros(3), CLOSED), self.phase
        if self.phase == "push the block to the target" and (lateral > self.OFF_LINE or along > -0.02):
            self._enter("move behind the block")
        if self.phase in ("", "move behind the block"):
            self._enter("move behind the block")
            above = np.array([*behind[:2], block[2] + self.HOVER])
            move = _toward(grip, above)
            if grip[2] < block[2] + self.HOVER - 0.02 and np.linalg.norm(grip[:2] - behind[:2]) > 0.02:
                move[:2] *= 0.3  # rise before sweeping sideways so the fingers clear the block
            if np.linalg.norm(grip[:2] - behind[:2]) < 0.01:
                self._enter("lower the gripper")
            return _action(move, CLOSED), "move behind the block"
        if self.phase == "lower the gripper":
            if grip[2] - low_z < 0.01:
                self._enter("push the block to the target")
            else:
                return _action(_toward(grip, behind), CLOSED), self.phase
        # Track a point just behind the block, a little ahead along the line to the target: the block
        # is pushed forward while any sideways drift of the gripper is corrected.
        ahead = min(self.PUSH_AHEAD, float(np.linalg.norm(to_goal)))
        target = np.array([*(block[:2] + (ahead - self.CONTACT) * d), low_z])
        return _action(_toward(grip, target, self.PUSH_GAIN), CLOSED), "push the block to the target"


class PickAndPlaceExpert(FetchExpert):
    """Open above the block, come down around it, close, lift, carry to the target and hold it there."""

    HOVER = 0.08
    LIFT = 0.05  # how far the block is lifted off the table before carrying
    GRASP_STEPS = 4

    def _act(self) -> tuple[np.ndarray, str]:
        env = self.env
        grip, block, goal = env.grip_pos, env.object_pos, env.goal
        # Closed on the block the fingers stay apart by its width; closed on nothing they meet.
        held = np.linalg.norm(block - grip) < 0.03 and env.finger_pos.min() > 0.01
        if self.phase in ("lift the block", "carry it to the target") and not held:
            self._enter("move above the block")  # dropped it: start again
        if self.phase in ("", "move above the block"):
            self._enter("move above the block")
            above = block + [0, 0, self.HOVER]
            if np.linalg.norm(grip[:2] - block[:2]) < 0.01 and abs(grip[2] - above[2]) < 0.03:
                self._enter("lower around the block")
            else:
                return _action(_toward(grip, above), OPEN), self.phase
        if self.phase == "lower around the block":
            if grip[2] - block[2] < 0.01:
                self._enter("grasp the block")
            else:
                return _action(_toward(grip, block), OPEN), self.phase
        if self.phase == "grasp the block":
            if self.phase_steps >= self.GRASP_STEPS:
                self._enter("lift the block")
            else:
                return _action(_toward(grip, block), CLOSED), self.phase
        if self.phase == "lift the block":
            if block[2] > env.table_height + self.LIFT - 0.01:
                self._enter("carry it to the target")
            else:
                return _action(_toward(grip, block + [0, 0, 0.1]), CLOSED), self.phase
        return _action(_toward(grip, goal + (grip - block)), CLOSED), "carry it to the target"


def make(task: str, config: EnvConfig) -> FetchEnv:
    """Build fetch/<task> ("reach", "push" or "pick_and_place")."""
    return FetchEnv(task, config)
