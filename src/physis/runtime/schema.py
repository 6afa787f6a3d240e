"""What a checkpoint reads and what it answers, as plain data: the observation spec and the action space.

`observation_spec` describes both for one checkpoint and robot (the policy server sends it as its first
message); `validate_observation` checks an observation against it with errors that name the key and say
what was expected and found; `example_observation` makes one valid observation for a checkpoint.

An observation is `{"images": {camera: uint8 [H, W, 3]}, "state": {group: [size] numbers},
"instruction": str}`. Images of any size are accepted (the policy resizes them); the checkpoint's own
size is stated as `preferred_shape` and skips the resize. State groups may be any real dtype (they are
read as float32) but must have exactly the group's size and finite values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from physis.embodiment import DofGroup, EmbodimentSpec
from physis.runtime.policy import pick_embodiment

MAX_IMAGE_SIDE = 4096  # larger frames are a mistake, and a cost the server should not pay


class ObservationError(ValueError):
    """An observation that does not fit the checkpoint; the message names the key."""


def observation_spec(policy_or_meta: Any, embodiment: str | None = None) -> dict[str, Any]:
    """The observation a checkpoint expects and the actions it returns, for a `Policy` or a checkpoint's
    config.json (`meta`, where `embodiment` picks the robot when it serves several)."""
    if hasattr(policy_or_meta, "meta") and hasattr(policy_or_meta, "spec"):
        meta, spec = policy_or_meta.meta, policy_or_meta.spec
    elif isinstance(policy_or_meta, Mapping):
        meta = policy_or_meta
        specs = [EmbodimentSpec.from_dict(d, source="checkpoint") for d in meta["embodiments"]]
        spec = pick_embodiment(specs, embodiment)
    else:
        raise TypeError(f"observation_spec: expected a Policy or a checkpoint config, got {type(policy_or_meta)}")
    size = int(meta["data"]["image_size"])
    image = {"dtype": "uint8", "shape": [None, None, 3], "preferred_shape": [size, size, 3]}
    return {
        "embodiment": spec.name,
        "observation": {
            "images": {cam: dict(image) for cam in meta["cameras"][spec.name]},
            "state": {g.name: {"dtype": "float32", "shape": [g.size], **_describe(g)} for g in spec.state},
            "instruction": {"dtype": "str"},
        },
        "action": {
            "horizon": int(meta["model"]["horizon"]),
            "dim": spec.action_dim,
            "dtype": "float64",
            "names": spec.action_names,
            "groups": [{"name": g.name, "size": g.size, **_describe(g), "mode": g.mode} for g in spec.action],
        },
    }


def _describe(g: DofGroup) -> dict[str, Any]:
    def bound(values: tuple[float, ...]) -> list[float | None]:
        return [None if math.isinf(v) else v for v in values]  # None: unbounded (JSON has no infinity)

    return {"names": list(g.dim_names), "units": g.units, "lower": bound(g.lower), "upper": bound(g.upper)}


def validate_observation(obs: Any, spec: Mapping[str, Any]) -> None:
    """Raise `ObservationError` naming the first key that does not fit `spec` (from `observation_spec`)."""
    want = spec["observation"]
    if not isinstance(obs, Mapping):
        raise ObservationError(f"an observation is a mapping with keys {sorted(want)}, found {type(obs).__name__}")
    for part in ("images", "state"):
        if part not in obs:
            raise ObservationError(f"missing key '{part}': expected a mapping with keys {sorted(want[part])}")
        if not isinstance(obs[part], Mapping):
            raise ObservationError(f"'{part}': expected a mapping with keys {sorted(want[part])}, "
                                   f"found {type(obs[part]).__name__}")
        missing = [k for k in want[part] if k not in obs[part]]
        if missing:
            raise ObservationError(f"'{part}' lacks {missing}: expected keys {sorted(want[part])}, "
                                   f"found {sorted(map(str, obs[part]))}")
    for cam, w in want["images"].items():
        _check_image(obs["images"][cam], f"images/{cam}", w["preferred_shape"])
    for group, w in want["state"].items():
        _check_state(obs["state"][group], f"state/{group}", w["shape"][0])
    if "instruction" not in obs:
        raise ObservationError("missing key 'instruction': expected the task in words (a str)")
    if not isinstance(obs["instruction"], str):
        raise ObservationError(f"'instruction': expected a str, found {type(obs['instruction']).__name__}")


def _found(x: Any) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__


def _check_image(x: Any, key: str, preferred: list[int]) -> None:
    h, w, _ = preferred
    ok = isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3
    if not ok:
        raise ObservationError(f"'{key}': expected a uint8 array [H, W, 3] (preferably {h}x{w}x3), found {_found(x)}")
    if not (0 < x.shape[0] <= MAX_IMAGE_SIDE and 0 < x.shape[1] <= MAX_IMAGE_SIDE):
        raise ObservationError(f"'{key}': image sides must be 1..{MAX_IMAGE_SIDE} pixels (preferably {h}x{w}), "
                               f"found {x.shape[0]}x{x.shape[1]}")


def _check_state(x: Any, key: str, size: int) -> None:
    if isinstance(x, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
        x = np.asarray(x, dtype=np.float64)
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
        raise ObservationError(f"'{key}': expected {size} numbers (float32 array of shape ({size},)), "
                               f"found {_found(x)}")
    if x.shape != (size,):
        raise ObservationError(f"'{key}': expected shape ({size},), found {x.dtype} {tuple(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise ObservationError(f"'{key}': values must be finite, found {x.tolist()}")


def example_observation(checkpoint: str | Path, embodiment: str | None = None) -> dict[str, Any]:
    """One valid observation for a checkpoint (a run directory or a step directory), read from its config
    alone: gradient images at the preferred size, each state value in the middle of its limits (0 where
    unbounded)."""
    return example_from_spec(observation_spec(_read_config(checkpoint), embodiment))


def example_from_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One valid observation for an `observation_spec`."""
    obs: dict[str, Any] = {"images": {}, "state": {}, "instruction": "do the task"}
    for i, (cam, w) in enumerate(spec["observation"]["images"].items()):
        h, wd, _ = w["preferred_shape"]
        ramp = np.add.outer(np.arange(h) * 255 // max(h - 1, 1), np.arange(wd) * 255 // max(wd - 1, 1)) // 2
        obs["images"][cam] = np.stack([ramp, ramp[::-1], np.full((h, wd), 40 * i)], axis=-1).astype(np.uint8)
    for group, w in spec["observation"]["state"].items():
        value = np.zeros(w["shape"][0], dtype=np.float32)
        for j, (lo, hi) in enumerate(zip(w["lower"], w["upper"], strict=True)):
            if lo is not None and hi is not None:
                value[j] = (lo + hi) / 2
            elif lo is not None or hi is not None:
                value[j] = min(max(0.0, lo if lo is not None else -math.inf), hi if hi is not None else math.inf)
        obs["state"][group] = value
    return obs


def _read_config(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json without loading its weights."""
    from physis.train.checkpoint import CONFIG, CheckpointError, latest_checkpoint

    path = Path(checkpoint)
    if not (path / CONFIG).is_file():
        found = latest_checkpoint(path) if path.is_dir() else None
        if found is None:
            raise CheckpointError(f"no checkpoint at {path} (expected {CONFIG} or checkpoints/step_*)")
        path = found
    return json.loads((path / CONFIG).read_text())
