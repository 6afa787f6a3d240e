"""`physis eval`: N held-out episodes per task, in parallel processes, into results.json, videos and a plot.

A policy returns action chunks; the runner executes each chunk open-loop, or only its first k steps
before asking again (`replan_every=k`). A checkpoint can instead run in one of the runtime's other execution
modes (`execution="ensemble"` or `"rtc"`, `physis.runtime.execution`), a chunk every k steps, through
`Policy.select_action` as on a robot. A policy that raises, or returns the wrong shape or a NaN, fails that
episode with the reason recorded; the evaluation goes on.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np

from physis.embodiment import load_embodiment
from physis.eval.chunk_trace import ChunkTrace
from physis.eval.localizer import LocalizerLog
from physis.eval.policies import as_chunk, make_policy
from physis.eval.report import TaskResult, write_report
from physis.progress import progress_bar
from physis.runtime.execution import ExecutionConfig
from physis.runtime.latch import latch_names
from physis.sim.base import EnvConfig, state_vector
from physis.sim.rollout import cached_env
from physis.sim.seeds import EVAL_SEEDS, eval_seeds, seed_ranges
from physis.sim.suites import get_suite, resolve_tasks


@dataclass
class EvalConfig:
    """What to evaluate, on what, and where the results go."""

    suite: str
    out: Path
    tasks: tuple[str, ...] = ()  # empty: every task of the suite
    episodes: int = 10  # per task
    policy: str = "expert"  # expert | random | module:factory (ignored with --checkpoint)
    checkpoint: Path | None = None
    server: str = ""  # ws://HOST:PORT of `physis serve`: evaluate what it serves, through openpi's client
    seed: int = 0  # offset into the evaluation seed range
    replan_every: int = 0  # 0: run each chunk to its end (open loop); k: ask again after k steps
    # a checkpoint's chunks run open_loop, ensembled (ACT's temporal ensembling) or by rtc (real-time chunking),
    # a new chunk every --replan-every steps
    execution: Literal["open_loop", "ensemble", "rtc"] = "open_loop"
    # a checkpoint's flow sampling temperature: the starting noise's scale (1: the learned distribution; below 1
    # leans toward its modes; 0: deterministic)
    noise_scale: float = 1.0
    # environment-state values a checkpoint's localizer reads once per episode and then holds (names from its
    # config.json env_state_names, e.g. goal_x goal_y goal_z: a goal does not move; see physis.runtime.latch)
    latch: tuple[str, ...] = ()
    # let the latched values go once the hand is within this many metres of them, and read the live estimate
    # again (0: hold for the whole episode); for an object, which stays put only until the hand reaches it
    latch_release: float = 0.0
    workers: int = 0  # 0: one per core
    videos: int = 1  # record the first N episodes of each task as mp4
    traces: int = 0  # log the first N episodes of each task chunk by chunk as JSON lines (physis.eval.chunk_trace)
    image_size: int = 96  # 0: render nothing (for policies that read only the state, like the expert)
    cameras: tuple[str, ...] = ()  # empty: the checkpoint's cameras (others: the embodiment's)
    max_steps: int = 0  # 0: the suite's episode limit
    progress: bool = True


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    length: int
    seconds: float
    error: str | None = None
    video: str | None = None
    subtasks: list[str] = field(default_factory=list)  # what the policy said it was doing, per step
    goal_distance: float | None = None  # the suite's distance to the goal after the last step, if it has one
    localizer: dict[str, Any] | None = None  # the localizer's estimates against the truth (physis.eval.localizer)


def run_episode(cfg: EvalConfig, task: str, seed: int, video: Path | None,
                trace_path: Path | None = None) -> EpisodeResult:
    """One closed-loop episode in this process (environment and policy cached per process)."""
    start = time.perf_counter()
    env_config = EnvConfig(image_size=cfg.image_size or 96, cameras=tuple(cfg.cameras) or None,
                           max_steps=cfg.max_steps or None, render=cfg.image_size > 0)
    env = cached_env(cfg.suite, task, env_config)
    frames: list[np.ndarray] = []
    subtasks: list[str] = []
    steps = 0
    distance = None
    located: LocalizerLog | None = None
    trace: ChunkTrace | None = None
    try:
        obs, _ = env.reset(seed=seed)
        policy = _policy(cfg, env)  # after the reset: experts read the episode's simulator state
        if cfg.execution != "open_loop":
            policy.execution = ExecutionConfig(cfg.execution, execute=cfg.replan_every or None)
        if cfg.checkpoint is not None and not cfg.server:
            policy.noise_scale = cfg.noise_scale
            policy.set_latch(cfg.latch, cfg.latch_release)
            policy.reset(seed=seed)  # the episode's flow noise from its seed, whichever worker runs it after what
        else:
            policy.reset()
        located = _localizer_log(policy, env)
        trace = ChunkTrace(env, getattr(policy, "env_state_names", ())) if trace_path is not None else None
        done = False
        seen = None
        while not done and cfg.execution != "open_loop":  # one action at a time, as a robot runs it
            if video is not None:
                frames.append(_tile(obs["images"]))
            action = policy.select_action(obs)
            if policy.last_output is not seen:  # a new chunk was planned from this observation
                seen = policy.last_output
                _locate(located, seen, env, obs)
                if trace is not None:
                    trace.add(steps, obs, seen, as_chunk(seen, env.embodiment.action_dim))
            obs, _, terminated, truncated, info = env.step(action)
            distance = info.get("goal_distance", distance)
            steps += 1
            subtasks.append((policy.last_output or {}).get("subtask") or "")
            done = terminated or truncated
        while not done:
            output = policy.infer(obs)
            chunk = as_chunk(output, env.embodiment.action_dim)
            _locate(located, output, env, obs)
            if trace is not None:
                trace.add(steps, obs, output, chunk)
            label = output.get("subtask") if isinstance(output, dict) else None
            n = min(len(chunk), cfg.replan_every) if cfg.replan_every > 0 else len(chunk)
            for action in chunk[:n]:
                if video is not None:
                    frames.append(_tile(obs["images"]))
                obs, _, terminated, truncated, info = env.step(action)
                distance = info.get("goal_distance", distance)
                steps += 1
                subtasks.append(label or "")
                done = terminated or truncated
                if done:
                    break
        if video is not None:
            frames.append(_tile(obs["images"]))
        error = None
    except Exception as e:  # noqa: BLE001 -- a bad policy fails its episode, not the evaluation
        error = f"{type(e).__name__}: {e}"
        located = None
    if video is not None and frames:
        _write_video(video, frames, env.embodiment.fps)
    success = env.success and error is None
    if trace_path is not None and trace is not None:
        trace.write(trace_path, {"task": task, "seed": seed, "success": bool(success), "length": steps,
                                 "error": error})
    return EpisodeResult(task, seed, bool(success), steps, time.perf_counter() - start, error,
                         str(video) if video is not None and frames else None, subtasks,
                         None if distance is None else round(float(distance), 4),
                         located.summary() if located is not None else None)


def _localizer_log(policy: Any, env: Any) -> LocalizerLog | None:
    """A log of the policy's environment-state estimates, where it makes them and the simulator can check them."""
    names = getattr(policy, "env_state_names", ())
    truth = get_suite(env.suite).environment_state
    return LocalizerLog(names, truth, env.embodiment) if names and truth else None


def _locate(log: LocalizerLog | None, output: Any, env: Any, obs: dict[str, Any]) -> None:
    """Score a chunk's estimate (output["env_state"]) against the simulator at the observation it was made from."""
    if log is None or not isinstance(output, dict) or output.get("env_state") is None:
        return
    log.add(np.asarray(output["env_state"]), env.environment_state(), state_vector(obs, env.embodiment))


_POLICIES: dict[tuple[str, ...], Any] = {}


def _policy(cfg: EvalConfig, env) -> Any:
    key = (cfg.policy, str(cfg.checkpoint), cfg.server, env.suite, env.task)
    if key not in _POLICIES:
        _POLICIES[key] = make_policy(cfg.policy, env, cfg.checkpoint, cfg.server)
    return _POLICIES[key]


def checkpoint_meta(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json (a run directory reads its latest checkpoint's)."""
    from physis.train.checkpoint import latest_checkpoint

    path = Path(checkpoint)
    if not (path / "config.json").exists():
        path = latest_checkpoint(path) or path
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"checkpoint {checkpoint}: no readable config.json ({e})") from e


def checkpoint_cameras(checkpoint: str | Path, embodiment: str) -> tuple[str, ...]:
    """The cameras a checkpoint was trained on for `embodiment` (its config.json), so an evaluation renders
    them without being told; () when the checkpoint never saw that embodiment (the policy then names the
    mismatch)."""
    return tuple(checkpoint_meta(checkpoint).get("cameras", {}).get(embodiment, ()))


def _tile(images: dict[str, np.ndarray]) -> np.ndarray:
    """Cameras side by side, upscaled by an integer factor to at least 192 px tall for viewing."""
    tile = np.concatenate(list(images.values()), axis=1)
    k = max(1, -(-192 // tile.shape[0]))
    tile = tile.repeat(k, 0).repeat(k, 1)
    return tile[: tile.shape[0] // 2 * 2, : tile.shape[1] // 2 * 2]  # yuv420p needs even sizes


def _write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    from physis.data.video import EncoderConfig, VideoEncoder

    h, w, _ = frames[0].shape
    enc = VideoEncoder(path, fps=max(1, int(round(min(fps, 30)))), height=h, width=w,
                       config=EncoderConfig(codec="libx264", gop=30, crf=23, preset="veryfast"))
    for f in frames:
        enc.add(f)
    enc.close()


def _limit_threads(threads: int) -> None:
    """Worker processes share the cores: each model gets its share instead of all of them (oversubscription)."""
    import torch

    torch.set_num_threads(threads)


def rendered_cameras(cfg: EvalConfig) -> list[str]:
    """The cameras an evaluation renders: the chosen ones, else the embodiment's; none without images."""
    if cfg.image_size == 0:
        return []
    return list(cfg.cameras) or [c.name for c in load_embodiment(get_suite(cfg.suite).embodiment).cameras]


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation and write `results.json`, `success.png` and `videos/` under `cfg.out`."""
    tasks = resolve_tasks(cfg.suite, list(cfg.tasks) or None)
    if cfg.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {cfg.episodes}")
    if cfg.image_size < 0:
        raise ValueError(f"--image-size must be >= 0, got {cfg.image_size}")
    if cfg.replan_every < 0:
        raise ValueError(f"--replan-every must be >= 0, got {cfg.replan_every}")
    if cfg.execution != "open_loop" and (cfg.checkpoint is None or cfg.server):
        raise ValueError(f"--execution {cfg.execution} runs a checkpoint's Policy in process: pass --checkpoint "
                         "(and no --server)")
    if not (cfg.noise_scale >= 0 and math.isfinite(cfg.noise_scale)):
        raise ValueError(f"--noise-scale must be a finite number >= 0, got {cfg.noise_scale}")
    if cfg.noise_scale != 1.0 and (cfg.checkpoint is None or cfg.server):
        raise ValueError("--noise-scale scales a checkpoint's flow noise in process: pass --checkpoint "
                         "(and no --server)")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {cfg.checkpoint} does not exist")
    if cfg.latch:
        if cfg.checkpoint is None or cfg.server:
            raise ValueError("--latch holds a checkpoint's localizer estimate in process: pass --checkpoint "
                             "(and no --server)")
        meta = checkpoint_meta(cfg.checkpoint)
        if not meta.get("model", {}).get("localizer"):
            raise ValueError(f"--latch holds a localizer's estimate; checkpoint {cfg.checkpoint} has none (train it "
                             "with --localizer)")
        latch_names(cfg.latch, meta.get("env_state_names") or [])
    if not (cfg.latch_release >= 0 and math.isfinite(cfg.latch_release)):
        raise ValueError(f"--latch-release must be a finite number of metres >= 0, got {cfg.latch_release}")
    if cfg.traces < 0:
        raise ValueError(f"--traces must be >= 0 (episodes per task to log chunk by chunk), got {cfg.traces}")
    if cfg.latch_release and not cfg.latch:
        raise ValueError("--latch-release lets latched values go: name them with --latch")
    if cfg.checkpoint is not None and not cfg.cameras:
        cfg = replace(cfg, cameras=checkpoint_cameras(cfg.checkpoint, get_suite(cfg.suite).embodiment))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = eval_seeds(cfg.episodes, cfg.seed)
    videos = cfg.videos if cfg.image_size > 0 else 0
    jobs = [(t, s, (out / "videos" / f"{t.replace('/', '_')}_seed{s}.mp4") if i < videos else None,
             (out / "traces" / f"{t.replace('/', '_')}_seed{s}.jsonl") if i < cfg.traces else None)
            for t in tasks for i, s in enumerate(seeds)]
    workers = max(1, min(cfg.workers or os.cpu_count() or 1, len(jobs)))
    results: list[EpisodeResult] = []

    progress = progress_bar("eval", "success", cfg.progress)
    start = time.perf_counter()
    with progress:
        bar = progress.add_task(cfg.suite, total=len(jobs), success="-")

        def record(r: EpisodeResult) -> None:
            results.append(r)
            progress.update(bar, advance=1, success=f"{sum(x.success for x in results)}/{len(results)}")

        if workers == 1:
            for t, s, v, tr in jobs:
                record(run_episode(cfg, t, s, v, tr))
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_limit_threads,
                                     initargs=(threads,)) as pool:
                pending: dict[Future, tuple[str, int]] = {pool.submit(run_episode, cfg, t, s, v, tr): (t, s)
                                                          for t, s, v, tr in jobs}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        t, s = pending.pop(f)
                        try:
                            record(f.result())
                        except Exception as e:  # noqa: BLE001 -- e.g. a worker that died
                            record(EpisodeResult(t, s, False, 0, 0.0, f"worker failed: {type(e).__name__}: {e}"))
    seconds = time.perf_counter() - start
    per_task = {t: TaskResult.from_episodes(sorted((r for r in results if r.task == t), key=lambda r: r.seed))
                for t in tasks}
    meta = {
        "suite": cfg.suite,
        "checkpoint": str(cfg.checkpoint) if cfg.checkpoint is not None else cfg.server or cfg.policy,
        "policy": "server" if cfg.server else "checkpoint" if cfg.checkpoint is not None else cfg.policy,
        "episodes_per_task": cfg.episodes,
        "seed": EVAL_SEEDS[cfg.seed],
        "seed_offset": cfg.seed,
        "seed_ranges": seed_ranges(),
        "replan_every": cfg.replan_every,
        "execution": cfg.execution,
        "noise_scale": cfg.noise_scale,
        "latch": list(cfg.latch),
        "latch_release": cfg.latch_release,
        "traces": cfg.traces,
        "image_size": cfg.image_size,
        "cameras": rendered_cameras(cfg),
        "max_steps": cfg.max_steps or None,
        "workers": workers,
        "seconds": round(seconds, 2),
        "episodes_per_minute": round(60 * len(results) / max(seconds, 1e-9), 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}",
        "command": " ".join(["physis", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("physis") else None,
    }
    return write_report(out, meta, per_task)
