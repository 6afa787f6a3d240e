"""Training: the loop (`Trainer`, `TrainConfig`), checkpoints, the lr schedule and data parallelism."""

from physis.train.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from physis.train.loop import TrainConfig, Trainer
from physis.train.schedule import warmup_cosine, warmup_cosine_scheduler

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "TrainConfig",
    "Trainer",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]
