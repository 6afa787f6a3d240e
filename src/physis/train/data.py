"""LeRobot datasets -> training batches in the model's format (see `model/` for the keys).

Each dataset is read through `DatasetMixture` (unified space, masks, per-dataset normalization, the
future frame for the world model); this module adds what the model needs on top: the instruction's
frozen token embeddings, subtask token ids, task progress, and embodiment indices. Batches are a pure
function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from physis.data.layout import DatasetFormatError, read_collection_meta, read_json
from physis.data.mixture import ENV_STATE, DatasetMixture, MixtureSource
from physis.data.stats import Normalizer, merge_stats, stats_from_json, stats_to_json
from physis.embodiment import EmbodimentSpec, UnifiedSpace, builtin_names, load_embodiment
from physis.model.text import trim_text_padding
from physis.train.augment import random_shift
from physis.train.teacher_noise import TeacherNoise

OBJECT_PREFIX = "object_"  # the environment-state values of the object a task moves (object_x, object_x-robot, ...)

EMBODIMENT_META = "embodiment.json"  # written by `physis collect` beside info.json


@dataclass
class DataConfig:
    horizon: int = 16  # action chunk length, in the dataset's own steps
    history: int = 1  # image/state frames per sample
    image_size: int = 96
    future_offset: int | None = None  # world-model target frame, steps ahead of the current one; None: horizon
    num_cameras: int | None = None  # None: the most any dataset has
    state_norm: str = "mean_std"
    action_norm: str = "quantile"
    max_subtask_tokens: int = 12
    cameras: tuple[str, ...] = ()  # camera names in slot order (e.g. "front"); empty: each dataset's, sorted
    # extend the environment-state target with its positions minus the robot's (`data.relative`)
    env_state_relative: bool = False
    env_state_near: float = 0.0  # and the relative positions as tanh(relative / near), near in m (0: off)

    @property
    def future(self) -> int:
        return self.future_offset if self.future_offset is not None else self.horizon


def embodiment_for(root: str | Path, override: str | Path | None = None) -> EmbodimentSpec:
    """The dataset's robot: an explicit spec, else meta/embodiment.json, else a built-in named by robot_type."""
    root = Path(root)
    if override is not None:
        return load_embodiment(override)
    meta = root / "meta" / EMBODIMENT_META
    if meta.is_file():
        return EmbodimentSpec.from_dict(json.loads(meta.read_text()), source=str(meta))
    robot = read_json(root / "meta" / "info.json").get("robot_type")
    if robot in builtin_names():
        return load_embodiment(robot)
    raise DatasetFormatError(f"{root}: cannot tell which robot recorded it (robot_type {robot!r} is not a built-in "
                             f"embodiment and there is no meta/{EMBODIMENT_META}); pass an embodiment spec for it")


def _progress_unknown(root: str | Path) -> bool:
    """Whether frame / length is not the progress of this dataset's episodes: `physis collect --max-frames`
    recorded only their openings, or a policy drove them (`--driver`), so they may end in failure."""
    config = (read_collection_meta(root) or {}).get("config") or {}
    return bool(config.get("max_frames") or config.get("driver"))


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch `s` is drawn from a generator seeded by (seed, s): sources by weight, frames uniformly.

    first_frames_weight w != 1 draws each episode's first `first_frames` frames w times as often as the rest.
    """

    def __init__(self, mixture: DatasetMixture, batch_size: int, seed: int, start_step: int, steps: int,
                 first_frames: int = 8, first_frames_weight: float = 1.0):
        self.batch_size, self.seed, self.start, self.stop = batch_size, seed, start_step, steps
        self._offsets = np.cumsum([0] + [len(d) for d in mixture.datasets])
        self._weights = mixture.weights
        self._cumulative: list[np.ndarray] | None = None
        if first_frames_weight != 1.0:
            self._cumulative = [np.cumsum(np.where(np.asarray(d.columns["frame_index"]) < first_frames,
                                                   first_frames_weight, 1.0)) for d in mixture.datasets]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        lengths = np.diff(self._offsets)
        for step in range(self.start, self.stop):
            rng = np.random.default_rng([self.seed, step])
            src = rng.choice(len(lengths), size=self.batch_size, p=self._weights)
            u = rng.random(self.batch_size)
            if self._cumulative is None:
                frames = (u * lengths[src]).astype(np.int64)
            else:  # inverse CDF of the per-frame weights
                frames = np.array([np.searchsorted(self._cumulative[s], x * self._cumulative[s][-1], side="right")
                                   for s, x in zip(src, u, strict=True)], dtype=np.int64)
            yield (self._offsets[src] + frames).tolist()


class TrainingData:
    """Datasets of one or more robots as a source of model batches."""

    def __init__(self, roots: Sequence[str | Path], cfg: DataConfig | None = None,
                 embodiments: Sequence[str | Path | None] | None = None, weights: Sequence[float] | None = None,
                 space: UnifiedSpace | None = None, vocab: Any = None, text_encoder: Any = None,
                 stats: dict[str, Any] | None = None):
        """`stats` (a checkpoint's, per robot name) replaces the datasets' own normalization statistics."""
        from physis.model.text import TextEncoder
        from physis.model.vocab import SubtaskVocab

        if not roots:
            raise ValueError("training needs at least one dataset")
        self.cfg = cfg or DataConfig()
        overrides = list(embodiments) if embodiments is not None else [None] * len(roots)
        specs = [embodiment_for(r, o) for r, o in zip(roots, overrides, strict=True)]
        norm = {"observation.state": self.cfg.state_norm, "action": self.cfg.action_norm, ENV_STATE: "mean_std"}
        cams = [f"observation.images.{c}" for c in self.cfg.cameras] or None
        sources = [MixtureSource(r, s, weight=w, cameras=cams, normalize=norm,
                                 env_state_relative=self.cfg.env_state_relative, env_state_near=self.cfg.env_state_near)
                   for r, s, w in zip(roots, specs, weights or [1.0] * len(roots), strict=True)]
        self.mixture = DatasetMixture(sources, history=self.cfg.history, chunk=self.cfg.horizon,
                                      image_size=(self.cfg.image_size, self.cfg.image_size),
                                      num_cameras=self.cfg.num_cameras, space=space, future_offset=self.cfg.future)
        self.space = self.mixture.space
        names = list(dict.fromkeys(s.name for s in specs))  # one index per distinct robot
        self.embodiments = [next(s for s in specs if s.name == n) for n in names]
        self._embodiment_of_source = torch.tensor([names.index(s.name) for s in specs])
        # Episodes recorded only up to a frame limit (`physis collect --max-frames`) end before the task does,
        # and a driving policy's may end in failure: frame / length is not their progress.
        self._progress_known = torch.tensor([not _progress_unknown(r) for r in roots])
        labels = [t for d in self.mixture.datasets for t in d.subtasks or ()]  # datasets without subtasks add none
        self.vocab = vocab if vocab is not None else SubtaskVocab.from_labels(labels)
        self.text = text_encoder if text_encoder is not None else TextEncoder()
        if stats is not None:
            for i, s in enumerate(sources):
                if s.embodiment.name not in stats:
                    raise DatasetFormatError(f"no normalization stats for robot {s.embodiment.name!r} ({s.root})")
                own = stats[s.embodiment.name]
                arrays = stats_from_json(own["stats"])
                # A checkpoint without environment-state stats still normalizes state and actions: that
                # target is only read by a head such a checkpoint does not have.
                modes = {k: m for k, m in own["modes"].items()
                         if k in arrays and k in self.mixture.datasets[i].features}
                self.mixture.use_normalizer(i, Normalizer(arrays, modes))
        self.stats = stats if stats is not None else self._pooled_stats(sources, norm)

    def _pooled_stats(self, sources: Sequence[MixtureSource], norm: dict[str, str]) -> dict[str, Any]:
        """One set of normalization statistics per robot. Datasets of the same robot are pooled and all normalized
        with the pooled statistics: the checkpoint keeps one set per robot, the one the policy un-normalizes with."""
        out: dict[str, Any] = {}
        for name in dict.fromkeys(s.embodiment.name for s in sources):
            members = [i for i, s in enumerate(sources) if s.embodiment.name == name]
            datasets = [self.mixture.datasets[i] for i in members]
            pooled = {}
            for key in norm:
                parts = [{"count": np.array([len(d)]), **d.stats[key]} for d in datasets  # count: frames if unstated
                         if key in d.stats and key in d.features]
                if parts:
                    pooled[key] = parts[0] if len(parts) == 1 else merge_stats(parts)
            modes = {k: m for k, m in norm.items() if k in pooled}
            if len(members) > 1:
                for i, d in zip(members, datasets, strict=True):
                    self.mixture.use_normalizer(i, Normalizer(pooled, {k: m for k, m in modes.items()
                                                                       if k in d.features}))
            out[name] = {"modes": modes, "stats": stats_to_json(pooled)}
        return out

    @property
    def num_cameras(self) -> int:
        return self.mixture.num_cameras

    @property
    def env_state_dim(self) -> int:
        """Width of observation.environment_state (the widest source's), 0 where no dataset records it."""
        return self.mixture.env_state_dim

    def meta(self) -> dict[str, Any]:
        """What a checkpoint must carry to rebuild inputs and outputs: robots, space, cameras, stats, vocab."""
        return {
            "data": asdict(self.cfg),
            "embodiments": [s.to_dict() for s in self.embodiments],
            "space": self.space.to_dict(),
            "cameras": {s.embodiment.name: [k.removeprefix("observation.images.") for k in cams]
                        for s, cams in zip(self.mixture.sources, self.mixture.cameras, strict=True)},
            "num_cameras": self.num_cameras,
            "stats": self.stats,
        }

    @property
    def env_state_names(self) -> list[str]:
        """The names of observation.environment_state's values (the widest source's), [] where none records it."""
        for ds in self.mixture.datasets:
            feature = ds.features.get(ENV_STATE)
            if feature and feature["shape"][0] == self.env_state_dim:
                return list(feature.get("names") or [str(i) for i in range(self.env_state_dim)])
        return []

    def batches(self, batch_size: int, seed: int, steps: int, start_step: int = 0, num_workers: int = 0,
                image_shift: int = 0, first_frames: int = 8, first_frames_weight: float = 1.0,
                env_state_first_frames: bool = False, env_state_at_rest: float = 0.0,
                teacher_noise: float = 0.0) -> Iterator[dict[str, torch.Tensor]]:
        """Model batches for steps start_step .. steps-1, each a pure function of (seed, step).

        image_shift > 0 shifts every camera image by up to that many pixels (`augment.random_shift`).
        first_frames_weight draws each episode's first `first_frames` frames that many times as often as later ones.
        env_state_first_frames keeps the environment-state target on those first frames only.
        env_state_at_rest > 0 keeps the object's environment-state targets (`object_*`) on the frames where the
        object lies within that many metres of where its episode began (`object_at_rest`).
        teacher_noise > 0 adds "env_state_teacher": the environment state with its positions displaced by that
        standard deviation (m; `physis.train.teacher_noise`), for the localizer teacher to feed.
        """
        noise = self.teacher_noise(teacher_noise) if teacher_noise else None
        if env_state_at_rest:
            at_rest = torch.from_numpy(self.object_at_rest(env_state_at_rest))
            object_values = torch.zeros(self.env_state_dim, dtype=torch.bool)
            object_values[: len(self.env_state_names)] = torch.tensor(
                [n.startswith(OBJECT_PREFIX) for n in self.env_state_names])
        sampler = StepBatchSampler(self.mixture, batch_size, seed, start_step, steps, first_frames,
                                   first_frames_weight)
        loader = torch.utils.data.DataLoader(self.mixture, batch_sampler=sampler, num_workers=num_workers,
                                             persistent_workers=num_workers > 0)
        for step, raw in enumerate(loader, start=start_step):
            batch = self.to_model_batch(raw)
            if env_state_first_frames and "env_state_mask" in batch:
                batch["env_state_mask"] = batch["env_state_mask"] & (raw["frame_index"] < first_frames)[:, None]
            if env_state_at_rest and "env_state_mask" in batch:
                moved = ~at_rest[raw["sample_index"]]
                batch["env_state_mask"] = batch["env_state_mask"] & ~(moved[:, None] & object_values)
            if image_shift:
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
                batch["images"], batch["future_images"] = random_shift(
                    batch["images"], batch["future_images"], image_shift, gen)
            if noise is not None and "env_state" in batch:
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0]))
                batch["env_state_teacher"] = noise(batch["env_state"], gen)
            yield batch

    def object_at_rest(self, radius: float) -> np.ndarray:
        """Per mixture row: whether the object (environment-state values object_x, object_y, object_z) lies within
        `radius` m of its position at its episode's first frame. Once pushed or carried the object sits at the
        hand, so there the hand's position answers for it; a localizer trained on those frames learns that, and
        its estimate of an object still at rest is pulled toward the hand. Rows of datasets without those
        values are True (their target is masked anyway)."""
        if not (radius > 0 and np.isfinite(radius)):
            raise ValueError(f"the at-rest radius must be a positive distance in m, got {radius}")
        parts = []
        for ds in self.mixture.datasets:
            names = list((ds.features.get(ENV_STATE) or {}).get("names") or [])
            axes = [f"{OBJECT_PREFIX}{a}" for a in "xyz"]
            if not all(a in names for a in axes):
                parts.append(np.ones(len(ds), dtype=bool))
                continue
            pos = np.asarray(ds.columns[ENV_STATE], dtype=np.float64)[:, [names.index(a) for a in axes]]
            episode = np.asarray(ds.columns["episode_index"])
            starts = np.flatnonzero(np.asarray(ds.columns["frame_index"]) == 0)
            first = dict(zip(episode[starts].tolist(), starts.tolist(), strict=True))
            if set(first) != set(episode.tolist()):
                raise DatasetFormatError(f"{ds.root}: an episode without its first frame; cannot tell where its "
                                         f"object started")
            origin = pos[[first[e] for e in episode.tolist()]]
            parts.append(np.linalg.norm(pos - origin, axis=-1) <= radius)
        return np.concatenate(parts)

    def teacher_noise(self, sigma: float) -> TeacherNoise:
        """The displacement of the teacher's positions by `sigma` m, on the datasets' one robot's statistics."""
        if len(self.embodiments) != 1:
            raise ValueError(f"teacher noise reads one robot's environment-state statistics; these datasets have "
                             f"{len(self.embodiments)} robots ({[e.name for e in self.embodiments]})")
        names = self.env_state_names
        stats = stats_from_json(self.stats[self.embodiments[0].name]["stats"]).get(ENV_STATE)
        if not names or stats is None or len(stats["mean"]) != len(names):
            raise ValueError("teacher noise needs datasets with a named environment state and its statistics")
        return TeacherNoise(names, stats["mean"], stats["std"], sigma, near=self.cfg.env_state_near)

    def to_model_batch(self, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = raw["observation.state"]
        state = state[:, -1] if state.ndim == 3 else state  # the current frame of the history window
        text, text_mask = self.text.encode_batch(list(raw["task"]))
        subtasks = list(raw["subtask"])
        tokens = torch.tensor([self.vocab.encode(s, self.cfg.max_subtask_tokens) for s in subtasks], dtype=torch.long)
        length = raw["episode_length"].float()
        extra: dict[str, torch.Tensor] = {}
        if ENV_STATE in raw:
            # Clamped: a coordinate that barely moves in the data (a resting object's height) has a tiny std,
            # and one outlier would otherwise dominate the loss.
            extra = {"env_state": raw[ENV_STATE].clamp(-5.0, 5.0), "env_state_mask": raw["env_state_mask"]}
        return trim_text_padding({**extra,
            "images": raw["observation.images"],
            "image_mask": raw["image_mask"],
            "state": state * raw["state_mask"],
            "state_mask": raw["state_mask"],
            "text": text,
            "text_mask": text_mask,
            "embodiment": self._embodiment_of_source[raw["embodiment_index"]],
            "actions": raw["action"] * raw["action_mask"][:, None, :],
            "action_mask": raw["action_mask"],
            "action_is_pad": raw["action_is_pad"],
            "subtask_tokens": tokens,
            "subtask_valid": torch.tensor([bool(s) for s in subtasks]),
            "future_images": raw["future.images"],
            "future_valid": ~raw["future_is_pad"],
            "progress": raw["frame_index"].float() / (length - 1).clamp(min=1),
            "progress_valid": self._progress_known[raw["embodiment_index"]],
        })
