"""Adroit relocate suite: gymnasium-robotics AdroitHandRelocate behind physis's observation format.

A 24-joint Shadow-style hand on a 6-DoF arm (slides along x, up and forward, then pitch, yaw and roll)
must pick a blue ball off the table and bring it into a green target sphere floating above it. Ball and
target positions come from the env's own reset randomness, seeded by the episode seed (ball anywhere on
x in [-0.15, 0.15], y in [-0.15, 0.3]; target x, y in [-0.2, 0.2], z in [0.15, 0.35]). Success is the
env's own criterion: the ball's centre within 0.1 m of the target's.

The policy sees only the robot (palm grasp-point position and velocity, arm and hand joints and their
velocities) and two cameras that each show the whole workspace: "front", from across the table facing
the hand, and "side", from the thumb's side; together they give the ball's and the target's 3-D
positions. The target sphere is drawn less transparent than in the env so that it shows at 96x96.

The action is the env's 30 normalized actuator targets followed by `palm_target`, the palm grasp point's
target for this step relative to where it is (m). Only the 30 joint commands move the robot; the palm
channel is recorded so that hand data shares the end-effector slots of the gripper robots, and the
simulator ignores it.

Episodes last 200 steps (2 s at 100 Hz, the env's own limit); the expert needs roughly 60 to 160.
"""

from __future__ import annotations

from typing import Any

import mujoco
import numpy as np

from physis.sim.base import EnvConfig, MujocoCameras, Observation, SimEnv

ENV_ID = "AdroitHandRelocate-v1"
N_JOINT_CMDS = 30  # the env's actuators: 6 arm, 2 wrist, 22 finger/thumb
INSTRUCTIONS = (
    "move the blue ball to the green target",
    "pick up the blue ball and put it in the green sphere",
    "grasp the ball and carry it into the green target",
    "relocate the ball to the green target",
    "lift the blue ball and bring it to the green sphere",
)
# Two views of the whole workspace (every ball and target position the env draws stays in frame) at right
# angles: "front" from across the table, facing the hand, and "side" from the thumb's side (-x). From behind
# the arm, like the env's own "fixed" camera, the hand hides a ball lying just ahead of it.
CAMERAS = {
    "front": {"lookat": (0.0, 0.02, 0.14), "distance": 0.95, "azimuth": -90.0, "elevation": -22.0},
    "side": {"lookat": (0.0, -0.02, 0.14), "distance": 1.1, "azimuth": 0.0, "elevation": -40.0},
}
TARGET_ALPHA = 0.35  # the env draws the target at 0.125, nearly invisible in small images

LABEL_HOVER = "hover above the ball"
LABEL_DESCEND = "descend"
LABEL_CLOSE = "close the hand"
LABEL_LIFT = "lift"
LABEL_CARRY = "carry it to the target"
LABEL_HOLD = "hold"
LABELS = (LABEL_HOVER, LABEL_DESCEND, LABEL_CLOSE, LABEL_LIFT, LABEL_CARRY, LABEL_HOLD)


class AdroitRelocateEnv(SimEnv):
    """AdroitHandRelocate with 30 joint commands plus a recorded palm-target channel as action."""

    suite = "adroit/relocate"
    default_max_steps = 200

    def __init__(self, task: str, config: EnvConfig | None = None) -> None:
        import gymnasium as gym
        import gymnasium_robotics

        super().__init__(task, "adroit_hand", INSTRUCTIONS, config)
        gym.register_envs(gymnasium_robotics)
        # The raw MuJoCo env, without gymnasium's TimeLimit: SimEnv counts the steps.
        self.raw: Any = gym.make(ENV_ID, disable_env_checker=True).unwrapped
        self.model, self.data = self.raw.model, self.raw.data
        self.palm_site = self.model.site("S_grasp").id
        self.target_site = self.model.site("target").id
        self.ball_body = self.model.body("Object").id
        valid = [*CAMERAS, *(self.model.camera(i).name for i in range(self.model.ncam))]  # free, then the env's
        unknown = [c for c in self.camera_names if c not in valid]
        if unknown:
            raise ValueError(f"adroit/relocate has no camera {unknown[0]!r}; cameras: {', '.join(valid)}")
        if self.config.render:
            self.model.site_rgba[self.target_site, 3] = TARGET_ALPHA
            h, w = self.config.hw
            self._cameras = MujocoCameras(self.model, h, w)
            for name, view in CAMERAS.items():
                self._cameras.add_free_camera(name, **view)

    # --- privileged simulator state (for experts and tests, never for the policy) ---------------
    @property
    def palm_pos(self) -> np.ndarray:
        return self.data.site_xpos[self.palm_site].copy()

    @property
    def ball_pos(self) -> np.ndarray:
        return self.data.xpos[self.ball_body].copy()

    @property
    def target_pos(self) -> np.ndarray:
        return self.data.site_xpos[self.target_site].copy()

    # --- SimEnv hooks ----------------------------------------------------------------------------
    def _sim_reset(self, seed: int) -> None:
        self.raw.reset(seed=seed)

    def _sim_step(self, action: np.ndarray) -> tuple[float, bool, dict[str, Any]]:
        # action[30:] (palm_target) is a recorded channel, not a command: the joints move the robot.
        _, reward, _, _, info = self.raw.step(action[:N_JOINT_CMDS])
        dist = float(np.linalg.norm(self.ball_pos - self.target_pos))
        return float(reward), bool(info["success"]), {"distance": dist}

    def _sim_state(self) -> dict[str, np.ndarray]:
        m, d = self.model, self.data
        vel = np.zeros(6)
        mujoco.mj_objectVelocity(m, d, mujoco.mjtObj.mjOBJ_SITE, self.palm_site, vel, 0)  # [angular, linear]
        return {"palm_pos": self.palm_pos, "arm_joints": d.qpos[:6], "hand_joints": d.qpos[6:30],
                "palm_vel": vel[3:], "arm_joint_vel": d.qvel[:6], "hand_joint_vel": d.qvel[6:30]}

    def _sim_render(self, camera: str) -> np.ndarray:
        if self._cameras is None:
            raise RuntimeError("this environment was built with render=False")
        return self._cameras.render(self.data, camera)

    def expert(self) -> AdroitRelocateExpert:
        return AdroitRelocateExpert(self)

    def _sim_close(self) -> None:
        self.raw.close()


class AdroitRelocateExpert:
    """A phase machine over the ball and target that steers the palm's grasp point with the arm.

    The arm actuators are position servos (force = gain*ctrl + bias0 + bias1*q, read from the model),
    under-damped and sagging under gravity. The expert chooses the joint force it wants (PD through the
    arm's mass matrix, plus the model's gravity and Coriolis forces and the joints' own damping) and
    converts it back into the servo command that produces that force.

    The vertical slide can only raise the palm above its start, so the palm reaches down by pitching
    the arm: the x and forward slides, the vertical slide and the pitch joint move the grasp point
    (damped least squares on its Jacobian, with the joint limits as an active set); the yaw and roll
    joints and the wrist hold still. The grasp point sits near the heel of the fingers, so it is aimed
    a little behind the ball (toward the forearm) at the ball's centre height; the fingers then close
    past contact (their servos are soft), and while carrying, the palm goal is the palm plus the ball's
    error to the target, recomputed every step.
    """

    # Palm steering
    lead = 0.12  # m: the palm target is never further than this ahead of the palm
    omega = 14.0  # rad/s: natural frequency of the arm's PD
    zeta = 0.9
    damping = 0.02  # DLS damping (m)
    weights = np.array([1.0, 1.0, 1.0, 0.25])  # x, vertical, forward slide, pitch: pitching also tilts the palm
    # Grasp geometry
    behind = 0.03  # m: grasp point behind the ball's centre (toward the forearm)
    hover = 0.08  # m: height of the hover point above the grasp point
    lift = 0.06  # m: ball height above the table before carrying
    close_steps = 18
    reach_tol = 0.02  # m: palm close enough to a hover/descend goal
    hold_tol = 0.02  # m: ball this close to the target: hold

    def __init__(self, env: AdroitRelocateEnv) -> None:
        self.env = env
        m = env.model
        self.steer = np.arange(4)  # ARTx, ARTy, ARTz, ARRx
        self.gain = m.actuator_gainprm[:N_JOINT_CMDS, 0].copy()
        self.bias = m.actuator_biasprm[:N_JOINT_CMDS, :3].copy()
        self.ctrl_lo, self.ctrl_hi = m.actuator_ctrlrange[:N_JOINT_CMDS].T.copy()
        jnt = m.actuator_trnid[:N_JOINT_CMDS, 0]
        dof = m.jnt_dofadr[jnt]
        self.jlo, self.jhi = m.jnt_range[jnt].T.copy()
        if not np.array_equal(dof, np.arange(N_JOINT_CMDS)):
            raise ValueError("expected the 30 actuators to drive the first 30 dofs in order")
        self.open_hand = np.zeros(N_JOINT_CMDS - 8)
        self.closed_hand = self._closed_pose()
        self._mass = np.zeros((m.nv, m.nv))
        self._jac = np.zeros((3, m.nv))
        self.reset()

    def _closed_pose(self) -> np.ndarray:
        """Finger targets (rad) that wrap the fingers and thumb around the ball, past contact."""
        m = self.env.model
        pose = {}
        for f in ("FF", "MF", "RF", "LF"):
            pose.update({f"{f}J2": 1.6, f"{f}J1": 1.6, f"{f}J0": 1.6})
        pose.update({"THJ4": 1.0, "THJ3": 1.3, "THJ2": 0.2, "THJ1": 0.5, "THJ0": -1.0})
        names = [m.actuator(i).name.removeprefix("A_") for i in range(8, N_JOINT_CMDS)]
        return np.array([pose.get(n, 0.0) for n in names])

    def reset(self) -> None:
        self.phase = LABEL_HOVER
        self.phase_steps = 0
        self.grasp_point: np.ndarray | None = None

    def _enter(self, phase: str) -> None:
        if phase != self.phase:
            self.phase, self.phase_steps = phase, 0

    # --- the phase machine ------------------------------------------------------------------------
    def act(self, obs: Observation) -> tuple[np.ndarray, str]:
        goal, fingers = self._plan()
        label = self.phase
        self.phase_steps += 1
        palm = self.env.palm_pos
        step = goal - palm
        dist = float(np.linalg.norm(step))
        target = palm + step * min(1.0, self.lead / max(dist, 1e-9))
        action = np.concatenate([self._joint_commands(target, fingers), target - palm])
        return action, label

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This step's palm goal and finger targets, advancing the phase."""
        env = self.env
        palm, ball, target = env.palm_pos, env.ball_pos, env.target_pos
        grasp = ball + np.array([0.0, -self.behind, 0.0])
        table_z = env.model.geom_size[env.model.geom("sphere").id, 0]  # ball centre when resting
        if self.phase in (LABEL_LIFT, LABEL_CARRY, LABEL_HOLD) and np.linalg.norm(ball - palm) > 0.08:
            self._enter(LABEL_HOVER)  # dropped it: start again
        if self.phase == LABEL_HOVER:
            goal = grasp + [0.0, 0.0, self.hover]
            if np.linalg.norm(goal - palm) < self.reach_tol:
                self._enter(LABEL_DESCEND)
            else:
                return goal, self.open_hand
        if self.phase == LABEL_DESCEND:
            if np.linalg.norm(grasp - palm) < self.reach_tol:
                self._enter(LABEL_CLOSE)
                self.grasp_point = grasp
            else:
                return grasp, self.open_hand
        if self.phase == LABEL_CLOSE:
            assert self.grasp_point is not None
            if self.phase_steps < self.close_steps:
                return self.grasp_point, self.closed_hand
            self._enter(LABEL_LIFT)
        if self.phase == LABEL_LIFT:
            assert self.grasp_point is not None
            if ball[2] < table_z + self.lift:
                return self.grasp_point + [0.0, 0.0, self.lift + 0.02], self.closed_hand
            self._enter(LABEL_CARRY)
        if np.linalg.norm(target - ball) < self.hold_tol:
            self._enter(LABEL_HOLD)
        elif self.phase == LABEL_HOLD and np.linalg.norm(target - ball) > 2 * self.hold_tol:
            self._enter(LABEL_CARRY)
        return palm + (target - ball), self.closed_hand

    # --- control --------------------------------------------------------------------------------
    def _joint_commands(self, palm_goal: np.ndarray, fingers: np.ndarray) -> np.ndarray:
        """The 30 normalized actuator targets: arm steering the grasp point, wrist held, fingers posed."""
        m, d = self.env.model, self.env.data
        q, qd = d.qpos[:N_JOINT_CMDS], d.qvel[:N_JOINT_CMDS]
        dq = np.zeros(6)
        dq[self.steer] = self._steer(palm_goal - self.env.palm_pos)
        dq[4:6] = -q[4:6]  # yaw and roll hold at zero
        omega = self.omega
        acc = omega ** 2 * dq - 2 * self.zeta * omega * qd[:6]
        mujoco.mj_fullM(m, self._mass, d.qM)
        force = np.zeros(N_JOINT_CMDS)
        # Gravity, Coriolis and the joints' passive damping are cancelled; the PD acts through the mass matrix.
        force[:6] = self._mass[:6, :6] @ acc + d.qfrc_bias[:6] - d.qfrc_passive[:6]
        # Wrist and fingers: position targets, plus gravity compensation for the wrist.
        pose = np.concatenate([np.zeros(2), fingers])
        force[6:] = self.gain[6:] * (pose - q[6:])
        force[6:8] += d.qfrc_bias[6:8]
        # force = gain * ctrl + b0 + b1 * q + b2 * qd  =>  ctrl
        ctrl = (force - self.bias[:, 0] - self.bias[:, 1] * q - self.bias[:, 2] * qd) / self.gain
        ctrl = np.clip(ctrl, self.ctrl_lo, self.ctrl_hi)
        return np.clip((2 * ctrl - (self.ctrl_lo + self.ctrl_hi)) / (self.ctrl_hi - self.ctrl_lo), -1.0, 1.0)

    def _steer(self, err: np.ndarray) -> np.ndarray:
        """Joint displacement of the steering joints that moves the grasp point by `err` (weighted DLS),
        holding any joint at a limit that the step would push further."""
        m, d = self.env.model, self.env.data
        mujoco.mj_jacSite(m, d, self._jac, None, self.env.palm_site)
        jac = self._jac[:, self.steer]
        q = d.qpos[self.steer]
        at_lo, at_hi = q <= self.jlo[self.steer] + 1e-3, q >= self.jhi[self.steer] - 1e-3
        free = np.ones(len(self.steer), dtype=bool)
        for _ in range(len(self.steer)):
            w = self.weights * free
            step = w * (jac.T @ np.linalg.solve((jac * w) @ jac.T + self.damping ** 2 * np.eye(3), err))
            blocked = free & ((at_lo & (step < 0)) | (at_hi & (step > 0)))
            if not blocked.any():
                break
            free &= ~blocked
        return step


def make(task: str, config: EnvConfig) -> SimEnv:
    """The adroit/relocate environment (one task, "relocate")."""
    if task != "relocate":
        raise ValueError(f"adroit suite has one task, 'relocate'; got {task!r}")
    return AdroitRelocateEnv(task, config)
