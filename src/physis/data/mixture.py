"""Mixtures of datasets of different robots and frame rates, sampled by weight, in the unified space.

    mix = DatasetMixture([
        MixtureSource("data/sawyer", load_embodiment("metaworld_sawyer"), weight=2.0),
        MixtureSource("data/fetch", load_embodiment("fetch")),
    ], history=2, chunk=16, image_size=(96, 96))
    loader = DataLoader(mix, batch_size=32, sampler=mix.sampler(num_samples=10_000))

Every sample carries its embodiment, the state and the action chunk in the unified space with their
masks, and the cameras stacked as (N_cam, T, C, H, W) with a camera mask. Windows are counted in each
dataset's own frames (a 16-step chunk is 16 steps at 80 fps and at 10 fps alike). Each source is
normalized with its own stats before it is mapped into the unified space. Where any source records
observation.environment_state (privileged object and goal positions, a training target only), every sample
carries it zero-padded to the widest source's width, with a mask (all False for sources without one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from physis.data.layout import DatasetFormatError
from physis.data.reader import LeRobotDataset
from physis.data.relative import ENV_STATE, add_relative_env_state
from physis.data.stats import Normalizer
from physis.data.windows import steps_to_seconds
from physis.embodiment import EmbodimentSpec, UnifiedSpace


@dataclass
class MixtureSource:
    root: str | Path
    embodiment: EmbodimentSpec
    weight: float = 1.0
    state_key: str = "observation.state"
    action_key: str = "action"
    cameras: Sequence[str] | None = None  # camera keys in slot order; default: the dataset's, sorted
    normalize: Mapping[str, str] = field(default_factory=dict)  # feature -> Normalizer mode
    # append the environment state's positions relative to the robot's (`relative.add_relative_env_state`)
    env_state_relative: bool = False
    # and those positions on the near-field scale tanh(relative / near) (m; 0: off; needs env_state_relative)
    env_state_near: float = 0.0


class DatasetMixture(torch.utils.data.Dataset):
    def __init__(self, sources: Sequence[MixtureSource], history: int = 1, chunk: int = 16,
                 image_size: tuple[int, int] = (96, 96), num_cameras: int | None = None,
                 space: UnifiedSpace | None = None, future_offset: int | None = None, **dataset_kwargs: Any):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if (weights <= 0).any() or not np.isfinite(weights).all():
            raise ValueError(f"source weights must be positive and finite, got {weights.tolist()}")
        self.sources = list(sources)
        self.history = history
        self.future_offset = future_offset  # also return the frame this many steps ahead (world-model target)
        self.space = UnifiedSpace.for_specs([s.embodiment for s in sources], base=space)
        self.image_size = tuple(image_size)
        self.embodiments = [s.embodiment.name for s in sources]
        self.datasets: list[LeRobotDataset] = []
        self.cameras: list[list[str]] = []
        self._maps, self._normalizers = [], []
        for s in sources:
            self.datasets.append(self._open(s, history, chunk, dataset_kwargs))
        self.num_cameras = num_cameras if num_cameras is not None else max(len(c) for c in self.cameras)
        widths = [d.features.get(ENV_STATE, {}).get("shape", [0])[0] for d in self.datasets]
        self._env_state_width = widths
        self.env_state_dim = max(widths)
        self.weights = weights / weights.sum()
        self._offsets = np.cumsum([0] + [len(d) for d in self.datasets])

    def _open(self, s: MixtureSource, history: int, chunk: int, kwargs: dict[str, Any]) -> LeRobotDataset:
        probe = self._read(s, kwargs)
        cams = list(s.cameras) if s.cameras is not None else sorted(probe.video_keys)
        missing = [c for c in cams if c not in probe.video_keys]
        if missing:
            raise DatasetFormatError(f"{s.root}: cameras {missing} are not in the dataset; it has {probe.video_keys}")
        for key, dim in ((s.state_key, s.embodiment.state_dim), (s.action_key, s.embodiment.action_dim)):
            shape = probe.features.get(key, {}).get("shape")
            if shape != [dim]:
                raise ValueError(f"{s.root}: feature '{key}' has shape {shape}, embodiment "
                                 f"'{s.embodiment.name}' expects [{dim}]")
        fps = probe.fps
        deltas = {s.action_key: steps_to_seconds(range(chunk), fps),
                  s.state_key: steps_to_seconds(range(1 - history, 1), fps)}
        frames = list(range(1 - history, 1)) + ([self.future_offset] if self.future_offset is not None else [])
        deltas.update({c: steps_to_seconds(frames, fps) for c in cams})
        self.cameras.append(cams)
        self._maps.append((self.space.state_map(s.embodiment), self.space.action_map(s.embodiment)))
        # the environment state is optional (a training target some datasets record); any other feature is not
        modes = {k: m for k, m in s.normalize.items() if k != ENV_STATE or k in probe.features}
        self._normalizers.append(Normalizer(probe.stats, modes) if modes else None)
        return self._read(s, {"delta_timestamps": deltas, **kwargs})

    @staticmethod
    def _read(s: MixtureSource, kwargs: dict[str, Any]) -> LeRobotDataset:
        ds = LeRobotDataset(s.root, **kwargs)
        if s.env_state_relative:
            add_relative_env_state(ds, s.embodiment, ENV_STATE, s.state_key, near=s.env_state_near)
        return ds

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def use_normalizer(self, source: int, normalizer: Normalizer) -> None:
        """Normalize one source with given statistics (a checkpoint's) instead of the dataset's own."""
        self._normalizers[source] = normalizer

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample index -> (source, frame index in that source)."""
        src = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return src, i - int(self._offsets[src])

    def __getitem__(self, i: int) -> dict[str, Any]:
        src, j = self.locate(int(i))
        s, ds = self.sources[src], self.datasets[src]
        sample = ds[j]
        if self._normalizers[src] is not None:
            sample = self._normalizers[src](sample)
        state_map, action_map = self._maps[src]
        out: dict[str, Any] = {
            "embodiment": s.embodiment.name,
            "embodiment_index": torch.tensor(src),
            "observation.state": state_map.to_unified(sample[s.state_key].float()),
            "state_mask": torch.from_numpy(state_map.mask),
            "state_is_pad": sample[f"{s.state_key}_is_pad"],
            "action": action_map.to_unified(sample[s.action_key].float()),
            "action_mask": torch.from_numpy(action_map.mask),
            "action_is_pad": sample[f"{s.action_key}_is_pad"],
            "task": sample["task"],
            "subtask": sample.get("subtask", ""),
        }
        images, out["image_mask"] = self._stack_cameras(sample, self.cameras[src])
        if self.future_offset is not None:  # the last frame of each camera is the future one
            out["future.images"] = images[:, -1]
            cams = self.cameras[src]
            out["future_is_pad"] = sample[f"{cams[0]}_is_pad"][-1] if cams else torch.tensor(True)
            images = images[:, :-1]
        out["observation.images"] = images
        if self.env_state_dim:
            width = self._env_state_width[src]
            env = torch.zeros(self.env_state_dim)
            if width:
                env[:width] = sample[ENV_STATE].float()
            out[ENV_STATE] = env
            out["env_state_mask"] = torch.arange(self.env_state_dim) < width
        out["frame_index"] = sample["frame_index"]
        out["sample_index"] = torch.tensor(int(i))  # the row in the mixture, for per-row lookups by the trainer
        out["episode_length"] = torch.tensor(ds.episode_of(j).length)
        return out

    def _stack_cameras(self, sample: dict[str, Any], cams: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N_cam, T, C, H, W) at the mixture's image size, zeros for cameras this robot lacks."""
        frames = []
        for key in cams[: self.num_cameras]:
            x = sample[key].float()  # (T, C, H, W)
            if tuple(x.shape[-2:]) != self.image_size:
                x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
            frames.append(x)
        t = frames[0].shape[0] if frames else 1
        while len(frames) < self.num_cameras:
            frames.append(torch.zeros(t, 3, *self.image_size))
        mask = torch.zeros(self.num_cameras, dtype=torch.bool)
        mask[: min(len(cams), self.num_cameras)] = True
        return torch.stack(frames), mask

    def sampler(self, num_samples: int, generator: torch.Generator | None = None) -> torch.utils.data.Sampler:
        """Draws sources by weight (then frames uniformly within a source), with replacement."""
        lengths = np.diff(self._offsets)
        per_frame = np.repeat(self.weights / lengths, lengths)
        return torch.utils.data.WeightedRandomSampler(torch.from_numpy(per_frame), num_samples, True, generator)
