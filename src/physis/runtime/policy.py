"""`Policy`: a trained checkpoint behind `reset()` / `infer(obs)`, in the robot's native action space.

An observation is the simulation suites' format (`{"images": {cam: uint8 HxWx3}, "state": {group: array},
"instruction": str}`). `infer` normalizes the state with the checkpoint's statistics, maps it into the
unified space, encodes the prefix once, generates the subtask (when the model has that head), samples
an action chunk with K flow steps, and maps it back: un-normalized, native order, clamped to the
embodiment's limits. A chunk with a NaN is never returned: the last safe action is held instead and the
output says so.

`infer_batch` serves several clients in one forward pass (the policy server's micro-batching): each
client's frame history, last safe action and random generator live in its own `PolicySession`, so a
batch of one gives exactly what `infer` gives, and clients never see each other's state.

`select_action` gives one action per control step from a chunk queue (open loop, temporal ensembling or
real-time chunking, `physis.runtime.execution`); `backend` picks how the model runs (`physis.runtime.backends`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from physis.data.relative import ENV_STATE
from physis.data.stats import EPS, Normalizer, stats_from_json
from physis.embodiment import EmbodimentSpec, UnifiedSpace
from physis.model.text import trim_text_padding
from physis.runtime.backends import make_engine
from physis.runtime.execution import ChunkExecutor, ExecutionConfig
from physis.runtime.latch import EnvStateLatch

LATCH_BACKENDS = ("eager", "bf16", "int8")  # those that run the model's own prefix encoder, which reads the latch


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the robot or observation it is asked to serve."""


def pick_embodiment(specs: Sequence[EmbodimentSpec], embodiment: str | None) -> EmbodimentSpec:
    """The checkpoint's spec for `embodiment`; None is fine when the checkpoint serves a single robot."""
    names = [s.name for s in specs]
    if embodiment is None:
        if len(specs) != 1:
            raise CheckpointMismatchError(f"this checkpoint serves several robots ({', '.join(names)}); name one")
        embodiment = names[0]
    if embodiment not in names:
        raise CheckpointMismatchError(f"the checkpoint was trained for {', '.join(names)}, not {embodiment!r}")
    return specs[names.index(embodiment)]


class PolicySession:
    """One client's inference state: its recent frames, its last safe action and its random generator."""

    def __init__(self, history: int, last_safe: np.ndarray, seed: int = 0) -> None:
        self.frames: deque[torch.Tensor] = deque(maxlen=history)  # each [C, 3, h, w]
        self.last_safe = last_safe
        self.generator = torch.Generator().manual_seed(seed)
        self.subtask_ids: torch.Tensor | None = None  # the last chunk's subtask (1, Ls): the next one's draft
        self.latched: np.ndarray | None = None  # environment-state values held for this episode (Policy.latch)
        self.released = False  # the robot reached the held position: the live estimate again (Policy.latch_release)

    def reset(self, seed: int | None = None) -> None:
        """A new episode: forget the frame history, the last subtask and the held values; with a seed, restart
        the noise generator from it, so the episode's flow noise does not depend on the episodes before it."""
        if seed is not None:
            self.generator.manual_seed(seed)
        self.frames.clear()
        self.subtask_ids = None
        self.latched = None
        self.released = False


class Policy:
    def __init__(self, model: Any, meta: dict[str, Any], stats: dict[str, Any], embodiment: str | None = None,
                 flow_steps: int | None = None, text_encoder: Any = None, seed: int = 0, backend: str = "eager",
                 execution: ExecutionConfig | None = None, backend_options: dict[str, Any] | None = None,
                 device: str = "cpu", noise_scale: float = 1.0):
        """`meta` is a checkpoint's config.json (robots, unified space, cameras, data layout); `stats` its
        stats.json (normalization per robot). `backend` runs the model, with `backend_options` (for onnx:
        onnx_dir, where exported graphs are kept and reused; see physis.runtime.backends);
        `execution` is how `select_action` turns chunks into actions (see physis.runtime.execution); `device` is
        where the model runs (cpu, cuda, ...: on a GPU, backend="cuda-graph" is the fast one); observations and
        actions stay numpy on the host. `noise_scale` multiplies the flow's starting noise: 1 samples the learned
        distribution, below 1 leans toward its modes (a sampling temperature), 0 is deterministic."""
        from physis.model.text import TextEncoder
        from physis.model.vocab import SubtaskVocab

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Policy: device {device!r}, but torch sees no CUDA device")
        self.model = model.eval().to(self.device)
        self.meta = meta
        specs = [EmbodimentSpec.from_dict(d, source="checkpoint") for d in meta["embodiments"]]
        self.spec = pick_embodiment(specs, embodiment)
        embodiment = self.spec.name
        self.embodiment_index = specs.index(self.spec)
        space = UnifiedSpace.from_dict(meta["unified_space"])
        self.state_map, self.action_map = space.state_map(self.spec), space.action_map(self.spec)
        if embodiment not in stats:
            raise CheckpointMismatchError(f"the checkpoint has no normalization stats for {embodiment!r}")
        stats = stats[embodiment]
        arrays, modes = stats_from_json(stats["stats"]), stats["modes"]
        self.state_norm = Normalizer(arrays, {"observation.state": modes["observation.state"]})
        self.action_norm = Normalizer(arrays, {"action": modes["action"]})
        self.cameras = list(meta["cameras"][embodiment])
        self.num_cameras = int(meta["num_cameras"])
        data = meta["data"]
        self.image_size, self.history = int(data["image_size"]), int(data["history"])
        self._env_stats = arrays.get(ENV_STATE)
        # what the localizer estimates (object and goal positions, world frame then robot-relative), in order
        self.env_state_names: tuple[str, ...] = tuple(meta.get("env_state_names") or ())
        # its normalization, to report an estimate in the data's units (None: the checkpoint has none)
        self._env_units = None if self._env_stats is None else (
            np.maximum(np.asarray(self._env_stats["std"], np.float64), EPS),
            np.asarray(self._env_stats["mean"], np.float64))
        self._latch: EnvStateLatch | None = None
        self.flow_steps = flow_steps
        if not (noise_scale >= 0.0 and math.isfinite(noise_scale)):
            raise ValueError(f"Policy: noise_scale must be a finite number >= 0, got {noise_scale}")
        self.noise_scale = noise_scale
        self.text = text_encoder if text_encoder is not None else TextEncoder()
        self.vocab = SubtaskVocab(meta.get("subtask_vocab") or [])
        self.lower, self.upper = self.spec.action_limits()
        self.session = self.new_session(seed)  # what `infer` and `reset` use
        self.engine = make_engine(self.model, backend, **(backend_options or {}))
        self._execution = execution or ExecutionConfig()
        self._executor: ChunkExecutor | None = None
        self.last_output: dict[str, Any] | None = None  # `select_action`'s latest chunk (subtask, progress, ...)

    @classmethod
    def from_checkpoint(cls, path: str | Path, embodiment: str | None = None, **kwargs: Any) -> Policy:
        from physis.model.config import ModelConfig
        from physis.model.physis_model import PhysisModel
        from physis.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(Path(path), training_state=False)  # weights only, never unpickled
        model = PhysisModel(ModelConfig.from_dict(ckpt.config["model"]))
        model.load_state_dict(ckpt.ema_state or ckpt.model_state)
        return cls(model, ckpt.config, ckpt.stats or {}, embodiment=embodiment, **kwargs)

    @property
    def execution(self) -> ExecutionConfig:
        """How `select_action` runs chunks; setting it drops the queue of the previous mode."""
        return self._execution

    @execution.setter
    def execution(self, config: ExecutionConfig) -> None:
        if self._executor is not None:
            self._executor.close()
        self._execution, self._executor = config, None

    @property
    def latch(self) -> tuple[str, ...]:
        """Environment-state values (names from the checkpoint's env_state_names, e.g. goal_x) that stay put
        within an episode: the localizer's estimate at the episode's first chunk is held and fed to the model
        for the rest of it, in place of the new estimate (see physis.runtime.latch). Empty: none held."""
        return self._latch.names if self._latch is not None else ()

    @latch.setter
    def latch(self, names: Sequence[str]) -> None:
        self.set_latch(names)

    @property
    def latch_release(self) -> float:
        """Held values are let go, for the rest of the episode, once the robot comes within this distance of them
        (0: held for the whole episode). Set with `set_latch`."""
        return self._latch.release if self._latch is not None else 0.0

    def set_latch(self, names: Sequence[str], release: float = 0.0) -> None:
        """Hold `names` (see `latch`), letting them go once the robot is within `release` of them (0: never)."""
        names = tuple(names)
        if not names:
            if release:
                raise ValueError("a release distance needs latched values")
            self._latch = None
            return
        if not self.model.config.localizer:
            raise ValueError("Policy.latch holds the localizer's estimate; this checkpoint has no localizer")
        if self.engine.backend not in LATCH_BACKENDS:
            raise ValueError(f"Policy.latch runs on the backends {LATCH_BACKENDS}, not {self.engine.backend!r}")
        if self._env_stats is None:
            raise CheckpointMismatchError("the checkpoint has no environment-state statistics to latch with")
        self._latch = EnvStateLatch(names, self.meta.get("env_state_names") or [], self._env_stats["mean"],
                                    self._env_stats["std"], self.spec,
                                    near=float(self.meta["data"].get("env_state_near", 0.0)), release=release)

    def reset(self, seed: int | None = None) -> None:
        """A new episode (see PolicySession.reset); `seed` makes its flow noise a function of the seed alone."""
        self.session.reset(seed)
        self.last_output = None
        if self._executor is not None:
            self._executor.reset()

    def new_session(self, seed: int = 0) -> PolicySession:
        """Fresh state for one more client of `infer_batch`."""
        return PolicySession(self.history, np.clip(np.zeros(self.spec.action_dim), self.lower, self.upper), seed)

    # ------------------------------------------------------------------ observation -> batch
    def _batch(self, obs: dict[str, Any], session: PolicySession) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One observation as a batch of one, and its new frame [C, 3, h, w]; the session is not changed
        here (the frame joins its history once the batch has been inferred)."""
        missing = [c for c in self.cameras if c not in obs.get("images", {})]
        if missing:
            raise CheckpointMismatchError(f"observation lacks cameras {missing}; the checkpoint reads {self.cameras}")
        now = torch.zeros(self.num_cameras, 3, self.image_size, self.image_size)  # [C, 3, h, w]; absent cameras 0
        for i, cam in enumerate(self.cameras[: self.num_cameras]):
            img = torch.from_numpy(np.ascontiguousarray(obs["images"][cam])).permute(2, 0, 1)
            if tuple(img.shape[-2:]) != (self.image_size, self.image_size):
                img = F.interpolate(img[None].float(), size=(self.image_size, self.image_size), mode="bilinear",
                                    antialias=True, align_corners=False)[0]
            now[i] = img  # converted as it is copied in
        now /= 255.0
        if self.history == 1:
            images = now[None, :, None]  # [1, C, 1, 3, h, w], a view
        else:  # the first frames repeat, as padding does in training
            window = ([*session.frames, now] if session.frames else [now] * self.history)[-self.history:]
            images = torch.stack(window, dim=1)[None]  # [1, C, T, 3, h, w]
        image_mask = torch.zeros(1, self.num_cameras, dtype=torch.bool)
        image_mask[0, : min(len(self.cameras), self.num_cameras)] = True

        try:
            state = np.concatenate([np.asarray(obs["state"][g.name], np.float32).reshape(-1) for g in self.spec.state])
        except KeyError as e:
            raise CheckpointMismatchError(f"observation lacks state group {e}; the checkpoint reads "
                                          f"{[g.name for g in self.spec.state]}") from None
        if state.shape != (self.spec.state_dim,):
            raise CheckpointMismatchError(
                f"state has {state.shape[0]} values; {self.spec.name} has {self.spec.state_dim}")
        # normalized and placed in the unified space in numpy: on a vector of a few dozen values each library call
        # costs more than its arithmetic, and numpy's calls cost less (the same float32 operations)
        mask = self.state_map.mask
        state_n = self.state_norm({"observation.state": state})["observation.state"]
        text, text_mask = self.text.encode(obs.get("instruction", ""))
        held = {}
        if self._latch is not None:
            if not session.released and self._latch.reached(session.latched, state):
                session.released = True
            given, given_mask = self._latch.given(None if session.released else session.latched, state)
            held = {"env_state_given": torch.from_numpy(given)[None],
                    "env_state_given_mask": torch.from_numpy(given_mask)[None]}
        return {
            "images": images, "image_mask": image_mask,
            "state": torch.from_numpy(self.state_map.to_unified(state_n) * mask)[None],
            "state_mask": torch.from_numpy(mask)[None],
            "text": torch.as_tensor(text)[None], "text_mask": torch.as_tensor(text_mask)[None],
            "embodiment": torch.tensor([self.embodiment_index]),
            "action_mask": torch.from_numpy(self.action_map.mask)[None],  # the body's DoF, for sampling
            **held,
        }, now

    # ------------------------------------------------------------------ inference
    def infer(self, obs: dict[str, Any], prefix_actions: np.ndarray | None = None,
              prefix_weights: np.ndarray | None = None) -> dict[str, Any]:
        """A chunk for one observation. prefix_actions (H, D) native actions already committed, with weights
        (H,) in [0, 1], are inpainted into it (real-time chunking): weight-1 steps come back as given."""
        if prefix_actions is None and prefix_weights is None:
            return self.infer_batch([obs], [self.session])[0]
        actions, weights = self._unified_prefix(prefix_actions, prefix_weights)
        return self.infer_batch([obs], [self.session], prefix_actions=actions, prefix_weights=weights)[0]

    def select_action(self, obs: dict[str, Any]) -> np.ndarray:
        """One native action (D,) for this control step, from a queue of chunks run as `self.execution` says
        (open_loop, ensemble or rtc); within the embodiment's limits."""
        if self._executor is None:
            def plan(o: dict[str, Any], prefix: np.ndarray | None, weights: np.ndarray | None) -> np.ndarray:
                self.last_output = self.infer(o, prefix, weights)
                return self.last_output["actions"]

            self._executor = ChunkExecutor(self.execution, plan, self.model.config.horizon)
        return np.clip(self._executor.step(obs), self.lower, self.upper)

    def _unified_prefix(self, actions: np.ndarray | None,
                        weights: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Committed native actions (H, D), weights (H,) -> normalized unified space (1, H, A), (1, H)."""
        h = self.model.config.horizon
        if actions is None or weights is None:
            raise ValueError("Policy.infer: pass prefix_actions and prefix_weights together")
        actions, weights = np.asarray(actions, np.float32), np.asarray(weights, np.float32)
        if actions.shape != (h, self.spec.action_dim) or weights.shape != (h,):
            raise ValueError(f"Policy.infer: expected prefix_actions ({h}, {self.spec.action_dim}) and prefix_weights "
                             f"({h},), found {actions.shape} and {weights.shape}")
        normalized = self.action_norm({"action": torch.from_numpy(actions)})["action"]
        return self.action_map.to_unified(normalized)[None], torch.from_numpy(weights)[None]

    @torch.inference_mode()
    def infer_batch(self, observations: Sequence[dict[str, Any]], sessions: Sequence[PolicySession],
                    prefix_actions: torch.Tensor | None = None,
                    prefix_weights: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """One output per observation, as `infer` gives it, from one forward pass over all of them: the prefix
        is encoded once for the batch and the flow steps run on every chunk at once; noise comes from each
        observation's own session."""
        if len(observations) != len(sessions):
            raise ValueError(f"infer_batch: {len(observations)} observations but {len(sessions)} sessions")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("infer_batch: a session appears twice in one batch")
        if not observations:
            return []
        samples, frames = [], []
        for i, (obs, session) in enumerate(zip(observations, sessions, strict=True)):
            try:
                sample, now = self._batch(obs, session)
            except CheckpointMismatchError as e:
                if len(observations) == 1:
                    raise
                raise CheckpointMismatchError(f"observation {i}: {e}") from None
            samples.append(sample)
            frames.append(now)
        batch = trim_text_padding(samples[0] if len(samples) == 1 else
                                  {k: torch.cat([b[k] for b in samples]) for k in samples[0]})
        subtasks, chunks, env_state = self._sample_batch(batch, sessions, prefix_actions, prefix_weights)
        outs = []
        for i, session in enumerate(sessions):
            if session.frames:
                session.frames.append(frames[i])
            else:
                session.frames.extend([frames[i]] * self.history)
            outs.append(self._native(chunks[i], session))
            if subtasks is not None:
                outs[-1]["subtask"] = subtasks[i]
            if env_state is not None:
                outs[-1]["env_state"] = env_state[i]
        return outs

    @torch.inference_mode()
    def _sample_batch(self, batch: dict[str, torch.Tensor], sessions: Sequence[PolicySession],
                      prefix_actions: torch.Tensor | None = None,
                      prefix_weights: torch.Tensor | None = None
                      ) -> tuple[list[str] | None, torch.Tensor, np.ndarray | None]:
        """(subtasks or None, unified action chunks [B, H, A], the localizer's estimates [B, E] in the data's units
        or None); prefix_* are inpainted (unified, normalized)."""
        cfg = self.model.config
        dev = self.device
        batch = {k: v.to(dev) for k, v in batch.items()}
        if prefix_actions is not None and prefix_weights is not None:
            prefix_actions, prefix_weights = prefix_actions.to(dev), prefix_weights.to(dev)
        subtasks = None
        if cfg.subtask and len(self.vocab.words):
            drafts = [s.subtask_ids for s in sessions]
            draft = torch.cat(drafts) if all(d is not None for d in drafts) else None
            ids, cache = self.engine.reason(batch, draft=draft)
            subtasks = [self.vocab.decode(row.tolist()) for row in ids]
            for session, row in zip(sessions, ids, strict=True):
                session.subtask_ids = row[None].clone()
        else:
            cache = self.engine.encode_prefix(batch)
        if self._latch is not None:  # an episode's first chunk: hold what the localizer read
            for i, session in enumerate(sessions):
                if session.latched is None:
                    session.latched = self._latch.hold(cache.env_state[i].float().cpu().numpy())
        noise = None
        if cfg.action_head == "flow":
            noise = torch.cat([torch.randn((1, cfg.horizon, cfg.action_dim), generator=s.generator) for s in sessions])
            noise = (noise * self.noise_scale).to(dev)  # drawn on the host: the same seed, the same chunk anywhere
        actions = self.engine.sample_actions(steps=self.flow_steps, noise=noise, cache=cache,
                                             prefix_actions=prefix_actions, prefix_weights=prefix_weights)
        return subtasks, actions.cpu(), self._env_state_native(cache.env_state)

    def _env_state_native(self, estimate: torch.Tensor | None) -> np.ndarray | None:
        """The environment-state head's normalized estimate (B, E) in the data's units (float32), where the model
        has the head and the checkpoint its statistics and names."""
        if estimate is None or self._env_units is None or estimate.shape[-1] != len(self.env_state_names):
            return None
        std, mean = self._env_units
        return (estimate.float().cpu().numpy() * std + mean).astype(np.float32)

    def _native(self, unified: torch.Tensor, session: PolicySession) -> dict[str, Any]:
        """A unified chunk [H, A] -> {"actions": [H, D] native, clamped} (or the held last safe action)."""
        native = self.action_map.from_unified(unified.float().numpy())  # numpy, as the state (see `_batch`)
        native = self.action_norm.unnormalize({"action": native})["action"].astype(np.float64)
        if not np.all(np.isfinite(native)):
            return {"actions": np.repeat(session.last_safe[None], len(native), axis=0),
                    "unsafe": "the model produced a non-finite action; holding the last safe action"}
        native = np.clip(native, self.lower, self.upper)
        session.last_safe = native[-1]
        return {"actions": native}
