"""`physis bench train`: training samples per second of one `physis train` configuration.

It takes the flags of `physis train` (the datasets, preset and options to time; the schedule, checkpoint and
resume flags do not matter here) and measures, on this machine:
- the optimizer step alone (forward, backward, clipping, AdamW, EMA: the training loop's own step) on batches
  fetched beforehand, as the median of `timed_steps` steps after `warmup_steps`;
- the batch source alone (the DataLoader with `workers` processes, images decoded from the frame cache);
- optionally, the operations that take the step's time (`torch.profiler`, self CPU time).

In a real run the loader's workers share the cores with the step, so its samples/s is at most the step's.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

import torch

from physis.train.loop import Trainer, peak_rss_mb
from physis.train.run import TrainCommand, build, command_batches, train_config


@dataclass
class TrainBenchConfig(TrainCommand):
    """`physis train`'s flags (`--out` is where results.json goes), plus what to time."""

    timed_steps: int = 20
    warmup_steps: int = 3
    profile_steps: int = 3  # steps under torch.profiler for the table of operations (0: off)


def run(cfg: TrainBenchConfig) -> dict[str, Any]:
    if cfg.timed_steps < 1 or cfg.warmup_steps < 0 or cfg.profile_steps < 0:
        raise ValueError(f"bench train: --timed-steps must be >= 1 and --warmup-steps, --profile-steps >= 0, got "
                         f"{cfg.timed_steps}, {cfg.warmup_steps}, {cfg.profile_steps}")
    torch.manual_seed(cfg.seed)
    model, data, meta = build(cfg)
    wanted = cfg.warmup_steps + cfg.timed_steps + cfg.profile_steps
    started = time.perf_counter()
    batches = list(command_batches(cfg, data, cfg.seed, wanted))
    loading_s = time.perf_counter() - started
    trainer = Trainer(model, batches, train_config(cfg), checkpoint_meta=meta)
    for batch in batches[: cfg.warmup_steps]:
        trainer.train_step(batch)
    times = []
    for batch in batches[cfg.warmup_steps : cfg.warmup_steps + cfg.timed_steps]:
        t0 = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    result: dict[str, Any] = {
        "benchmark": "train",
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "parameters": trainer.params_total,
        "batch_size": cfg.batch_size,
        "step_ms": {"p50": 1e3 * step_s, "min": 1e3 * min(times), "max": 1e3 * max(times)},
        "samples_per_s": cfg.batch_size / step_s,
        "loader_samples_per_s": cfg.batch_size * len(batches) / loading_s,
        "peak_rss_mb": peak_rss_mb(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": date.today().isoformat(),
    }
    if cfg.profile_steps:
        result["operations"] = _profile(trainer, batches[cfg.warmup_steps + cfg.timed_steps :])
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _profile(trainer: Trainer, batches: list[dict[str, Any]], top: int = 12) -> list[dict[str, Any]]:
    """The operations with the most self CPU time per step, with their share of the step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            trainer.train_step(batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"name": e.key, "calls_per_step": e.count / len(batches),
             "ms_per_step": e.self_cpu_time_total / 1e3 / len(batches), "share": e.self_cpu_time_total / total}
            for e in events[:top]]
