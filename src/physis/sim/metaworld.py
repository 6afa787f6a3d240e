"""Meta-World v3 (metaworld 3.1.1) behind physis's observation format: MT10 and MT50.

The policy sees pixels and the Sawyer's proprioception (end-effector position and gripper opening);
object poses and the goal stay inside the simulator, where only the scripted expert reads them (the
goal and the objects are visible in the images). Each reset draws object and goal positions from the
task's own random range with the episode seed, so seeds, not Meta-World's fixed task lists, decide the
variation, and training and evaluation seeds never meet.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from physis.sim.base import EnvConfig, MujocoCameras, Observation, SimEnv
from physis.sim.metaworld_tasks import INSTRUCTIONS, MT50

# Our camera names -> Meta-World's; the corner cameras render upside down, so their rows are flipped.
CAMERAS = {"corner": "corner", "corner2": "corner2", "corner3": "corner3", "gripper": "gripperPOV",
           "behind_gripper": "behindGripper", "top": "topview", "front": "front",
           "front_near": "front_near", "side": "side"}
_FLIPPED = ("corner", "corner2", "corner3")
# Meta-World's experts warn on every step whose gain saturates the (clipped) action; that is by design.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
# Free cameras over the workspace, 45 degrees down from the side facing the robot. `front` shows the whole
# table; `front_near` frames the region where MT10's objects and goals lie, so a 4 cm goal marker covers
# about 5 px of a 96 px image instead of 3. `side` looks at the same region from the robot's left, 60 degrees
# round from `front` and 20 degrees down: a marker's height and depth, one ray in `front`, part in `side`.
_FREE_CAMERAS = {
    "front": {"lookat": (0.0, 0.7, 0.05), "distance": 1.1, "azimuth": -90.0, "elevation": -45.0},
    "front_near": {"lookat": (0.0, 0.74, 0.14), "distance": 0.7, "azimuth": -90.0, "elevation": -45.0},
    "side": {"lookat": (0.0, 0.72, 0.12), "distance": 0.75, "azimuth": -30.0, "elevation": -20.0},
}


class MetaWorldEnv(SimEnv):
    """One Meta-World task (the registry sets `suite` to the suite that asked for it)."""

    suite = "metaworld/mt50"
    default_max_steps = 500  # Meta-World's own max_path_length

    def __init__(self, task: str, config: EnvConfig | None = None) -> None:
        import metaworld
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        super().__init__(task, "metaworld_sawyer", INSTRUCTIONS[task], config)
        for cam in self.camera_names:
            if cam not in CAMERAS:
                raise ValueError(f"unknown Meta-World camera {cam!r}; valid: {', '.join(CAMERAS)}")
        self._env = ALL_V3_ENVIRONMENTS[task]()
        # set_task once (Meta-World insists), then unfreeze the random vector so the seed decides it.
        self._env.set_task(metaworld.MT1(task, seed=0).train_tasks[0])
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        self._env._partially_observable = False  # the expert reads the goal from obs[-3:]
        self._env.max_path_length = max(self.max_steps, self._env.max_path_length)
        self._hand_home = np.array(self._env.hand_init_pos, dtype=float)
        if not (self.config.start_noise >= 0 and np.isfinite(self.config.start_noise)):
            raise ValueError(f"start_noise must be >= 0 metres, got {self.config.start_noise}")
        self._obs39 = np.zeros(39)
        self._cameras: MujocoCameras | None = None
        if self.config.render:
            h, w = self.config.hw
            self._cameras = MujocoCameras(self._env.model, h, w, flip=[CAMERAS[c] for c in _FLIPPED])
            for name, pose in _FREE_CAMERAS.items():
                self._cameras.add_free_camera(name, **pose)

    @property
    def privileged_obs(self) -> np.ndarray:
        """Meta-World's full 39-D observation (objects and goal): for experts, never for policies."""
        return self._obs39

    def _sim_reset(self, seed: int) -> None:
        import mujoco

        self._env.seed(seed)
        hand = self._hand_home
        if self.config.start_noise > 0:  # a start off the shared path, drawn from the seed (reproducible)
            s = self.config.start_noise
            hand = hand + np.random.default_rng([seed, 0x5717]).uniform(-s, s, size=3)
        self._env.hand_init_pos = hand
        self._obs39, _ = self._env.reset()
        # Meta-World moves the goal site in reset without recomputing world positions, so the first frame
        # would show the previous episode's goal marker; mj_forward changes no state, only derived quantities.
        mujoco.mj_forward(self._env.model, self._env.data)

    def _sim_step(self, action: np.ndarray) -> tuple[float, bool, dict[str, Any]]:
        self._obs39, reward, _, _, info = self._env.step(action.astype(np.float32))
        extras = {"goal_distance": float(info["obj_to_target"])} if "obj_to_target" in info else {}
        return float(reward), bool(info["success"]), extras

    def _sim_state(self) -> dict[str, np.ndarray]:
        return {"eef_pos": self._obs39[:3], "gripper": self._obs39[3:4]}

    def environment_state(self) -> np.ndarray:
        # Meta-World's 39-D observation: [4:7] the (first) object's position, [36:39] the goal's.
        return np.concatenate([self._obs39[4:7], self._obs39[36:39]]).astype(np.float32)

    def _sim_render(self, camera: str) -> np.ndarray:
        if self._cameras is None:
            raise RuntimeError("this environment was built with render=False")
        return self._cameras.render(self._env.data, CAMERAS[camera])

    def expert(self) -> MetaWorldExpert:
        return MetaWorldExpert(self)

    def _sim_close(self) -> None:
        self._env.close()


class MetaWorldExpert:
    """Meta-World's own scripted policy for the task, with a subtask label from its current branch."""

    def __init__(self, env: MetaWorldEnv) -> None:
        from physis.sim.metaworld_expert import PhaseLabeledExpert

        self._env = env
        self._expert = PhaseLabeledExpert(env.task)

    def reset(self) -> None:
        pass  # the Meta-World policies are stateless

    def act(self, obs: Observation) -> tuple[np.ndarray, str]:
        action, label = self._expert.act(self._env.privileged_obs)
        return np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0), label


def make(task: str, config: EnvConfig) -> MetaWorldEnv:
    if task not in MT50:
        raise ValueError(f"unknown Meta-World task {task!r}; valid: {', '.join(MT50)}")
    return MetaWorldEnv(task, config)
