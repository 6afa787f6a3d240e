"""One observation format for every benchmark suite, and the expert protocol.

Every suite returns the same observation, whatever the simulator underneath:

    {"images": {camera: uint8[H, W, 3]},          # the embodiment's cameras (or the ones asked for)
     "state": {group: float32[size]},             # the embodiment's state groups, in spec order
     "instruction": str}                          # what to do, in language

`step` reports `info["success"]` (and the suite's own extras; `info["goal_distance"]`, where a suite
has one, is how far the thing that must reach the goal still is from it). The policy never sees
privileged simulator state (object poses, goals); experts do, through the environment they were built for.
"""

from __future__ import annotations

import abc
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from physis.embodiment import EmbodimentSpec, load_embodiment

# Headless machines have no display for MuJoCo's default GLFW backend: render offscreen through EGL
# unless the user chose a backend. Set before anything imports mujoco.
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl"

Observation = dict[str, Any]


@dataclass(frozen=True)
class EnvConfig:
    """How a suite environment is built; the defaults are what collect and eval use."""

    image_size: int | tuple[int, int] = 96  # square side, or (height, width)
    cameras: tuple[str, ...] | None = None  # None: the embodiment's cameras
    render: bool = True  # False: no images at all (fast expert statistics)
    max_steps: int | None = None  # None: the suite's own episode limit
    paraphrase: bool = False  # draw a paraphrase of the instruction at each reset
    terminate_on_success: bool = True
    start_noise: float = 0.0  # Meta-World: the hand starts up to this many metres (per axis) off its home, per seed

    @property
    def hw(self) -> tuple[int, int]:
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        h, w = self.image_size
        return (int(h), int(w))


class Expert(Protocol):
    """A scripted policy with privileged access to its environment that says what it is doing."""

    def reset(self) -> None: ...

    def act(self, obs: Observation) -> tuple[np.ndarray, str]:
        """The next native action and the subtask label (a short phrase) of the phase it is in."""
        ...


class SimEnv(gym.Env, abc.ABC):
    """A benchmark task behind physis's one observation format.

    Subclasses implement the `_sim_*` hooks; this class builds observations, counts steps, draws
    instructions and checks actions.
    """

    metadata = {"render_modes": ["rgb_array"]}
    suite: str = ""
    default_max_steps: int = 500

    def __init__(self, task: str, embodiment: str | EmbodimentSpec, instructions: Sequence[str],
                 config: EnvConfig | None = None) -> None:
        super().__init__()
        self.task = task
        self.config = config or EnvConfig()
        self.embodiment = embodiment if isinstance(embodiment, EmbodimentSpec) else load_embodiment(embodiment)
        if not instructions:
            raise ValueError(f"task {task!r} needs at least one instruction")
        self.instructions = tuple(instructions)
        self.instruction = self.instructions[0]
        self.max_steps = self.config.max_steps or self.default_max_steps
        self.camera_names = self.config.cameras or tuple(c.name for c in self.embodiment.cameras)
        self.elapsed_steps = 0
        self.success = False
        self.render_mode = "rgb_array"
        self._cameras: MujocoCameras | None = None  # MuJoCo suites render through this; closed by close()
        lo, hi = self.embodiment.action_limits()
        self.action_space = gym.spaces.Box(lo.astype(np.float32), hi.astype(np.float32), dtype=np.float32)
        h, w = self.config.hw
        cams = self.camera_names if self.config.render else ()
        images = {c: gym.spaces.Box(0, 255, (h, w, 3), np.uint8) for c in cams}
        state = {g.name: gym.spaces.Box(-np.inf, np.inf, (g.size,), np.float32) for g in self.embodiment.state}
        self.observation_space = gym.spaces.Dict({
            "images": gym.spaces.Dict(images),
            "state": gym.spaces.Dict(state),
            "instruction": gym.spaces.Text(max_length=512, charset=string.printable),
        })

    # --- hooks for subclasses -------------------------------------------------------------------
    @abc.abstractmethod
    def _sim_reset(self, seed: int) -> None:
        """Reset the simulator deterministically from `seed`."""

    @abc.abstractmethod
    def _sim_step(self, action: np.ndarray) -> tuple[float, bool, dict[str, Any]]:
        """Apply one native action; return (reward, success, extra info)."""

    @abc.abstractmethod
    def _sim_state(self) -> dict[str, np.ndarray]:
        """The embodiment's state groups (what the policy may see about the robot)."""

    def environment_state(self) -> np.ndarray:
        """Privileged object and goal positions (the suite's `environment_state` names, in order), float32.

        A training target only (physis collect records it; an auxiliary head learns to read it from the
        pixels); never a policy input.
        """
        raise NotImplementedError(f"{type(self).__name__} does not report an environment state")

    @abc.abstractmethod
    def _sim_render(self, camera: str) -> np.ndarray:
        """One uint8 HxWx3 image from `camera` at the configured size, upright."""

    @abc.abstractmethod
    def expert(self) -> Expert:
        """The suite's scripted expert for this environment."""

    # --- gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Observation, dict]:
        if seed is None:
            raise ValueError("physis environments need an explicit seed: reset(seed=...)")
        super().reset(seed=seed)
        self.elapsed_steps = 0
        self.success = False
        if self.config.paraphrase and len(self.instructions) > 1:
            self.instruction = self.instructions[int(self.np_random.integers(len(self.instructions)))]
        else:
            self.instruction = self.instructions[0]
        self._sim_reset(int(seed))
        return self.observe(), {"success": False}

    def step(self, action: Any) -> tuple[Observation, float, bool, bool, dict]:
        action = self.check_action(action)
        reward, success, info = self._sim_step(action)
        self.elapsed_steps += 1
        self.success = self.success or bool(success)
        info = {**info, "success": bool(success)}
        terminated = bool(success) and self.config.terminate_on_success
        truncated = self.elapsed_steps >= self.max_steps and not terminated
        return self.observe(), float(reward), terminated, truncated, info

    def observe(self) -> Observation:
        images = {c: self._sim_render(c) for c in self.camera_names} if self.config.render else {}
        state = {k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in self._sim_state().items()}
        return {"images": images, "state": state, "instruction": self.instruction}

    def render(self) -> np.ndarray:
        return self._sim_render(self.camera_names[0])

    def _sim_close(self) -> None:
        """Release the simulator (the cameras are released by `close`)."""

    def close(self) -> None:
        if self._cameras is not None:
            self._cameras.close()
            self._cameras = None
        self._sim_close()
        super().close()

    def check_action(self, action: Any) -> np.ndarray:
        """A finite action of the embodiment's width, clipped to its limits; anything else raises."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (self.embodiment.action_dim,):
            raise ActionError(f"{self.suite}/{self.task} expects an action of shape ({self.embodiment.action_dim},) "
                              f"({', '.join(self.embodiment.action_names)}), got shape {np.shape(action)}")
        if not np.all(np.isfinite(a)):
            raise ActionError(f"{self.suite}/{self.task} got a non-finite action: {a.tolist()}")
        lo, hi = self.embodiment.action_limits()
        return np.clip(a, lo, hi)


class ActionError(ValueError):
    """A policy produced an action the environment cannot execute (wrong shape, NaN or inf)."""


def state_vector(obs: Observation, spec: EmbodimentSpec) -> np.ndarray:
    """The state groups of an observation concatenated in the spec's order."""
    return np.concatenate([np.asarray(obs["state"][g.name], np.float32).reshape(-1) for g in spec.state])


def fast_rendering(model: Any) -> None:
    """Turn off shadows and multisampling on a MuJoCo model: ~6x faster on software GL.

    Must run before the renderer's context is created (the offscreen buffer is sized then).
    """
    model.light_castshadow[:] = 0
    model.vis.quality.offsamples = 0


class MujocoCameras:
    """Renders named (or free) MuJoCo cameras at a fixed size with one offscreen context."""

    def __init__(self, model: Any, height: int, width: int, flip: Sequence[str] = ()) -> None:
        import mujoco

        fast_rendering(model)
        model.vis.global_.offheight = max(model.vis.global_.offheight, height)
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        self._renderer = mujoco.Renderer(model, height, width)
        self._flip = set(flip)
        self.free_cameras: dict[str, Any] = {}

    def add_free_camera(self, name: str, lookat: Sequence[float], distance: float, azimuth: float,
                        elevation: float) -> None:
        import mujoco

        cam = mujoco.MjvCamera()
        cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        cam.lookat[:] = lookat
        cam.distance, cam.azimuth, cam.elevation = distance, azimuth, elevation
        self.free_cameras[name] = cam

    def render(self, data: Any, camera: str) -> np.ndarray:
        self._renderer.update_scene(data, camera=self.free_cameras.get(camera, camera))
        img = self._renderer.render()
        if camera in self._flip:
            img = img[::-1]
        return np.ascontiguousarray(img)

    def close(self) -> None:
        self._renderer.close()
