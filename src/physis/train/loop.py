"""The training loop: AdamW, warmup + cosine, clipping, EMA, bf16 autocast, logs, checkpoints, exact resume.

The model is any `nn.Module` whose `forward(batch)` returns a dict of scalar loss tensors: "loss" (what is
optimized) plus one entry per head (logged). Batches come from the caller; to resume exactly, build the batch
source from (seed, `Trainer.start_step`), or pass a function `start_step -> iterable of batches`.

Recipes: `pretrain` and `posttrain` train every parameter the model leaves trainable (`posttrain` usually
starts from `init_from`); `adapt` freezes everything except the parameters whose names match `trainable`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from physis.progress import progress_bar
from physis.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from physis.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    gather_objects,
    init_distributed,
    seed_everything,
    wrap_model,
)
from physis.train.schedule import warmup_cosine_scheduler

log = logging.getLogger(__name__)

RECIPES = ("pretrain", "posttrain", "adapt")
_NO_DECAY_MODULES = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
                     nn.modules.batchnorm._NormBase)

Batches = Iterable[dict[str, Any]] | Callable[[int], Iterable[dict[str, Any]]]


@dataclass
class TrainConfig:
    steps: int = 1000
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0: no limit
    batch_size: int = 32  # per process; read by the batch source
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 100
    min_lr_ratio: float = 0.1  # the cosine's floor, as a fraction of `lr`
    clip_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    ema_decay: float = 0.0  # 0 disables EMA weights
    bf16: bool = False  # bf16 autocast for the forward pass
    device: str = "cpu"
    log_every: int = 10
    save_every: int = 500  # 0 saves only at the end
    keep_last: int = 3
    seed: int = 0
    num_workers: int = 0  # read by the batch source
    out: str = "runs/default"
    recipe: str = "pretrain"
    trainable: list[str] = field(default_factory=list)  # fnmatch patterns over parameter names, for adapt
    init_from: str | None = None  # a checkpoint (or run) whose weights start a posttrain/adapt run
    resume: bool = False  # continue from the run's latest checkpoint, if it has one
    progress: bool = True
    # DDP must be told when some parameters may get no gradient in a step (a head without targets in a batch).
    ddp_find_unused: bool = True


def apply_recipe(model: nn.Module, recipe: str, patterns: list[str]) -> tuple[int, int]:
    """Set requires_grad for the recipe; returns (trainable, total) parameter counts."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
    if recipe == "adapt":
        if not patterns:
            raise ValueError("recipe 'adapt' needs trainable parameter patterns (e.g. 'action_head.*')")
        matched = 0
        for name, p in model.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
            matched += p.requires_grad
        if not matched:
            raise ValueError(f"no parameter name matches the trainable patterns {patterns}")
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms and embeddings."""
    no_decay: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            # Bare learned embeddings (camera, time, position, special tokens) are registered as parameters.
            bare_embedding = name not in ("weight", "bias") and ("embed" in name.lower() or "token" in name.lower())
            if p.ndim < 2 or isinstance(module, _NO_DECAY_MODULES) or bare_embedding:
                no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class Trainer:
    """Trains `model` on `batches` per `cfg`; `checkpoint_meta` holds the JSON-able dicts saved with every
    checkpoint ("model", "embodiments", "unified_space", "subtask_vocab", ... and "stats" for stats.json)."""

    def __init__(self, model: nn.Module, batches: Batches, cfg: TrainConfig,
                 checkpoint_meta: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.dist: DistInfo = init_distributed()
        self.run_dir = Path(cfg.out)
        self.meta = dict(checkpoint_meta or {})
        self.batches = batches
        seed_everything(cfg.seed + self.dist.rank)

        self.model = model.to(cfg.device)
        self.params_trainable, self.params_total = apply_recipe(self.model, cfg.recipe, cfg.trainable)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        self.scheduler = warmup_cosine_scheduler(self.optimizer, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        self.step = 0
        self.losses: list[float] = []  # the loss of every step this trainer ran

        ckpt = None
        if cfg.resume and (found := latest_checkpoint(self.run_dir)) is not None:
            ckpt = load_checkpoint(found, map_location=cfg.device)
            if ckpt.training_state is None:
                raise ValueError(f"{found} has no training state to resume from")
            self.model.load_state_dict(ckpt.model_state)
            self.optimizer.load_state_dict(ckpt.training_state["optimizer"])
            self.scheduler.load_state_dict(ckpt.training_state["scheduler"])
            self.step = ckpt.step
            if self.dist.is_main:
                log.info("resuming from %s at step %d", found, self.step)
        elif cfg.init_from:
            init = load_checkpoint(cfg.init_from, training_state=False, map_location=cfg.device)
            self.model.load_state_dict(init.model_state)
        self.start_step = self.step

        # Wrap before copying EMA weights: DDP broadcasts rank 0's weights, so every replica starts equal.
        self.ddp_model = wrap_model(self.model, self.dist, cfg.ddp_find_unused)
        self.ema: dict[str, torch.Tensor] | None = None
        if cfg.ema_decay > 0:
            source = ckpt.ema_state if ckpt is not None and ckpt.ema_state is not None else self.model.state_dict()
            self.ema = {k: v.detach().to(cfg.device).clone() for k, v in source.items()}
        if ckpt is not None:
            states = ckpt.training_state["rng"]
            # Each rank continues its own stream; a run resumed on a different world size reseeds per rank.
            if len(states) == self.dist.world_size:
                set_rng_state(states[self.dist.rank])
            else:
                seed_everything(cfg.seed + self.dist.rank + 1_000_003 * self.step)

    # -- one step -------------------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any]) -> tuple[dict[str, float], float]:
        """One optimizer step on a batch: forward (bf16 autocast if set), backward, clipping, AdamW, EMA."""
        self.ddp_model.train()
        device_type = torch.device(self.cfg.device).type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            out = self.ddp_model(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.clip_norm if self.cfg.clip_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        losses = {k: float(v.detach().float()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        return losses, grad_norm

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # Ramp the decay up so the average is not dominated by the random initialisation early on.
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for name, value in self.model.state_dict().items():
            target = self.ema[name]
            if target.is_floating_point():
                target.lerp_(value.detach().to(target.dtype), 1.0 - decay)
            else:
                target.copy_(value)

    # -- the loop --------------------------------------------------------------------------------------------

    def _iterate(self) -> Iterator[dict[str, Any]]:
        source = self.batches(self.start_step) if callable(self.batches) else self.batches
        for batch in source:
            yield {k: v.to(self.cfg.device, non_blocking=True) if torch.is_tensor(v) else v
                   for k, v in batch.items()}

    def train(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.is_main
        writer = self._open_logs() if main else None
        batches = self._iterate()
        window: dict[str, list[float]] = {}
        window_samples, window_start = 0, time.perf_counter()
        total_samples, start = 0, time.perf_counter()
        last_saved, last = None, {}
        bar = progress_bar("training", "loss", enabled=main and cfg.progress)
        with bar, self._stop_on_sigterm():
            task = bar.add_task(str(self.run_dir), total=cfg.steps, completed=self.step, loss="-")
            while self.step < cfg.steps:
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"the batch source ran out at step {self.step} of {cfg.steps}")
                lr = self.scheduler.get_last_lr()[0]
                last, grad_norm = self.train_step(batch)
                self.step += 1
                self.losses.append(last["loss"])
                n = _batch_size(batch)
                window_samples += n
                total_samples += n
                for k, v in {**last, "grad_norm": grad_norm, "lr": lr}.items():
                    window.setdefault(k, []).append(v)
                bar.update(task, completed=self.step, loss=f"{last['loss']:.4f}")

                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    means = all_reduce_mean({k: sum(v) / len(v) for k, v in window.items()}, self.dist)
                    elapsed = time.perf_counter() - window_start
                    means["samples_per_s"] = window_samples * self.dist.world_size / max(elapsed, 1e-9)
                    if main:
                        self._log(writer, means)
                    window, window_samples, window_start = {}, 0, time.perf_counter()
                out_of_time = cfg.max_minutes > 0 and time.perf_counter() - start > 60 * cfg.max_minutes
                stopping = out_of_time or self._sigterm
                if (cfg.save_every > 0 and self.step % cfg.save_every == 0) or self.step == cfg.steps or stopping:
                    last_saved = self.save()
                if stopping:  # ends the run early, with a checkpoint of where it got to
                    break

        wall = time.perf_counter() - start
        if writer is not None:
            writer.close()
        barrier(self.dist)
        summary = {
            "start_step": self.start_step, "steps": self.step, "final_loss": last.get("loss"),
            "final_losses": last, "samples_per_s": total_samples * self.dist.world_size / max(wall, 1e-9),
            "wall_s": wall, "peak_rss_mb": peak_rss_mb(), "params_total": self.params_total,
            "params_trainable": self.params_trainable, "checkpoint": str(last_saved) if last_saved else None,
            "world_size": self.dist.world_size, "stopped_by": "SIGTERM" if self._sigterm else None,
        }
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    @contextmanager
    def _stop_on_sigterm(self) -> Iterator[None]:
        """SIGTERM (a `kill`, a container stop) ends a single-process run after the step in progress, with a
        checkpoint of it, instead of losing the steps since the last one. (Under DDP the ranks could stop at
        different steps, so there the default applies.)"""
        self._sigterm = False
        if self.dist.world_size > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, frame: Any) -> None:
            self._sigterm = True

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank must call it, for the RNG gather)."""
        rngs = gather_objects(rng_state(), self.dist)
        if not self.dist.is_main:
            return None
        meta = {k: v for k, v in self.meta.items() if k != "stats"}
        training_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                          "rng": rngs, "world_size": self.dist.world_size}
        return save_checkpoint(self.run_dir, self.step, self.model.state_dict(),
                               config={**meta, "train": asdict(self.cfg)}, stats=self.meta.get("stats"),
                               ema_state=self.ema, training_state=training_state, keep_last=self.cfg.keep_last)

    # -- logs ------------------------------------------------------------------------------------------------

    def _open_logs(self) -> Any:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        if self.start_step > 0 and metrics.exists():
            # Drop lines a killed run logged after its last checkpoint: they are about to be redone.
            kept = [ln for ln in metrics.read_text().splitlines() if _logged_step(ln) <= self.start_step]
            metrics.write_text("".join(ln + "\n" for ln in kept))
        elif self.start_step == 0 and metrics.exists():
            metrics.unlink()
        from torch.utils.tensorboard import SummaryWriter  # slow import, only on rank 0

        return SummaryWriter(str(self.run_dir / "tb"), purge_step=self.start_step or None)

    def _log(self, writer: Any, means: dict[str, float]) -> None:
        record = {"step": self.step, **means}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in means.items():
            writer.add_scalar(f"train/{k}", v, self.step)
        writer.flush()


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a line cut short by the kill


def _batch_size(batch: dict[str, Any]) -> int:
    for key in ("state", "actions", "images"):
        if torch.is_tensor(batch.get(key)):
            return int(batch[key].shape[0])
    return next((int(v.shape[0]) for v in batch.values() if torch.is_tensor(v) and v.ndim > 0), 0)
