"""Running a trained model: the `Policy` (checkpoint -> actions in the robot's native space), the observation
schema it reads, and (in `physis.runtime.server`) the websocket policy server that speaks openpi's protocol."""

from physis.runtime.policy import CheckpointMismatchError, Policy, PolicySession
from physis.runtime.schema import ObservationError, example_observation, observation_spec, validate_observation

__all__ = ["CheckpointMismatchError", "ObservationError", "Policy", "PolicySession", "example_observation",
           "observation_spec", "validate_observation"]
