"""`Policy`: a trained checkpoint behind `reset()` / `infer(obs)`, in the robot's native action space.

An observation is the simulation suites' format (`{"images": {cam: uint8 HxWx3}, "state": {group: array},
"instruction": str}`). `infer` normalizes the state with the checkpoint's statistics, maps it into the
unified space, encodes the prefix once, generates the subtask (when the model has that head), samples
an action chunk with K flow steps, and maps it back: un-normalized, native order, clamped to the
embodiment's limits. A chunk with a NaN is never returned: the last safe action is held instead and the
output says so.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from physis.data.stats import Normalizer, stats_from_json
from physis.embodiment import EmbodimentSpec, UnifiedSpace


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the robot or observation it is asked to serve."""


class Policy:
    def __init__(self, model: Any, meta: dict[str, Any], stats: dict[str, Any], embodiment: str | None = None,
                 flow_steps: int | None = None, text_encoder: Any = None, seed: int = 0):
        """`meta` is a checkpoint's config.json (robots, unified space, cameras, data layout); `stats` its
        stats.json (normalization per robot)."""
        from physis.model.text import TextEncoder
        from physis.model.vocab import SubtaskVocab

        self.model = model.eval()
        self.meta = meta
        specs = [EmbodimentSpec.from_dict(d, source="checkpoint") for d in meta["embodiments"]]
        names = [s.name for s in specs]
        if embodiment is None:
            if len(specs) != 1:
                raise CheckpointMismatchError(f"this checkpoint serves several robots ({', '.join(names)}); name one")
            embodiment = names[0]
        if embodiment not in names:
            raise CheckpointMismatchError(f"the checkpoint was trained for {', '.join(names)}, not {embodiment!r}")
        self.spec = specs[names.index(embodiment)]
        self.embodiment_index = names.index(embodiment)
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
        self.flow_steps = flow_steps
        self.text = text_encoder if text_encoder is not None else TextEncoder()
        self.vocab = SubtaskVocab(meta.get("subtask_vocab") or [])
        self.lower, self.upper = self.spec.action_limits()
        self._generator = torch.Generator().manual_seed(seed)
        self._frames: deque[torch.Tensor] = deque(maxlen=self.history)
        self._last_safe = np.clip(np.zeros(self.spec.action_dim), self.lower, self.upper)

    @classmethod
    def from_checkpoint(cls, path: str | Path, embodiment: str | None = None, **kwargs: Any) -> Policy:
        from physis.model.config import ModelConfig
        from physis.model.physis_model import PhysisModel
        from physis.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(Path(path), training_state=False)  # weights only, never unpickled
        model = PhysisModel(ModelConfig.from_dict(ckpt.config["model"]))
        model.load_state_dict(ckpt.ema_state or ckpt.model_state)
        return cls(model, ckpt.config, ckpt.stats or {}, embodiment=embodiment, **kwargs)

    def reset(self) -> None:
        self._frames.clear()

    # ------------------------------------------------------------------ observation -> batch
    def _batch(self, obs: dict[str, Any]) -> dict[str, torch.Tensor]:
        missing = [c for c in self.cameras if c not in obs.get("images", {})]
        if missing:
            raise CheckpointMismatchError(f"observation lacks cameras {missing}; the checkpoint reads {self.cameras}")
        frames = []
        for cam in self.cameras[: self.num_cameras]:
            img = torch.from_numpy(np.ascontiguousarray(obs["images"][cam])).permute(2, 0, 1).float() / 255.0
            if tuple(img.shape[-2:]) != (self.image_size, self.image_size):
                img = F.interpolate(img[None], size=(self.image_size, self.image_size), mode="bilinear",
                                    antialias=True, align_corners=False)[0]
            frames.append(img)
        while len(frames) < self.num_cameras:
            frames.append(torch.zeros(3, self.image_size, self.image_size))
        now = torch.stack(frames)  # [C, 3, h, w]
        if not self._frames:
            self._frames.extend([now] * self.history)  # the first frames repeat, as padding does in training
        else:
            self._frames.append(now)
        images = torch.stack(list(self._frames), dim=1)[None]  # [1, C, T, 3, h, w]
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
        state_t = self.state_norm({"observation.state": torch.from_numpy(state)})["observation.state"]
        mask = torch.from_numpy(self.state_map.mask)
        text, text_mask = self.text.encode(obs.get("instruction", ""))
        return {
            "images": images, "image_mask": image_mask,
            "state": (self.state_map.to_unified(state_t.float()) * mask)[None], "state_mask": mask[None],
            "text": torch.as_tensor(text)[None], "text_mask": torch.as_tensor(text_mask)[None],
            "embodiment": torch.tensor([self.embodiment_index]),
            "action_mask": torch.from_numpy(self.action_map.mask)[None],  # the body's DoF, for sampling
        }

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        batch = self._batch(obs)
        out: dict[str, Any] = {}
        cache = self.model.encode_prefix(batch)
        if self.model.config.subtask and len(self.vocab.words):
            ids, cache = self.model.generate_subtask(cache)
            out["subtask"] = self.vocab.decode(ids[0].tolist())
        unified = self.model.sample_actions(batch, steps=self.flow_steps, generator=self._generator, cache=cache)[0]
        native = self.action_map.from_unified(unified.float())
        native = self.action_norm.unnormalize({"action": native})["action"].numpy().astype(np.float64)
        if not np.all(np.isfinite(native)):
            out["actions"] = np.repeat(self._last_safe[None], len(native), axis=0)
            out["unsafe"] = "the model produced a non-finite action; holding the last safe action"
            return out
        native = np.clip(native, self.lower, self.upper)
        self._last_safe = native[-1]
        out["actions"] = native
        return out
