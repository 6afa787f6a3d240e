"""`physis train`: datasets + a preset + a recipe -> RUN/checkpoints/..., metrics.jsonl, tb/, summary.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from physis.model.config import ModelConfig
from physis.model.physis_model import PhysisModel
from physis.train.checkpoint import load_checkpoint
from physis.train.data import OBJECT_PREFIX, DataConfig, TrainingData, embodiment_for
from physis.train.distributed import init_distributed
from physis.train.loop import TrainConfig, Trainer


class TrainSetupError(ValueError):
    """A train command that cannot run as given (reported to the user, not as a traceback)."""


@dataclass
class TrainCommand:
    """Train physis on LeRobot v3.0 datasets."""

    data: tuple[Path, ...]
    out: Path
    preset: str = "small"  # tiny | small | base
    recipe: Literal["pretrain", "posttrain", "adapt"] = "pretrain"
    steps: int = 2000
    minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0: no limit
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 100
    ema: float = 0.999  # EMA decay of the weights the checkpoint serves; 0 disables
    bf16: bool = True  # bf16 autocast (about 1.6x faster on CPUs with AMX)
    device: str = "cpu"  # cpu, cuda, cuda:1, mps, ...
    action_head: Literal["flow", "mse"] = "flow"  # mse: the deterministic ablation
    world_model: bool = True
    # the world-model losses on this fraction of each batch: most of the head's cost per step at a fraction
    # of its samples (1: every sample)
    world_model_fraction: float = 1.0
    subtask: bool = True
    progress_head: bool = True
    horizon: int = 16
    history: int = 1
    image_size: int = 96
    cameras: tuple[str, ...] = ()  # camera names to train on, in slot order; empty: every camera of the data
    image_shift: int = 0  # augmentation: shift each camera image by up to this many pixels (0: off)
    patch_size: int = 0  # 0: the preset's; it must divide image_size (e.g. 8 for 64x64 images)
    expert_depth: int = 0  # 0: one action-expert layer per trunk layer; fewer make each flow step cheaper
    stem_blocks: int | None = None  # residual conv blocks in the image stem; None: the preset's
    keypoints: int | None = None  # spatial-softmax keypoints per image (0: none); None: the preset's
    # auxiliary target: weight of a head that regresses the datasets' observation.environment_state (object and
    # goal positions, recorded by `physis collect`) from the prefix, so the image encoder learns to localize
    # them; a training target only, never a policy input. 0: off
    env_state_weight: float = 0.0
    # draw each episode's first `first_frames` frames this many times as often as later ones (1: uniform). Only
    # there must a policy find the goal in the pixels: later, the hand's progress along the demonstrated path
    # already tells where it is going, a shortcut that closed loop cannot take at the start
    first_frames_weight: float = 1.0
    first_frames: int = 8
    # regress the environment state on those first frames only: later the head, too, could read the goal off
    # the hand's progress instead of finding it in the pixels
    env_state_first_frames: bool = False
    # regress the object's environment-state values (object_*) only where the object lies within this distance (m)
    # of where its episode began: once pushed or carried it sits at the hand, the hand's position answers for
    # it, and a localizer trained there pulls its estimate of a resting object toward the hand. 0: off
    env_state_at_rest: float = 0.0
    # estimate the environment state from the image keypoints and the instruction before the trunk and feed the
    # estimate in as a token; needs --keypoints and --env-state-weight
    localizer: bool = False
    # project the localizer's estimate into its token together with the robot's state (one linear map can then
    # form the object-minus-hand displacement); needs --localizer
    localizer_state: bool = False
    # add to the environment-state target its positions relative to the robot's (object minus hand): what a
    # camera on the hand sees, and what an approach must move by; needs --env-state-weight
    env_state_relative: bool = False
    # add the relative positions once more as tanh(relative / near) (near in m, e.g. 0.04): a scale on which
    # the last centimetres of an approach dominate the loss, where a grasp needs about 1 cm; needs
    # --env-state-relative. 0: off
    env_state_near: float = 0.0
    # feed this fraction of training rows the true environment state in place of the localizer's estimate, so
    # the action expert learns to follow the token rather than read the goal off the hand's path; needs
    # --localizer. 0: off
    localizer_teacher: float = 0.0
    # move each position the teacher feeds by a random displacement of this standard deviation per axis (m, e.g.
    # 0.02), so the action expert cannot take the token for exact and reads the last centimetres from the
    # images (physis.train.teacher_noise); needs --localizer-teacher. 0: off
    localizer_teacher_noise: float = 0.0
    # cameras (by name) that give the trunk only their keypoint token and the localizer their keypoints, not a
    # grid of patch tokens: a second view that fixes positions for a few tokens; needs --keypoints
    keypoint_only_cameras: tuple[str, ...] = ()
    init_from: Path | None = None  # posttrain/adapt: start from this checkpoint's weights
    trainable: tuple[str, ...] = ()  # adapt: parameter-name patterns left trainable (fnmatch)
    embodiments: tuple[str, ...] = ()  # a spec per dataset, for datasets that do not name a built-in robot
    weights: tuple[float, ...] = ()  # sampling weight per dataset
    resume: bool = False
    seed: int = 0
    workers: int = 2  # DataLoader worker processes
    save_every: int = 500
    log_every: int = 10
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)  # other ModelConfig fields


def build(cmd: TrainCommand) -> tuple[PhysisModel, TrainingData, dict[str, Any]]:
    """The model, the data source and the checkpoint metadata for a command."""
    if cmd.image_shift < 0:
        raise TrainSetupError(f"--image-shift must be 0 (off) or a positive number of pixels, got {cmd.image_shift}")
    if not (cmd.first_frames_weight > 0 and math.isfinite(cmd.first_frames_weight)):
        raise TrainSetupError(f"--first-frames-weight must be a positive number (1: uniform), got "
                              f"{cmd.first_frames_weight}")
    if cmd.first_frames < 1:
        raise TrainSetupError(f"--first-frames must be >= 1, got {cmd.first_frames}")
    if not (cmd.env_state_weight >= 0):
        raise TrainSetupError(f"--env-state-weight must be >= 0 (0: off), got {cmd.env_state_weight}")
    if cmd.env_state_first_frames and not cmd.env_state_weight:
        raise TrainSetupError("--env-state-first-frames restricts the environment-state target, which is off: "
                              "set --env-state-weight too")
    if not (cmd.env_state_at_rest >= 0 and math.isfinite(cmd.env_state_at_rest)):
        raise TrainSetupError(f"--env-state-at-rest must be a distance >= 0 in m (0: off), got {cmd.env_state_at_rest}")
    if cmd.env_state_at_rest and not cmd.env_state_weight:
        raise TrainSetupError("--env-state-at-rest restricts the environment-state target, which is off: "
                              "set --env-state-weight too")
    if not 0 < cmd.world_model_fraction <= 1:
        raise TrainSetupError(f"--world-model-fraction must be in (0, 1], got {cmd.world_model_fraction}")
    if cmd.world_model_fraction < 1 and not cmd.world_model:
        raise TrainSetupError("--world-model-fraction thins the world-model losses, which are off: drop "
                              "--no-world-model or the fraction")
    if cmd.localizer and not cmd.env_state_weight:
        raise TrainSetupError("--localizer estimates the environment state, whose target is off: set "
                              "--env-state-weight too")
    if cmd.keypoint_only_cameras and not cmd.keypoints:
        raise TrainSetupError("--keypoint-only-cameras leaves those cameras only their keypoints: set --keypoints too")
    if cmd.localizer and not cmd.keypoints:
        raise TrainSetupError("--localizer reads the image keypoints, which are off: set --keypoints K too")
    if cmd.localizer_state and not cmd.localizer:
        raise TrainSetupError("--localizer-state projects the localizer's estimate, which is off: set --localizer too")
    if not 0 <= cmd.localizer_teacher <= 1:
        raise TrainSetupError(f"--localizer-teacher must be a fraction in [0, 1] (0: off), got {cmd.localizer_teacher}")
    if cmd.localizer_teacher and not cmd.localizer:
        raise TrainSetupError("--localizer-teacher replaces the localizer's estimate, which is off: set "
                              "--localizer too")
    if not (cmd.localizer_teacher_noise >= 0 and math.isfinite(cmd.localizer_teacher_noise)):
        raise TrainSetupError(f"--localizer-teacher-noise must be a distance >= 0 in m (0: off), got "
                              f"{cmd.localizer_teacher_noise}")
    if cmd.localizer_teacher_noise and not cmd.localizer_teacher:
        raise TrainSetupError("--localizer-teacher-noise moves what the localizer teacher feeds, which is off: set "
                              "--localizer-teacher too")
    if cmd.env_state_relative and not cmd.env_state_weight:
        raise TrainSetupError("--env-state-relative extends the environment-state target, which is off: set "
                              "--env-state-weight too")
    if cmd.env_state_near < 0 or (cmd.env_state_near and not cmd.env_state_relative):
        raise TrainSetupError(f"--env-state-near takes a positive distance in m and needs --env-state-relative "
                              f"(it rescales the relative positions), got {cmd.env_state_near}"
                              f"{'' if cmd.env_state_relative else ' without --env-state-relative'}")
    vocab = None
    space = None
    stats = None
    if cmd.init_from is not None:  # keep the pretrained slots and vocabulary so the weights still fit
        from physis.embodiment import UnifiedSpace
        from physis.model.vocab import SubtaskVocab

        base = load_checkpoint(cmd.init_from, training_state=False)
        space = UnifiedSpace.from_dict(base.config["unified_space"])
        vocab = SubtaskVocab(base.config["model"]["subtask_vocab"])
        # the weights expect the checkpoint's normalization: keep it where it covers every robot of the data
        robots = {embodiment_for(r, o).name for r, o in zip(cmd.data, cmd.embodiments or [None] * len(cmd.data),
                                                             strict=True)}
        if base.stats and robots <= set(base.stats):
            stats = base.stats
    data = TrainingData(list(cmd.data), DataConfig(horizon=cmd.horizon, history=cmd.history,
                                                   image_size=cmd.image_size, cameras=tuple(cmd.cameras),
                                                   env_state_relative=cmd.env_state_relative,
                                                   env_state_near=cmd.env_state_near),
                        embodiments=list(cmd.embodiments) or None, weights=list(cmd.weights) or None,
                        space=space, vocab=vocab, stats=stats)
    keypoint_only = _camera_slots(data, cmd.keypoint_only_cameras)
    env_state: dict[str, Any] = {}
    if cmd.env_state_weight > 0:
        if not data.env_state_dim:
            raise TrainSetupError("--env-state-weight needs datasets that record observation.environment_state "
                                  "(`physis collect` writes it for the Meta-World and pointmaze suites); "
                                  f"none of {[str(p) for p in cmd.data]} does")
        if cmd.env_state_at_rest and not any(n.startswith(OBJECT_PREFIX) for n in data.env_state_names):
            raise TrainSetupError(f"--env-state-at-rest masks the object's environment-state values, but these "
                                  f"datasets record none ({data.env_state_names})")
        env_state = {"env_state_dim": data.env_state_dim, "env_state_weight": cmd.env_state_weight,
                     **({"localizer": True} if cmd.localizer else {}),
                     **({"localizer_state": True} if cmd.localizer_state else {}),
                     **({"localizer_teacher": cmd.localizer_teacher} if cmd.localizer_teacher else {})}
    model_cfg = ModelConfig.preset(
        cmd.preset, action_dim=data.space.dim, state_dim=data.space.dim, horizon=cmd.horizon,
        cameras=data.num_cameras, history=cmd.history, image_size=cmd.image_size,
        num_embodiments=len(data.embodiments), action_head=cmd.action_head, world_model=cmd.world_model,
        subtask=cmd.subtask, progress=cmd.progress_head, subtask_vocab=tuple(data.vocab.words),
        **({"patch_size": cmd.patch_size} if cmd.patch_size else {}),
        **({"expert_depth": cmd.expert_depth} if cmd.expert_depth else {}),
        **({"world_model_fraction": cmd.world_model_fraction} if cmd.world_model_fraction < 1 else {}),
        **({"stem_blocks": cmd.stem_blocks} if cmd.stem_blocks is not None else {}),
        **({"keypoints": cmd.keypoints} if cmd.keypoints is not None else {}),
        **({"keypoint_only_cameras": keypoint_only} if keypoint_only else {}), **env_state, **cmd.overrides)
    model = PhysisModel(model_cfg)
    meta = {
        "model": model_cfg.to_dict(),
        "embodiments": [s.to_dict() for s in data.embodiments],
        "unified_space": data.space.to_dict(),
        "subtask_vocab": list(data.vocab.words),
        "data": data.meta()["data"],
        "cameras": data.meta()["cameras"],
        "num_cameras": data.num_cameras,
        "datasets": [str(p) for p in cmd.data],
        "augment": {"image_shift": cmd.image_shift, "localizer_teacher_noise": cmd.localizer_teacher_noise},
        "sampling": {"first_frames": cmd.first_frames, "first_frames_weight": cmd.first_frames_weight,
                     "env_state_first_frames": cmd.env_state_first_frames,
                     "env_state_at_rest": cmd.env_state_at_rest},
        "stats": data.stats,
        "env_state_names": data.env_state_names,  # what the localizer estimates, for a policy that latches some
    }
    return model, data, meta


def _camera_slots(data: TrainingData, names: tuple[str, ...]) -> tuple[int, ...]:
    """The slots of camera `names` in every robot's camera order (the same slot in each, or refused)."""
    slots: list[int] = []
    for name in names:
        found = {robot: cams.index(name) if name in cams else None for robot, cams in data.meta()["cameras"].items()}
        if len(set(found.values())) != 1 or None in found.values():
            raise TrainSetupError(f"--keypoint-only-cameras {name}: each dataset must have this camera in the same "
                                  f"slot; slots by robot: {found} (cameras: {data.meta()['cameras']})")
        slots.append(next(iter(found.values())))
    return tuple(slots)


def train_config(cmd: TrainCommand) -> TrainConfig:
    """The training loop's settings for a command."""
    return TrainConfig(steps=cmd.steps, max_minutes=cmd.minutes, batch_size=cmd.batch_size, lr=cmd.lr,
                       warmup=cmd.warmup, ema_decay=cmd.ema, bf16=cmd.bf16, device=cmd.device,
                       log_every=cmd.log_every,
                       save_every=cmd.save_every, seed=cmd.seed, num_workers=cmd.workers, out=str(cmd.out),
                       recipe=cmd.recipe, trainable=list(cmd.trainable),
                       init_from=str(cmd.init_from) if cmd.init_from else None, resume=cmd.resume,
                       progress=cmd.progress)


def command_batches(cmd: TrainCommand, data: TrainingData, seed: int, steps: int, start_step: int = 0):
    """The command's batches (its size, workers, augmentation and first-frame sampling) from `start_step`."""
    return data.batches(cmd.batch_size, seed=seed, steps=steps, start_step=start_step, num_workers=cmd.workers,
                        image_shift=cmd.image_shift, first_frames=cmd.first_frames,
                        first_frames_weight=cmd.first_frames_weight,
                        env_state_first_frames=cmd.env_state_first_frames,
                        env_state_at_rest=cmd.env_state_at_rest, teacher_noise=cmd.localizer_teacher_noise)


def train(cmd: TrainCommand) -> dict[str, Any]:
    dist = init_distributed()
    torch.manual_seed(cmd.seed)
    model, data, meta = build(cmd)
    cfg = train_config(cmd)
    seed = cmd.seed + 1000 * dist.rank  # each process reads different batches

    def batches(start_step: int):
        return command_batches(cmd, data, seed, cmd.steps, start_step)

    trainer = Trainer(model, batches, cfg, checkpoint_meta=meta)
    return trainer.train()
