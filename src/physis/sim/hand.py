"""Shadow-hand reach suite: gymnasium-robotics HandReach behind physis's observation format.

The Shadow Dexterous Hand must bring its five fingertips to target positions: in most episodes the
thumb tip and one other fingertip meet at a point above the palm while the other fingertips stay
where they are; in one episode out of ten every fingertip returns to its rest position. The targets
are the task's command: they are drawn as coloured spheres and given in the state as
`target_fingertip_pos`. Success is HandReach's own: all fingertips within 1 cm (one norm over the
15 coordinates) of their targets.

The scripted expert solves damped-least-squares inverse kinematics over the fingertip sites'
Jacobians (keeping joint limits and the fingers' own volume), commands that pose to the position
servos, then integrates the measured fingertip error into the joint targets.
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from physis.sim.base import EnvConfig, MujocoCameras, Observation, SimEnv

ENV_ID = "HandReach-v3"  # the newest HandReach on the new mujoco bindings in gymnasium-robotics 1.4
FINGERTIP_SITES = ("robot0:S_fftip", "robot0:S_mftip", "robot0:S_rftip", "robot0:S_lftip", "robot0:S_thtip")
FINGER_NAMES = ("index", "middle", "ring", "little")

# HandReach's goal is a pinch (thumb + one finger meeting above the palm, the rest staying put) or,
# one time in ten, every fingertip back at rest; the phrasings cover both.
INSTRUCTIONS = (
    "move the fingertips to their targets",
    "bring each fingertip to its target sphere",
    "touch the thumb to the target finger pose",
    "pinch the thumb and the chosen finger together at the targets, keeping the other fingers still",
)

LABEL_SHAPE = "shape the hand toward the targets"
LABEL_PINCH = "bring the thumb to the {finger} fingertip"
LABEL_REST = "return the fingertips to their rest positions"
LABEL_HOLD = "hold the pose"


class HandReachEnv(SimEnv):
    """HandReach with the 20 normalized actuator targets as action."""

    suite = "hand/reach"
    default_max_steps = 50  # gymnasium's limit for HandReach; the expert succeeds well inside it

    def __init__(self, task: str, config: EnvConfig | None = None) -> None:
        super().__init__(task, "shadow_hand", INSTRUCTIONS, config)
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
        # The raw MuJoCo env, without gymnasium's TimeLimit: SimEnv counts the steps.
        self.sim: Any = gym.make(ENV_ID).unwrapped
        self.model, self.data = self.sim.model, self.sim.data
        self._cameras: MujocoCameras | None = None
        if self.config.render:
            unknown = set(self.camera_names) - {"front"}
            if unknown:
                raise ValueError(f"hand/reach has one camera, 'front'; unknown: {sorted(unknown)}")
            h, w = self.config.hw
            self._cameras = MujocoCameras(self.model, h, w)
            # From the thumb's side and above: the whole hand and the targets over the palm.
            self._cameras.add_free_camera("front", lookat=(1.005, 0.865, 0.145), distance=0.27, azimuth=150.0,
                                         elevation=-38.0)

    @property
    def goal(self) -> np.ndarray:
        """The 15 target fingertip coordinates of this episode."""
        return np.asarray(self.sim.goal, dtype=np.float64).copy()

    def fingertips(self) -> np.ndarray:
        return np.concatenate([self.data.site(s).xpos for s in FINGERTIP_SITES])

    def _sim_reset(self, seed: int) -> None:
        self.sim.reset(seed=seed)

    def _sim_step(self, action: np.ndarray) -> tuple[float, bool, dict[str, Any]]:
        obs, reward, _, _, info = self.sim.step(action.astype(np.float32))
        dist = float(np.linalg.norm(obs["achieved_goal"] - obs["desired_goal"]))
        return float(reward), bool(info["is_success"]), {"distance": dist}

    def _sim_state(self) -> dict[str, np.ndarray]:
        obs = self.sim._get_obs()
        qpos, qvel = obs["observation"][:24], obs["observation"][24:48]
        return {"joint_pos": qpos, "joint_vel": qvel, "fingertip_pos": obs["achieved_goal"],
                "target_fingertip_pos": obs["desired_goal"]}

    def _sim_render(self, camera: str) -> np.ndarray:
        assert self._cameras is not None, "rendering is off (EnvConfig.render=False)"
        self.sim._render_callback()  # moves the target and fingertip marker spheres into place
        return self._cameras.render(self.data, camera)

    def expert(self) -> HandReachExpert:
        return HandReachExpert(self)

    def _sim_close(self) -> None:
        self.sim.close()


class HandReachExpert:
    """Damped-least-squares IK on the fingertip sites, sent to the hand's position servos.

    It first solves the IK from the start pose and commands that pose. Once the servos have carried
    the hand most of the way, it integrates one IK step from the measured pose per control step into
    the commanded joints: this cancels the sag of the weak servos under gravity and takes the
    passive distal joints (coupled to the middle ones by a tendon) where they really are.
    """

    damping = 0.02  # DLS damping (m): keeps steps small near singular poses
    # The fingertip sites sit inside the fingertip capsules, so pinch targets 1 cm apart would press
    # thumb and finger into each other: the IK keeps finger links apart, allowing 1 mm of contact give.
    gap_margin = -0.001  # m
    gap_lookahead = 0.01  # m: finger links closer than this are watched
    gap_weight = 10.0
    plan_iters = 200  # the first solve, from the start pose
    integral_gain = 0.5
    shape_steps = 5  # steps for the servos to carry the hand most of the way

    def __init__(self, env: HandReachEnv) -> None:
        self.env = env
        m = env.model
        self.model = m
        # The IK's own copy of the model reports finger pairs up to gap_lookahead apart as contacts.
        self.ik_model = copy.deepcopy(m)
        self.ik_model.pair_margin[:] = self.gap_lookahead
        self.scratch = mujoco.MjData(self.ik_model)
        self.sites = [m.site(s).id for s in FINGERTIP_SITES]
        self.ctrl_lo, self.ctrl_hi = m.actuator_ctrlrange[:, 0].copy(), m.actuator_ctrlrange[:, 1].copy()
        self._plan_joints()
        self.reset()

    def _plan_joints(self) -> None:
        """Which joints the IK moves, their reachable ranges, and how each passive joint follows."""
        m = self.model
        driven: list[int] = []
        for i in range(m.nu):
            if m.actuator_trntype[i] == mujoco.mjtTrn.mjTRN_JOINT:
                driven.append(int(m.actuator_trnid[i, 0]))
            elif m.actuator_trntype[i] == mujoco.mjtTrn.mjTRN_TENDON:  # every joint the tendon spans moves
                driven += self._tendon_joints(int(m.actuator_trnid[i, 0]))[0]
            else:
                raise ValueError(f"unsupported transmission for actuator {m.actuator(i).name}")
        self.joints = sorted(set(driven))
        self.adr = m.jnt_qposadr[self.joints]
        self.dofs = m.jnt_dofadr[self.joints]
        self.jlo, self.jhi = m.jnt_range[:, 0], m.jnt_range[:, 1]
        # Joint limits act from `jnt_margin` inside the range and the weak servos cannot press past
        # that, so the IK plans within it.
        self.lo = self.jlo[self.joints] + m.jnt_margin[self.joints]
        self.hi = self.jhi[self.joints] - m.jnt_margin[self.joints]
        # A limited tendon with a tiny range over a driven and a passive joint holds their weighted
        # sum nearly constant: the passive joint moves by -coef_driven/coef_passive per driven radian.
        self.couplings: list[tuple[int, int, float]] = []  # (passive joint, driven joint, ratio)
        for t in range(m.ntendon):
            joints, coefs = self._tendon_joints(t)
            lo, hi = m.tendon_range[t]
            if len(joints) != 2 or not m.tendon_limited[t] or hi - lo > 0.005:
                continue
            (j0, c0), (j1, c1) = zip(joints, coefs, strict=True)
            if j0 in self.joints and j1 not in self.joints:
                (j0, c0), (j1, c1) = (j1, c1), (j0, c0)
            if j0 not in self.joints and j1 in self.joints:
                self.couplings.append((j0, j1, -c1 / c0))
        if len({c[0] for c in self.couplings}) != len(self.couplings):
            raise ValueError("a passive joint is coupled by more than one tendon")

    def _tendon_joints(self, t: int) -> tuple[list[int], list[float]]:
        m = self.model
        adr, num = m.tendon_adr[t], m.tendon_num[t]
        if any(m.wrap_type[adr + k] != mujoco.mjtWrap.mjWRAP_JOINT for k in range(num)):
            raise ValueError(f"tendon {m.tendon(t).name} is not a fixed (joint) tendon")
        return [int(m.wrap_objid[adr + k]) for k in range(num)], [float(m.wrap_prm[adr + k]) for k in range(num)]

    def reset(self) -> None:
        self.steps = 0
        self.q_cmd: np.ndarray | None = None

    def solve_ik(self, qpos: np.ndarray, goal: np.ndarray, iters: int | None = None) -> np.ndarray:
        """Joint positions (all nq) from `qpos` that put the fingertips at `goal`, or as near as the
        joint limits and the fingers' own volume allow (least squares)."""
        q = qpos.copy()
        q[self.adr] = np.clip(q[self.adr], self.lo, self.hi)
        for _ in range(iters or self.plan_iters):
            step = self._ik_step(q, goal)
            if step is None:
                break
            q[self.adr] = np.clip(q[self.adr] + step, self.lo, self.hi)
            self._follow(q, qpos)
        return q

    def _ik_step(self, q: np.ndarray, goal: np.ndarray) -> np.ndarray | None:
        """One damped-least-squares step of the driven joints from `q`; None when at the goal."""
        w, margin = self.gap_weight, self.gap_margin
        err, jac, gaps, gap_jac = self._linearize(q, goal)
        if np.linalg.norm(err) < 1e-4 and np.all(gaps >= margin - 1e-4):
            return None
        # Active sets: joints at a limit the step would push further are held, and finger pairs
        # that are (or would get) closer than the margin are held at the margin.
        free = np.ones(len(self.joints), dtype=bool)
        held = gaps < margin
        at_lo, at_hi = q[self.adr] <= self.lo + 1e-3, q[self.adr] >= self.hi - 1e-3
        for _ in range(4):
            rows = np.vstack([jac, w * gap_jac[held]]) * free
            step = self._dls(rows, np.concatenate([err, w * (margin - gaps[held])]))
            blocked = free & ((at_lo & (step < 0)) | (at_hi & (step > 0)))
            closing = ~held & (gaps + gap_jac @ step < margin)
            if not blocked.any() and not closing.any():
                break
            free &= ~blocked
            held |= closing
        return step * free

    def _linearize(self, q: np.ndarray, goal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Fingertip error and its Jacobian, and the gaps between nearby finger links and theirs, all
        over the driven joints (a driven joint also swings its passive partner)."""
        m, d = self.ik_model, self.scratch
        d.qpos[:] = q
        mujoco.mj_kinematics(m, d)
        mujoco.mj_comPos(m, d)
        err = goal - np.concatenate([d.site_xpos[s] for s in self.sites])
        jac = np.zeros((len(err), m.nv))
        for k, s in enumerate(self.sites):
            mujoco.mj_jacSite(m, d, jac[3 * k:3 * k + 3], None, s)
        mujoco.mj_collision(m, d)
        gaps = np.array([c.dist for c in d.contact[:d.ncon]])
        gap_jac = np.zeros((d.ncon, m.nv))
        j1, j2 = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        for i, c in enumerate(d.contact[:d.ncon]):
            mujoco.mj_jac(m, d, j1, None, c.pos, m.geom_bodyid[c.geom1])
            mujoco.mj_jac(m, d, j2, None, c.pos, m.geom_bodyid[c.geom2])
            gap_jac[i] = c.frame[:3] @ (j2 - j1)  # the normal points from geom1 to geom2
        return err, self._driven(jac), gaps, self._driven(gap_jac)

    def _driven(self, full: np.ndarray) -> np.ndarray:
        """Columns of a Jacobian over all dofs folded onto the driven joints."""
        eff = full[:, self.dofs].copy()
        for passive, driven, ratio in self.couplings:
            eff[:, self.joints.index(driven)] += ratio * full[:, self.ik_model.jnt_dofadr[passive]]
        return eff

    def _dls(self, eff: np.ndarray, err: np.ndarray) -> np.ndarray:
        return eff.T @ np.linalg.solve(eff @ eff.T + self.damping ** 2 * np.eye(len(err)), err)

    def _follow(self, q: np.ndarray, base: np.ndarray) -> None:
        """Move each passive joint with its driven partner, from where both are in `base`."""
        for passive, driven, ratio in self.couplings:
            pa, da = self.model.jnt_qposadr[passive], self.model.jnt_qposadr[driven]
            q[pa] = np.clip(base[pa] + ratio * (q[da] - base[da]), self.jlo[passive], self.jhi[passive])

    def servo_targets(self, q: np.ndarray) -> np.ndarray:
        """Actuator targets (joint angle or tendon length, per transmission) that hold the pose `q`."""
        m, d = self.ik_model, self.scratch
        d.qpos[:] = q
        mujoco.mj_kinematics(m, d)
        mujoco.mj_comPos(m, d)
        mujoco.mj_tendon(m, d)
        mujoco.mj_transmission(m, d)
        return d.actuator_length.copy()

    def act(self, obs: Observation) -> tuple[np.ndarray, str]:
        env = self.env
        goal, qpos = env.goal, env.data.qpos.copy()
        label = self.label(goal)
        if self.q_cmd is None:  # the full solve, from the pose the episode starts in
            self.q_cmd = self.solve_ik(qpos, goal)
        elif self.steps >= self.shape_steps:  # servos have settled: integrate the measured error
            step = self._ik_step(qpos, goal)
            if step is not None:
                self.q_cmd[self.adr] = np.clip(self.q_cmd[self.adr] + self.integral_gain * step,
                                               self.jlo[self.joints], self.jhi[self.joints])
        ctrl = np.clip(self.servo_targets(self.q_cmd), self.ctrl_lo, self.ctrl_hi)
        # Normalized over ctrlrange as HandReach's absolute control maps [-1, 1] back.
        action = (2 * ctrl - (self.ctrl_lo + self.ctrl_hi)) / (self.ctrl_hi - self.ctrl_lo)
        self.steps += 1
        return np.clip(action, -1.0, 1.0), label

    def label(self, goal: np.ndarray) -> str:
        env = self.env
        if np.linalg.norm(env.fingertips() - goal) < env.sim.distance_threshold:
            return LABEL_HOLD
        if self.steps < self.shape_steps:
            return LABEL_SHAPE
        moved = np.linalg.norm((goal - env.sim.initial_goal).reshape(5, 3)[:4], axis=1)
        return LABEL_PINCH.format(finger=FINGER_NAMES[int(np.argmax(moved))]) if moved.max() > 0 else LABEL_REST


def make(task: str, config: EnvConfig) -> SimEnv:
    """The hand/reach environment (one task, "reach")."""
    if task != "reach":
        raise ValueError(f"hand suite has one task, 'reach'; got {task!r}")
    return HandReachEnv(task, config)
