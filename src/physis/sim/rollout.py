"""Expert rollouts recorded as episodes, and the per-process environment cache workers share."""

from __future__ import annotations

import atexit
import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from physis.sim.base import EnvConfig, SimEnv, state_vector
from physis.sim.suites import make_env

_ENVS: dict[tuple[str, str, EnvConfig], SimEnv] = {}


def _close_cached_envs() -> None:
    """Free GL contexts while the GL library is still up (else EGL complains at exit)."""
    while _ENVS:
        with contextlib.suppress(Exception):
            _ENVS.popitem()[1].close()


def cached_env(suite: str, task: str, config: EnvConfig) -> SimEnv:
    """One environment per (suite, task, config) per process: building one (and its GL context) is slow."""
    key = (suite, task, config)
    if key not in _ENVS:
        _ENVS[key] = make_env(suite, task, config)
        # (Re-)registered after the GL backend's own exit handler, so it runs first (atexit is LIFO).
        atexit.unregister(_close_cached_envs)
        atexit.register(_close_cached_envs)
    return _ENVS[key]


@dataclass
class ExpertEpisode:
    """One expert rollout: per-step frames in LeRobot feature names, plus what happened."""

    task: str
    seed: int
    instruction: str
    success: bool
    length: int
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    subtasks: list[str] = field(default_factory=list)


def record_expert_episode(env: SimEnv, seed: int, action_noise: float = 0.0,
                          environment_state: bool = False, max_frames: int = 0, driver: Any = None,
                          replan_every: int = 8) -> ExpertEpisode:
    """Run the env's expert from `seed` to success or the step limit, recording observation and action per step.

    action_noise > 0 (DART, Laskey et al. 2017): the robot runs the expert's action plus Gaussian noise of that
    standard deviation (a fraction of each action's half-range; absolute where a limit is infinite), while the
    recorded action stays the expert's own. The demonstrations then visit states a little off the expert's path,
    labelled with how the expert gets back, which is what a cloned policy needs once its own errors add up.
    The noise is drawn from the episode seed, so a collection stays deterministic.

    environment_state=True also records the simulator's privileged object and goal positions per step
    (`SimEnv.environment_state`) as observation.environment_state, a training target for auxiliary heads.

    max_frames > 0 stops after that many frames: an episode's opening, whose success is not known
    (`success` is then False).

    driver (DAgger, Ross et al. 2011): a policy with reset() and infer(obs) -> {"actions": [H, D]} moves the robot,
    asked again every `replan_every` steps as `physis eval` runs it, while the recorded action is still what the
    expert would do in each state it reaches. The data then covers the states the policy's own mistakes lead to,
    labelled with the way back. `success` is then the driver's.
    """
    expert = env.expert()
    obs, _ = env.reset(seed=seed)
    expert.reset()
    if driver is not None:
        driver.reset()
    queue: list[np.ndarray] = []
    lower, upper = env.embodiment.action_limits()
    half = np.where(np.isfinite(upper - lower), (upper - lower) / 2, 1.0)
    noise = np.random.default_rng([seed, 0xDA27])
    states: list[np.ndarray] = []
    actions: list[np.ndarray] = []
    labels: list[str] = []
    env_states: list[np.ndarray] = []
    images: dict[str, list[np.ndarray]] = {cam: [] for cam in obs["images"]}
    done = False
    while not done:
        action, label = expert.act(obs)
        action = env.check_action(action)
        states.append(state_vector(obs, env.embodiment))
        actions.append(action.astype(np.float32))
        labels.append(label)
        if environment_state:
            env_states.append(env.environment_state())
        for cam, img in obs["images"].items():
            images[cam].append(img)
        if driver is not None:
            if not queue:
                chunk = np.asarray(driver.infer(obs)["actions"], dtype=np.float64)
                queue = list(chunk[:replan_every])
            action = env.check_action(queue.pop(0))
        elif action_noise > 0:
            action = env.check_action(np.clip(action + noise.normal(0.0, action_noise * half), lower, upper))
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated or len(actions) == max_frames
    frames: dict[str, Any] = {"observation.state": np.stack(states), "action": np.stack(actions)}
    if environment_state:
        frames["observation.environment_state"] = np.stack(env_states).astype(np.float32)
    for cam, imgs in images.items():
        frames[f"observation.images.{cam}"] = np.stack(imgs)
    finished = max_frames <= 0 or len(actions) < max_frames
    return ExpertEpisode(task=env.task, seed=seed, instruction=env.instruction, success=finished and env.success,
                         length=len(actions), frames=frames, subtasks=labels)


def expert_episode_job(suite: str, task: str, seed: int, config: EnvConfig, action_noise: float = 0.0,
                       environment_state: bool = False, max_frames: int = 0, driver: str | None = None,
                       replan_every: int = 8) -> ExpertEpisode:
    """Picklable entry point for worker processes; `driver` is a checkpoint path (loaded once per process)."""
    env = cached_env(suite, task, config)
    policy = cached_policy(driver, env.embodiment.name) if driver else None
    return record_expert_episode(env, seed, action_noise, environment_state, max_frames, policy, replan_every)


_POLICIES: dict[tuple[str, str], Any] = {}


def cached_policy(checkpoint: str, embodiment: str) -> Any:
    """One `physis.runtime.Policy` per (checkpoint, robot) per process."""
    from physis.runtime import Policy  # torch and the model only where a policy drives

    key = (checkpoint, embodiment)
    if key not in _POLICIES:
        _POLICIES[key] = Policy.from_checkpoint(checkpoint, embodiment=embodiment)
    return _POLICIES[key]
