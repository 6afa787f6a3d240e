"""Training checkpoints: one directory per step, written atomically, read without unpickling weights.

Layout of `RUN/checkpoints/step_000123/`:
- `config.json`: format tag, step, and the caller's configuration (model config, training config, embodiment
  specs, unified space, subtask vocabulary), all plain JSON.
- `model.safetensors` (and `ema.safetensors` when EMA is on): weights, never pickled.
- `stats.json`: normalization statistics per dataset.
- `training_state.pt`: optimizer, scheduler, step and RNG states, for resuming only.

A checkpoint is written into a hidden temporary directory beside its final place, fsynced, then renamed into
place; `RUN/checkpoints/latest` (a one-line file naming the directory) is replaced atomically after that. A
crash at any point leaves the previous checkpoint and `latest` as they were.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from physis.data.atomic import commit

FORMAT = "physis-checkpoint"
VERSION = 1
CONFIG = "config.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
STATS = "stats.json"
TRAINING_STATE = "training_state.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing a file or holds one in the wrong format."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    config: dict[str, Any]
    stats: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None = None
    training_state: dict[str, Any] | None = None

    @property
    def model_config(self) -> dict[str, Any] | None:
        return self.config.get("model")

    @property
    def train_config(self) -> dict[str, Any] | None:
        return self.config.get("train")

    @property
    def embodiments(self) -> Any:
        return self.config.get("embodiments")

    @property
    def unified_space(self) -> Any:
        return self.config.get("unified_space")

    @property
    def subtask_vocab(self) -> Any:
        return self.config.get("subtask_vocab")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], *,
                    config: dict[str, Any], stats: dict[str, Any] | None = None,
                    ema_state: dict[str, torch.Tensor] | None = None,
                    training_state: dict[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Write `RUN/checkpoints/step_<step>/` atomically, point `latest` at it, keep the newest `keep_last`."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        header = {"format": FORMAT, "version": VERSION, "step": step, "ema": ema_state is not None,
                  "training_state": training_state is not None}
        _write_json(tmp / CONFIG, {**header, **config})
        _write_json(tmp / STATS, stats or {})
        _write_weights(tmp / MODEL, model_state)
        if ema_state is not None:
            _write_weights(tmp / EMA, ema_state)
        if training_state is not None:
            torch.save({**training_state, "step": step}, tmp / TRAINING_STATE)
            _fsync_file(tmp / TRAINING_STATE)
        commit(tmp, final)  # fsyncs, renames (exchanges with an older copy of the same step) and fsyncs the parent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(root, final.name)
    if keep_last is not None and keep_last > 0:
        _prune(root, keep_last, keep=final.name)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (a run directory or its `checkpoints/`), None if it has none."""
    run_dir = Path(run_dir)
    root = run_dir if (run_dir / LATEST).exists() or run_dir.name == "checkpoints" else checkpoints_dir(run_dir)
    pointer = root / LATEST
    if pointer.exists():
        target = root / pointer.read_text().strip()
        if (target / CONFIG).exists():
            return target
    # No pointer (or a dangling one): every step_* directory is complete, since they appear by rename.
    steps = _step_dirs(root)
    return steps[-1][1] if steps else None


def load_checkpoint(path_or_run_dir: str | Path, *, training_state: bool = True,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory, or the latest checkpoint of a run directory.

    Weights come from safetensors (never unpickled). `training_state.pt` is loaded with pickle and is only
    ever read from checkpoints physis itself wrote; pass `training_state=False` when only the model is needed.
    """
    path = Path(path_or_run_dir)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    looks_like_one = _STEP_DIR.match(path.name) or any((path / f).exists() for f in (MODEL, STATS, TRAINING_STATE))
    if not (path / CONFIG).exists() and not looks_like_one:
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} holds no {CONFIG} and no checkpoints/step_* directory")
        path = found
    config = _read_json(path / CONFIG)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path / CONFIG}: not a physis checkpoint (format {config.get('format')!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{path / CONFIG}: unsupported checkpoint version {config.get('version')!r} "
                              f"(this physis reads version {VERSION})")
    step = config.get("step")
    if not isinstance(step, int):
        raise CheckpointError(f"{path / CONFIG}: 'step' must be an integer, got {step!r}")
    stats = _read_json(path / STATS)
    model_state = _read_weights(path / MODEL, map_location)
    ema_state = _read_weights(path / EMA, map_location) if config.get("ema") else None
    state = None
    if training_state and config.get("training_state"):
        file = path / TRAINING_STATE
        if not file.exists():
            raise CheckpointError(f"{file} is missing")
        try:
            # Pickle is needed for the RNG states; this file is physis's own, never a downloaded one.
            state = torch.load(file, map_location=map_location, weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{file}: unreadable training state ({e})") from e
        if not isinstance(state, dict) or state.get("step") != step:
            raise CheckpointError(f"{file}: training state does not belong to step {step}")
    return Checkpoint(path=path, step=step, config=config, stats=stats, model_state=model_state,
                      ema_state=ema_state, training_state=state)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    # safetensors refuses tensors that share memory (tied weights): store such a tensor's second name as a copy.
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(key)
        tensors[name] = t.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_file(path)


def _read_weights(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_file(root)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = _step_dirs(root)
    for _, path in steps[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
