"""ModelConfig: every size and switch of PhysisModel, JSON round-trippable, with named presets.

A checkpoint stores `config.to_dict()`; `ModelConfig.from_dict` rebuilds the same model. Presets are data
(`PRESETS`), overridable field by field: `ModelConfig.preset("small", action_dim=63, state_dim=63)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ActionHead = Literal["flow", "mse"]


@dataclass(frozen=True)
class ModelConfig:
    preset_name: str = "small"  # the preset this config started from (ModelConfig.preset)
    # trunk (serves prefix + subtask tokens)
    width: int = 192
    depth: int = 4
    heads: int = 6
    mlp_ratio: float = 4.0
    # action expert (serves action + future tokens), same heads/head dim as the trunk; by default one expert
    # layer per trunk layer (layer l reads trunk layer l's keys/values); expert_depth < depth gives fewer
    # layers, which read evenly spaced trunk layers ending with the last (`expert_reads`): less work per flow step
    expert_width: int = 128
    expert_mlp_ratio: float = 4.0
    expert_depth: int | None = None  # None: depth
    # image tokenizer
    image_size: int = 96
    patch_size: int = 12
    stem_channels: int = 32
    stem_blocks: int = 0  # residual 3x3 conv blocks after the stride-2 stem, at half the image's resolution
    keypoints: int = 0  # spatial-softmax keypoints of the stem's maps per image, one extra token each image
    # world-model latent: the patch grid pooled to latent_grid x latent_grid, latent_dim per cell
    latent_grid: int = 4
    latent_dim: int = 16
    decoder_channels: int = 64
    # data layout
    action_dim: int = 63
    state_dim: int = 63
    horizon: int = 16
    cameras: int = 1
    history: int = 1
    num_embodiments: int = 1
    text_dim: int = 384
    max_text_tokens: int = 32
    # heads
    action_head: ActionHead = "flow"
    world_model: bool = True
    # the world-model and reconstruction losses on this fraction of each batch (its first rows; batches are
    # shuffled): they encode a future frame and decode a 96x96 one per sample, which at 1.0 costs a CPU step
    # about 28% of its samples/s
    world_model_fraction: float = 1.0
    subtask: bool = True
    progress: bool = True
    progress_loss: Literal["bce", "mse"] = "bce"
    # auxiliary head: regress the privileged environment state (object and goal positions, recorded by collect)
    # from a learned query token at the end of the prefix, so the image encoder must localize them and the
    # action expert can read them there; a training target only, never an input. 0: off
    env_state_dim: int = 0
    # estimate the environment state before the trunk, by an MLP over the image keypoints and the pooled
    # instruction, and feed that estimate in as the query token: a short path from the pixels' keypoints to
    # the positions, which the route through the trunk's attention did not learn (needs keypoints, env_state_dim)
    localizer: bool = False
    # project the localizer's estimate into the query token together with the robot's state, so that one linear
    # map can form the object-minus-hand displacement that precise reaching needs (the estimate itself still
    # never reads the state; needs localizer)
    localizer_state: bool = False
    # in training, feed this fraction of the rows' query tokens the true environment state instead of the
    # localizer's estimate (the loss still trains the estimate). Where the hand's path already tells the goal,
    # an action expert trained on estimates learns to ignore the token; on the truth it learns to follow it,
    # and then follows the estimate at inference (needs localizer)
    localizer_teacher: float = 0.0
    # camera slots that give the trunk no patch tokens, only their keypoint token (and the localizer its
    # keypoints): a view that resolves positions costs a few tokens instead of a patch grid (needs keypoints)
    keypoint_only_cameras: tuple[int, ...] = ()
    subtask_vocab: tuple[str, ...] = field(default_factory=tuple)
    max_subtask_tokens: int = 12
    future_offset: int | None = None  # None: horizon (the frame just after the chunk)
    flow_steps: int = 10
    # loss weights
    action_weight: float = 1.0
    world_model_weight: float = 0.5
    recon_weight: float = 0.5
    subtask_weight: float = 0.1
    progress_weight: float = 0.5
    env_state_weight: float = 1.0
    # optional Hugging Face backbone for prefix tokens: "hf:/local/dir"
    backbone: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "subtask_vocab", tuple(self.subtask_vocab))
        object.__setattr__(self, "keypoint_only_cameras", tuple(int(i) for i in self.keypoint_only_cameras))
        if self.future_offset is None:
            object.__setattr__(self, "future_offset", self.horizon)
        if self.action_head not in ("flow", "mse"):
            raise ValueError(f"ModelConfig.action_head: expected 'flow' or 'mse', found {self.action_head!r}")
        if self.progress_loss not in ("bce", "mse"):
            raise ValueError(f"ModelConfig.progress_loss: expected 'bce' or 'mse', found {self.progress_loss!r}")
        if self.width % self.heads:
            raise ValueError(f"ModelConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.patch_size % 2 or self.image_size % self.patch_size:
            raise ValueError(
                f"ModelConfig: patch_size {self.patch_size} must be even and divide image_size {self.image_size}"
            )
        if self.image_size % 8:
            raise ValueError(f"ModelConfig: image_size {self.image_size} must be a multiple of 8 (decoder)")
        if self.latent_grid > self.image_size // self.patch_size:
            raise ValueError(f"ModelConfig: latent_grid {self.latent_grid} exceeds the patch grid {self.patch_grid}")
        if self.env_state_dim < 0:
            raise ValueError(f"ModelConfig.env_state_dim must be >= 0, found {self.env_state_dim}")
        if self.stem_blocks < 0 or self.keypoints < 0:
            raise ValueError(
                f"ModelConfig: stem_blocks and keypoints must be >= 0, found {self.stem_blocks}, {self.keypoints}"
            )
        if self.localizer and not (self.keypoints and self.env_state_dim):
            raise ValueError(
                f"ModelConfig.localizer needs keypoints > 0 and env_state_dim > 0, found {self.keypoints}, "
                f"{self.env_state_dim}"
            )
        if self.keypoint_only_cameras:
            slots = self.keypoint_only_cameras
            if not self.keypoints:
                raise ValueError("ModelConfig.keypoint_only_cameras needs keypoints > 0: without them those cameras "
                                 "would reach the model through nothing")
            if len(set(slots)) != len(slots) or not all(0 <= i < self.cameras for i in slots):
                raise ValueError(f"ModelConfig.keypoint_only_cameras: {slots} are not distinct slots of "
                                 f"{self.cameras} cameras")
            if len(slots) == self.cameras:
                raise ValueError("ModelConfig.keypoint_only_cameras: at least one camera must give patch tokens")
        if self.localizer_state and not self.localizer:
            raise ValueError("ModelConfig.localizer_state projects the localizer's estimate, which is off: set "
                             "localizer=True too")
        if not 0 <= self.localizer_teacher <= 1:
            raise ValueError(f"ModelConfig.localizer_teacher: expected a fraction in [0, 1], found "
                             f"{self.localizer_teacher}")
        if self.localizer_teacher and not self.localizer:
            raise ValueError("ModelConfig.localizer_teacher replaces the localizer's estimate, which is off: set "
                             "localizer=True too")
        if not 0 < self.world_model_fraction <= 1:
            raise ValueError(f"ModelConfig.world_model_fraction: expected a fraction in (0, 1], found "
                             f"{self.world_model_fraction}")
        if self.expert_depth is not None and not 1 <= self.expert_depth <= self.depth:
            raise ValueError(f"ModelConfig.expert_depth: expected 1..depth ({self.depth}), found {self.expert_depth}")
        if self.backbone is not None and not self.backbone.startswith("hf:"):
            raise ValueError(f"ModelConfig.backbone: expected 'hf:/local/dir', found {self.backbone!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def expert_reads(self) -> tuple[int, ...]:
        """The trunk layer whose keys/values each expert layer attends to (0-based), evenly spaced, the last last."""
        n = self.expert_depth or self.depth
        return tuple((j + 1) * self.depth // n - 1 for j in range(n))

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["subtask_vocab"] = list(self.subtask_vocab)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "preset_name": name, **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# Sizes only; everything else keeps the dataclass defaults. Parameter counts (63-D action/state, no vocab):
# tiny ~0.3 M (tests), small ~3.5 M (CPU default), base ~100 M (GPU).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        width=64, depth=2, heads=4, expert_width=48, patch_size=8, stem_channels=16,
        latent_grid=2, latent_dim=8, decoder_channels=16,
    ),
    "small": dict(
        width=192, depth=4, heads=6, expert_width=128, patch_size=12, stem_channels=32,
        latent_grid=4, latent_dim=16, decoder_channels=64,
    ),
    "base": dict(
        width=640, depth=12, heads=10, expert_width=448, patch_size=8, stem_channels=64,
        latent_grid=4, latent_dim=32, decoder_channels=128,
    ),
}  # fmt: skip
