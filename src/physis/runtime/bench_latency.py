"""`physis bench latency`: milliseconds per action chunk at batch 1, per preset, flow steps, cache and backend.

A chunk is what a policy computes per re-plan: encode the observation prefix, generate the subtask (when the
model has that head) and run K flow steps. With the cache off, the prefix (and the subtask tokens over it) is
re-encoded for every flow step, as a model without a prefix cache would. With the cache, each chunk hands the
previous chunk's subtask to the model as a draft, as `Policy` does (--no-draft: token-by-token decoding).
Each configuration also reports its FLOPs (counted once, on the float32 model) and the ratio of its median
time to a floor: the time this machine takes for one matmul with the same FLOPs, in the backend's dtype (the
best of 20 runs); for an engine whose flow loop runs in another dtype (compile-bf16), the prefix's FLOPs at the
one dtype's floor plus the flow loop's at the other's.

The configurations of a preset are timed round-robin, five chunks at a time, so that whatever else the machine
does meanwhile falls on all of them alike; `cpu_p50_ms` (process CPU time per chunk) is the steadier figure
on a shared machine, p50/p90/p99 (wall clock) the ones a control loop sees. On Linux the results also record how
much CPU time the hypervisor took from this machine while the chunks were timed (`machine.steal_s`, from
/proc/stat): on a shared virtual machine, a run with much of it ran slow for reasons outside the model (one without
it may still have: a neighbour on the same physical cores slows it without taking its CPUs away).

`--device cuda` times the models on a GPU: each chunk ends with a device synchronization, the floor is a matmul
on that device, and the CPU-only backends (int8, onnx, onnx-int8) are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from physis.model.config import ModelConfig
from physis.model.physis_model import PhysisModel
from physis.model.vocab import PAD
from physis.runtime.backends import BACKENDS, Engine, make_engine
from physis.runtime.export import example_batch
from physis.runtime.fused import kernel_isa

VOCAB = tuple(f"word{i}" for i in range(32))  # random weights rarely emit EOS: subtasks run to full length
EAGER_FAMILY = ("eager", "bf16", "int8")  # backends that can run without the prefix cache
CPU_ONLY = ("int8", "fused", "onnx", "onnx-int8")  # quantized kernels, our CPU kernels, ONNX Runtime's CPU provider
GPU_ONLY = ("cuda-graph",)  # on a CPU this engine runs eagerly: nothing to time
BLOCK = 5  # chunks timed back to back per configuration and round


@dataclass(frozen=True)
class LatencyBenchConfig:
    out: Path = Path("outputs/bench-latency")
    """Where results.json goes."""
    presets: tuple[str, ...] = ("tiny", "small", "base")
    """Model presets, with random weights (ignored with --checkpoint)."""
    checkpoint: Path | None = None
    """A run or checkpoint directory: time its model instead of the presets."""
    steps: tuple[int, ...] = (1, 5, 10)
    """Flow steps per chunk."""
    cache: tuple[bool, ...] = (True, False)
    """With and without the prefix cache."""
    backends: tuple[str, ...] = tuple(b for b in BACKENDS if b not in GPU_ONLY)
    """Inference backends (eager, bf16, int8, compile, compile-bf16, fused, onnx, onnx-int8; on a GPU also
    cuda-graph)."""
    expert_depth: int = 0
    """Action-expert layers of the presets (0: one per trunk layer, the presets' own)."""
    cameras: int = 2
    image_size: int = 96
    text_tokens: int = 12
    """Instruction tokens in the prefix. `Policy` drops the encoder's padding, so this is an instruction's own
    length: MT10's 40 instructions have 5-14 (mean 8.4); 32 is the longest a model takes."""
    subtask: bool = True
    """Generate the subtask before acting (when the model has that head)."""
    draft: bool = True
    """Hand each chunk the previous chunk's subtask as a draft to verify in one pass, as `Policy` does (a control
    loop's steady state: the subtask changes once in several chunks); --no-draft decodes token by token."""
    threads: int = 0
    """Threads for torch and ONNX Runtime; 0: every core this process may use."""
    repeats: int = 50
    """Timed chunks per configuration (at most), taken 5 at a time, round-robin over the configurations."""
    seconds: float = 10.0
    """Time budget per configuration: it gets no more chunks once spent (after at least 5)."""
    pause_ms: float = 0.0
    """Idle milliseconds before each timed chunk, as a control loop leaves between requests (0: back to back). An
    idle core's caches go cold, so a chunk after a pause takes longer than one right after another."""
    warmup: int = 3
    onnx_dir: Path | None = None
    """Where exported ONNX graphs are kept (per preset) and reused by the next run; default OUT/onnx."""
    seed: int = 0
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:1, ..."""
    progress: bool = True


def run(cfg: LatencyBenchConfig) -> dict[str, Any]:
    """Time every configuration; writes cfg.out/results.json and returns its content."""
    if cfg.pause_ms < 0:
        raise ValueError(f"bench latency: --pause-ms must be >= 0, got {cfg.pause_ms}")
    unknown = sorted(set(cfg.backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"bench latency: unknown backends {unknown}; expected some of {BACKENDS}")
    threads = cfg.threads or len(os.sched_getaffinity(0))
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"bench latency: --device {cfg.device}, but torch sees no CUDA device")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, threads)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: LatencyBenchConfig, threads: int) -> dict[str, Any]:
    from physis.progress import progress_bar

    device = torch.device(cfg.device)
    models = {name: model.to(device) for name, model in _models(cfg).items()}
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    setup: dict[str, float] = {}
    timing_s, steal_s = 0.0, 0.0  # wall seconds of the timed chunks, and the hypervisor's steal meanwhile
    rounds = -(-cfg.repeats // BLOCK)
    n_configs = len(cfg.backends) * len(cfg.steps) * len(cfg.cache)
    with progress_bar("timing", "config", enabled=cfg.progress) as bar:
        task = bar.add_task("chunks", total=len(models) * (len(cfg.backends) + rounds * n_configs), config="")
        for name, model in models.items():
            batch = example_batch(model, seed=cfg.seed, text_tokens=cfg.text_tokens)
            batch = {k: v.to(device) for k, v in batch.items()}
            engines = {}
            for backend in cfg.backends:
                wrong_device = backend in (CPU_ONLY if device.type != "cpu" else GPU_ONLY)
                if wrong_device:
                    where = f"CPU only, not {device}" if device.type != "cpu" else "needs a CUDA device"
                    skipped.append({"preset": name, "backend": backend, "reason": where})
                    bar.advance(task)
                    continue
                bar.update(task, config=f"{name} {backend} (building)")
                t0 = time.perf_counter()
                try:
                    options = {"onnx_dir": (cfg.onnx_dir or cfg.out / "onnx") / name} if backend.startswith("onnx") \
                        else {}
                    engines[backend] = make_engine(model, backend, **options)
                    engines[backend].chunk(batch, steps=1, subtask=cfg.subtask)  # compiles / loads lazily
                    _sync(device)
                    setup[f"{name}/{backend}"] = time.perf_counter() - t0
                except Exception as e:  # a backend this machine lacks (a compiler, onnxruntime) is reported, not fatal
                    skipped.append({"preset": name, "backend": backend, "reason": f"{type(e).__name__}: {e}"[:300]})
                bar.advance(task)
            timers = []
            for backend, engine in engines.items():
                for steps in cfg.steps:
                    for cache in cfg.cache:
                        if not cache and backend not in EAGER_FAMILY:
                            skipped.append({"preset": name, "backend": backend, "steps": steps, "cache": False,
                                            "reason": "the uncached baseline runs on the eager backends only"})
                        else:
                            timers.append(_Timer(cfg, engine, batch, steps, cache))
            # Round-robin over the configurations, a few chunks each, so that whatever else the machine does
            # during the run falls on all of them alike.
            steal0, t0 = steal_seconds(), time.perf_counter()
            for _ in range(rounds):
                for timer in timers:
                    bar.update(task, config=timer.label(name))
                    timer.run(BLOCK)
                    bar.advance(task)
                bar.advance(task, n_configs - len(timers))
            timing_s += time.perf_counter() - t0
            steal1 = steal_seconds()
            steal_s = None if steal0 is None or steal1 is None or steal_s is None else steal_s + steal1 - steal0
            memo: dict[tuple, Any] = {}  # FLOPs per (steps, cache), floors per (FLOPs, dtype): shared by backends
            for timer in timers:
                results.append(_row(cfg, name, model, batch, timer, memo))
            del engines, timers
    result = {
        "benchmark": "latency",
        "config": {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
                   for k, v in asdict(cfg).items()},
        "threads": threads,
        "results": results,
        "skipped": skipped,
        "setup_s": setup,
        "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "cpu": cpu_name(),
                    "kernel_isa": kernel_isa(), "torch": torch.__version__, "timing_s": round(timing_s, 3),
                    "steal_s": None if steal_s is None else round(steal_s, 3),
                    "device": str(device),
                    **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})},
        "date": date.today().isoformat(),
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=2))
    return result


class _Timer:
    """Wall and CPU milliseconds of one configuration's chunks, gathered a block at a time."""

    def __init__(self, cfg: LatencyBenchConfig, engine: Engine, batch: dict[str, torch.Tensor], steps: int,
                 cache: bool) -> None:
        self.cfg, self.engine, self.steps, self.cache = cfg, engine, steps, cache
        self.device = batch["images"].device
        noise = torch.randn(1, engine.config.horizon, engine.config.action_dim,
                            generator=torch.Generator().manual_seed(0)).to(self.device)
        self.ids: torch.Tensor | None = None  # the last chunk's subtask: the next one's draft
        if cache:
            def chunk() -> None:
                ids, _ = engine.chunk(batch, steps=steps, noise=noise, subtask=cfg.subtask,
                                      draft=self.ids if cfg.draft else None)
                self.ids = ids

            self.fn = chunk
        else:
            self.fn = lambda: uncached_chunk(engine, batch, steps, noise, cfg.subtask)
        self.wall: list[float] = []
        self.cpu: list[float] = []  # CPU time of the whole process: steadier where the machine is shared
        for _ in range(cfg.warmup):
            self.fn()
        _sync(self.device)

    def label(self, name: str) -> str:
        return f"{name} {self.engine.backend} K={self.steps} cache={'on' if self.cache else 'off'}"

    def run(self, n: int) -> None:
        """n more chunks, unless this configuration has had its repeats or (after 5 chunks) its time budget."""
        for _ in range(n):
            if len(self.wall) >= self.cfg.repeats or (len(self.wall) >= 5 and sum(self.wall) > 1e3 * self.cfg.seconds):
                return
            if self.cfg.pause_ms:
                time.sleep(self.cfg.pause_ms / 1e3)  # not timed
            t0, c0 = time.perf_counter(), time.process_time()
            self.fn()
            _sync(self.device)  # a GPU chunk is done when its kernels are, not when they are queued
            self.wall.append((time.perf_counter() - t0) * 1e3)
            self.cpu.append((time.process_time() - c0) * 1e3)


def _row(cfg: LatencyBenchConfig, name: str, model: PhysisModel, batch: dict[str, torch.Tensor], timer: _Timer,
         memo: dict[tuple, Any]) -> dict[str, Any]:
    ms = np.asarray(timer.wall)
    key = ("flops", timer.steps, timer.cache)
    if key not in memo:
        memo[key] = count_flops(model, batch, timer.steps, timer.cache, cfg.subtask)
    flops, tokens, flow = memo[key]
    # the floor in the dtype each part runs in: an engine whose flow loop has its own dtype (compile-bf16: a bf16
    # prefix, a float32 flow loop) gets the prefix's FLOPs at the one's floor and the flow loop's at the other's
    parts = [(flops - flow, timer.engine.dtype), (flow, timer.engine.flow_dtype)] if timer.cache else \
        [(flops, timer.engine.dtype)]
    floor = 0.0
    for part_flops, part_dtype in parts:
        if part_flops and ("floor", part_flops, part_dtype) not in memo:
            memo["floor", part_flops, part_dtype] = matmul_floor_ms(part_flops, part_dtype, device=timer.device)
        floor += memo["floor", part_flops, part_dtype] if part_flops else 0.0
    dtypes = sorted({str(d).removeprefix("torch.") for f, d in parts if f})
    p50 = float(np.percentile(ms, 50))
    return {
        "preset": name, "backend": timer.engine.backend, "steps": timer.steps, "cache": timer.cache, "batch": 1,
        "cameras": model.config.cameras, "image_size": model.config.image_size, "params": model.num_parameters(),
        "subtask_tokens": tokens, "p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
        "cpu_p50_ms": float(np.median(timer.cpu)), "repeats": len(ms), "gflop": flops / 1e9,
        "flow_gflop": flow / 1e9, "floor_ms": floor, "floor_dtype": "+".join(dtypes), "ratio_to_floor": p50 / floor,
    }


def _models(cfg: LatencyBenchConfig) -> dict[str, PhysisModel]:
    """{label: model}: the checkpoint's model, or each preset with random weights."""
    if cfg.checkpoint is not None:
        from physis.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(cfg.checkpoint, training_state=False)
        model = PhysisModel(ModelConfig.from_dict(ckpt.config["model"]))
        model.load_state_dict(ckpt.ema_state or ckpt.model_state)
        return {f"{model.config.preset_name} ({cfg.checkpoint.name})": model.eval()}
    models = {}
    for name in cfg.presets:
        torch.manual_seed(cfg.seed)
        config = ModelConfig.preset(name, cameras=cfg.cameras, image_size=cfg.image_size, subtask_vocab=VOCAB,
                                    expert_depth=cfg.expert_depth or None)
        label = f"{name}-expert{cfg.expert_depth}" if cfg.expert_depth else name
        models[label] = PhysisModel(config).eval()
    return models


@torch.inference_mode()
def uncached_chunk(engine: Engine, batch: dict[str, torch.Tensor], steps: int, noise: torch.Tensor,
                   subtask: bool = True) -> torch.Tensor:
    """A chunk without the prefix cache: the prefix, and the subtask tokens over it, are encoded again for
    every flow step (the subtask itself is generated once, as with the cache)."""
    net = engine.net
    ids = None
    if subtask and engine.config.subtask:
        ids, _ = engine.generate_subtask(engine.encode_prefix(batch))
    x, dt = noise, 1.0 / steps
    for i in range(steps):
        cache = engine.encode_prefix(batch)
        if ids is not None:
            cache = net.extend_subtask(cache, ids)
        x = x - dt * net.predict_velocity(cache, x, torch.full((x.shape[0],), 1.0 - i * dt, device=x.device))
    return x


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # (B, heads, nq, d) x (B, heads, nk, d): scores and the weighted sum of values, 2 FLOPs per multiply-add
    b, h, nq, d = query
    nk, dv = key[-2], value[-1]
    return 2 * b * h * nq * nk * (d + dv)


def count_flops(model: PhysisModel, batch: dict[str, torch.Tensor], steps: int, cache: bool,
                subtask: bool) -> tuple[int, int, int]:
    """(FLOPs of one chunk on the float32 model, subtask tokens generated, the FLOPs of its flow loop: with the cache,
    the part after the prefix and subtask; without it, 0, as every step encodes the prefix again). Matmuls,
    convolutions and attention count; elementwise work does not."""
    engine = Engine(model)
    noise = torch.zeros(1, model.config.horizon, model.config.action_dim, device=batch["images"].device)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    flow = 0
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        if cache:
            with torch.inference_mode():
                ids, prefix = engine.reason(batch) if subtask and model.config.subtask else \
                    (None, engine.encode_prefix(batch))
            before = counter.get_total_flops()
            engine.sample_actions(cache=prefix, steps=steps, noise=noise)
            flow = counter.get_total_flops() - before
        else:
            uncached_chunk(engine, batch, steps, noise, subtask)
    with torch.inference_mode():
        ids = engine.generate_subtask(engine.encode_prefix(batch))[0] if subtask and model.config.subtask else None
    tokens = 0 if ids is None else int((ids[0] != PAD).sum()) - 1  # after BOS
    return int(counter.get_total_flops()), tokens, int(flow)


def matmul_floor_ms(flops: int, dtype: torch.dtype, repeats: int = 20, device: torch.device | str = "cpu") -> float:
    """Milliseconds of one square matmul with `flops` FLOPs in `dtype` on `device`: the best of `repeats`
    runs, since a floor is what the machine can do, not what it did while busy."""
    device = torch.device(device)
    n = max(16, round((flops / 2) ** (1 / 3)))
    a, b = torch.randn(n, n).to(device, dtype), torch.randn(n, n).to(device, dtype)
    with torch.inference_mode():
        for _ in range(3):
            a @ b
        _sync(device)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return best * 1e3 * flops / (2 * n**3)


def cpu_name() -> str:
    """The CPU's model name where Linux tells it (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def steal_seconds() -> float | None:
    """CPU seconds the hypervisor has taken from this machine since boot, all CPUs together (/proc/stat's steal);
    None where the system does not say."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else None
    except (OSError, ValueError):
        return None


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
