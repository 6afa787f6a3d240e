"""Running a trained model: the `Policy` (checkpoint -> actions in the robot's native space)."""

from physis.runtime.policy import CheckpointMismatchError, Policy

__all__ = ["CheckpointMismatchError", "Policy"]
