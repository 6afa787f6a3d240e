"""What `physis eval` can run: anything with `reset()` and `infer(obs) -> action chunk`.

Built-ins: `expert` (the suite's scripted expert, a chunk of one step) and `random` (uniform inside
the embodiment's limits). `module:factory` names any importable callable that takes the environment
and returns a policy. Checkpoints load through `physis.runtime`; `ServerPolicy` asks a policy server
(`physis serve`, or any server on openpi's protocol) through openpi's own client.
"""

from __future__ import annotations

import importlib
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from physis.sim.base import ActionError, Observation, SimEnv


@runtime_checkable
class ChunkPolicy(Protocol):
    def reset(self) -> None: ...

    def infer(self, obs: Observation) -> Mapping[str, Any] | np.ndarray:
        """An action chunk [H, D] in the robot's native action space, or {"actions": [H, D], ...}."""
        ...


class ExpertPolicy:
    """The environment's scripted expert as a policy: chunks of one action, with its subtask label."""

    def __init__(self, env: SimEnv) -> None:
        self._expert = env.expert()

    def reset(self) -> None:
        self._expert.reset()

    def infer(self, obs: Observation) -> dict[str, Any]:
        action, label = self._expert.act(obs)
        return {"actions": np.asarray(action, dtype=np.float32)[None], "subtask": label}


class RandomPolicy:
    """Uniform random chunks inside the embodiment's action limits: the floor any policy must beat."""

    def __init__(self, env: SimEnv, horizon: int = 8) -> None:
        self._env = env
        self._horizon = horizon
        lo, hi = env.embodiment.action_limits()
        self._lo = np.where(np.isfinite(lo), lo, -1.0)
        self._hi = np.where(np.isfinite(hi), hi, 1.0)

    def reset(self) -> None:
        pass

    def infer(self, obs: Observation) -> np.ndarray:
        rng = self._env.np_random  # seeded by the episode's reset: reproducible
        return rng.uniform(self._lo, self._hi, size=(self._horizon, self._lo.size)).astype(np.float32)


class ServerPolicy:
    """The policy a websocket server on openpi's protocol serves, through the unmodified `openpi-client`.

    One connection per policy; `reset()` marks the next request `"reset": True` so the server starts a new
    episode for this connection (openpi's client does not send its reset over the wire). The API key comes from
    PHYSIS_API_KEY when set.
    """

    def __init__(self, url: str, env: SimEnv, api_key: str | None = None) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
            raise ValueError(f"--server {url!r}: expected ws://HOST:PORT")
        try:
            from openpi_client.websocket_client_policy import WebsocketClientPolicy
        except ImportError as e:
            raise ValueError(f"--server needs openpi's client: pip install --no-deps openpi-client ({e})") from e
        self._client = WebsocketClientPolicy(url, api_key=api_key or os.environ.get("PHYSIS_API_KEY") or None)
        metadata = self._client.get_server_metadata()
        served = metadata.get("embodiment")
        # what the served localizer's estimates (reply "env_state") are of
        self.env_state_names = tuple(metadata.get("checkpoint", {}).get("env_state_names") or ())
        if served != env.embodiment.name:
            raise ValueError(f"the server at {url} serves embodiment {served!r}; this suite's robot is "
                             f"{env.embodiment.name!r}")
        self._new_episode = True

    def reset(self) -> None:
        self._new_episode = True

    def infer(self, obs: Observation) -> dict[str, Any]:
        request = {"images": obs["images"], "state": obs["state"], "instruction": obs["instruction"]}
        if self._new_episode:
            request["reset"] = True
            self._new_episode = False
        return self._client.infer(request)


def make_policy(name: str, env: SimEnv, checkpoint: Path | None = None, server: str = "") -> ChunkPolicy:
    """`expert`, `random`, `module:factory`, (with `checkpoint`) a trained model, or (with `server`) the policy a
    server at that ws:// address serves."""
    if server:
        return ServerPolicy(server, env)
    if checkpoint is not None:
        return _checkpoint_policy(Path(checkpoint), env)
    if name == "expert":
        return ExpertPolicy(env)
    if name == "random":
        return RandomPolicy(env)
    if ":" in name:
        module, attr = name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import policy factory {name!r}: {e}") from e
        policy = factory(env)
        if not isinstance(policy, ChunkPolicy):
            raise TypeError(f"{name} returned {type(policy).__name__}, which lacks reset() and infer(obs)")
        return policy
    raise ValueError(f"unknown policy {name!r}: use expert, random, module:factory, or --checkpoint RUN")


_CHECKPOINTS: dict[tuple[Path, str], Any] = {}


def _checkpoint_policy(path: Path, env: SimEnv) -> ChunkPolicy:
    from physis.runtime import Policy

    key = (path, env.embodiment.name)
    if key not in _CHECKPOINTS:  # one model per worker process and robot; episodes run one after another
        _CHECKPOINTS[key] = Policy.from_checkpoint(path, embodiment=env.embodiment.name)
    return _CHECKPOINTS[key]


def as_chunk(output: Mapping[str, Any] | np.ndarray, action_dim: int) -> np.ndarray:
    """A policy's output as a finite [H, D] array; anything else raises ActionError with the reason."""
    actions = output.get("actions") if isinstance(output, Mapping) else output
    if actions is None:
        raise ActionError(f"policy output has no 'actions' (keys: {sorted(output)})")  # type: ignore[arg-type]
    try:
        chunk = np.asarray(actions, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ActionError(f"policy actions are not numeric: {e}") from e
    if chunk.ndim == 1:
        chunk = chunk[None]
    if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != action_dim:
        raise ActionError(f"policy returned actions of shape {np.shape(actions)}; expected [H, {action_dim}]")
    if not np.all(np.isfinite(chunk)):
        raise ActionError(f"policy returned non-finite actions (NaN or inf) in a chunk of shape {chunk.shape}")
    return chunk
