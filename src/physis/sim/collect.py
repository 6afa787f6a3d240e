"""`physis collect`: expert rollouts -> a LeRobot v3.0 dataset with instructions and subtask labels.

Episodes run in worker processes; results are written in a fixed order (task, then seed), so the same
command gives the same dataset. By default only successful demonstrations are kept: a task whose
expert fails on a seed gets a fresh seed, up to `max_attempts` per kept episode. Seeds come from the
training range only; `meta/collection.json` records every seed tried, the expert's success rate per
task and both seed ranges, so anyone can check that no evaluation seed was ever a demonstration.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

from physis.data.layout import COLLECTION_META
from physis.data.video import EncoderConfig
from physis.data.writer import DatasetWriter
from physis.embodiment import EmbodimentSpec, load_embodiment
from physis.progress import progress_bar
from physis.sim.base import EnvConfig
from physis.sim.rollout import ExpertEpisode, expert_episode_job
from physis.sim.seeds import TRAIN_SEEDS, seed_ranges, train_seeds
from physis.sim.suites import get_suite, resolve_tasks


@dataclass
class CollectConfig:
    """What to collect and where."""

    suite: str
    out: Path
    tasks: tuple[str, ...] = ()  # empty: every task of the suite
    episodes: int = 50  # episodes kept per task
    seed: int = 0  # offset into the training seed range
    image_size: int = 96
    cameras: tuple[str, ...] = ()  # empty: the embodiment's cameras
    workers: int = 0  # 0: one per core
    keep_failures: bool = False  # also keep episodes where the expert failed
    max_attempts: float = 3.0  # give up on a task after episodes * max_attempts seeds
    paraphrase: bool = True  # a random paraphrase of the instruction per episode
    overwrite: bool = False
    progress: bool = True
    codec: Literal["av1", "h264"] = "av1"  # h264: libx264 (SVT-AV1 can stall for good when cores are oversubscribed)
    # the encoder's constant rate factor; None: the codec's default (av1 30, h264 23). h264 at 0 stores the frames'
    # YUV samples losslessly (colour is still subsampled 2x2, as in every LeRobot video)
    crf: int | None = None
    # DART: run the expert's action plus Gaussian noise of this std (a fraction of each action's half-range) and
    # record the expert's own action, so the data shows how to recover from small errors (0: off)
    action_noise: float = 0.0
    start_noise: float = 0.0  # Meta-World: each episode's hand starts up to this many metres (per axis) off home
    # > 0: record only each episode's first N frames (its opening: the frames where a policy must find the goal
    # in the pixels). The expert is not run on, so success is unknown: every opening is kept, and training
    # gives these episodes no progress target (their length is not the task's)
    max_frames: int = 0
    # DAgger: this checkpoint (a run directory or one checkpoint) moves the robot, asked every `replan_every`
    # steps, while each frame is labelled with the expert's action in that state; every episode is kept, and the
    # tallies count the driver's successes. Train on these episodes together with the expert's own
    driver: Path | None = None
    replan_every: int = 8  # --driver: the steps of each chunk run before the driver is asked again

    def encoder(self) -> EncoderConfig:
        """AV1 (SVT, LeRobot's default) or H.264, both with a keyframe every 2 frames for cheap random access."""
        if self.codec == "h264":
            return EncoderConfig(codec="libx264", gop=2, crf=23 if self.crf is None else self.crf, preset="veryfast")
        return EncoderConfig() if self.crf is None else EncoderConfig(crf=self.crf)


@dataclass
class TaskTally:
    attempts: int = 0
    successes: int = 0
    kept: int = 0
    frames: int = 0
    seeds_tried: list[int] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.successes / self.attempts if self.attempts else 0.0


@dataclass
class CollectSummary:
    out: Path
    suite: str
    tallies: dict[str, TaskTally]
    seconds: float
    workers: int

    @property
    def episodes(self) -> int:
        return sum(t.kept for t in self.tallies.values())

    @property
    def attempts(self) -> int:
        return sum(t.attempts for t in self.tallies.values())

    @property
    def expert_success_rate(self) -> float:
        return sum(t.successes for t in self.tallies.values()) / max(1, self.attempts)

    @property
    def episodes_per_minute(self) -> float:
        return 60.0 * self.attempts / max(self.seconds, 1e-9)


def _features(spec: EmbodimentSpec, cameras: tuple[str, ...], hw: tuple[int, int],
              environment_state: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    feats: dict[str, dict[str, Any]] = {
        "observation.state": {"dtype": "float32", "shape": [spec.state_dim], "names": spec.state_names},
        "action": {"dtype": "float32", "shape": [spec.action_dim], "names": spec.action_names},
    }
    if environment_state:
        feats["observation.environment_state"] = {"dtype": "float32", "shape": [len(environment_state)],
                                                  "names": list(environment_state)}
    for cam in cameras:
        feats[f"observation.images.{cam}"] = {"dtype": "video", "shape": [hw[0], hw[1], 3], "names": None}
    return feats


def _run_in_order(executor: Executor, jobs: list[tuple[str, int]], suite: str, env_config: EnvConfig,
                  action_noise: float = 0.0, environment_state: bool = False,
                  max_frames: int = 0, driver: str | None = None, replan_every: int = 8) -> Iterator[ExpertEpisode]:
    """Submit every job, yield results in submission order (a bounded window keeps memory small)."""
    window = 4 * max(1, getattr(executor, "_max_workers", 1))
    pending: list[Future] = []
    for task, seed in jobs:
        pending.append(executor.submit(expert_episode_job, suite, task, seed, env_config, action_noise,
                                       environment_state, max_frames, driver, replan_every))
        if len(pending) >= window:
            yield pending.pop(0).result()
    while pending:
        yield pending.pop(0).result()


def _limit_threads(threads: int) -> None:
    """A worker's torch threads (0: leave them; only a driving policy uses torch)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


class _InlineExecutor(Executor):
    """Runs jobs in this process (one worker): no spawn cost, easier to debug."""

    _max_workers = 1

    def submit(self, fn, /, *args, **kwargs) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 -- delivered through the future like a pool would
            f.set_exception(e)
        return f


def collect(cfg: CollectConfig) -> CollectSummary:
    """Roll out the suite's expert and write the dataset; returns per-task tallies."""
    suite = get_suite(cfg.suite)
    tasks = resolve_tasks(cfg.suite, list(cfg.tasks) or None)
    if cfg.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {cfg.episodes}")
    if cfg.max_attempts < 1:
        raise ValueError(f"--max-attempts must be >= 1, got {cfg.max_attempts}")
    if not (cfg.action_noise >= 0 and math.isfinite(cfg.action_noise)):
        raise ValueError(f"--action-noise must be >= 0 (a fraction of each action's half-range), got "
                         f"{cfg.action_noise}")
    if not (cfg.start_noise >= 0 and math.isfinite(cfg.start_noise)):
        raise ValueError(f"--start-noise must be >= 0 metres, got {cfg.start_noise}")
    if cfg.crf is not None and not 0 <= cfg.crf <= (51 if cfg.codec == "h264" else 63):
        raise ValueError(f"--crf for {cfg.codec} must be within 0..{51 if cfg.codec == 'h264' else 63}, got {cfg.crf}")
    if cfg.max_frames < 0:
        raise ValueError(f"--max-frames must be 0 (whole episodes) or a number of frames, got {cfg.max_frames}")
    if cfg.driver is not None:
        if not Path(cfg.driver).exists():
            raise FileNotFoundError(f"--driver checkpoint {cfg.driver} does not exist")
        if cfg.replan_every < 1:
            raise ValueError(f"--replan-every must be >= 1 step, got {cfg.replan_every}")
        if cfg.action_noise or cfg.max_frames:
            raise ValueError("--driver moves the robot with a policy: it does not combine with --action-noise or "
                             "--max-frames")
    if cfg.start_noise and not cfg.suite.startswith("metaworld/"):
        raise ValueError(f"--start-noise is implemented for the Meta-World suites, not {cfg.suite}")
    spec = load_embodiment(suite.embodiment)
    env_config = EnvConfig(image_size=cfg.image_size, cameras=tuple(cfg.cameras) or None, paraphrase=cfg.paraphrase,
                           start_noise=cfg.start_noise)
    cameras = env_config.cameras or tuple(c.name for c in spec.cameras)
    budget = math.ceil(cfg.episodes * cfg.max_attempts)
    seeds = train_seeds(budget, cfg.seed)  # raises if the range is exhausted
    tallies = {t: TaskTally() for t in tasks}
    next_seed = dict.fromkeys(tasks, 0)
    workers = cfg.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks) * cfg.episodes))
    episode_log: list[dict[str, Any]] = []

    driver = str(cfg.driver) if cfg.driver is not None else None
    who = "driver" if driver else "expert"
    progress = progress_bar("collect", who, cfg.progress)
    start = time.perf_counter()
    # a driving policy per worker gets its share of the cores, not all of them each
    executor: Executor = (_InlineExecutor() if workers == 1
                          else ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_limit_threads,
                                                   initargs=(max(1, (os.cpu_count() or 1) // workers) if driver
                                                             else 0,)))
    features = _features(spec, cameras, env_config.hw, suite.environment_state)
    writer = DatasetWriter.create(cfg.out, fps=int(round(spec.fps)), features=features,
                                  robot_type=spec.name, subtasks=True, overwrite=cfg.overwrite,
                                  encoder=cfg.encoder())
    try:
        with writer, executor, progress:
            bar = progress.add_task(cfg.suite, total=len(tasks) * cfg.episodes, **{who: "-"})
            # Rounds: ask every unfinished task for the episodes it still needs, on fresh seeds.
            while True:
                jobs = []
                for t in tasks:
                    need = cfg.episodes - tallies[t].kept
                    take = min(need, budget - next_seed[t])
                    jobs += [(t, seeds[next_seed[t] + i]) for i in range(take)]
                    next_seed[t] += take
                if not jobs:
                    break
                for ep in _run_in_order(executor, jobs, cfg.suite, env_config, cfg.action_noise,
                                        bool(suite.environment_state), cfg.max_frames, driver, cfg.replan_every):
                    tally = tallies[ep.task]
                    tally.attempts += 1
                    tally.successes += ep.success
                    tally.seeds_tried.append(ep.seed)
                    entry = {"task": ep.task, "seed": ep.seed, "success": ep.success, "length": ep.length,
                             "instruction": ep.instruction, "episode_index": None}
                    keep = ep.success or cfg.keep_failures or cfg.max_frames > 0 or driver is not None
                    if keep and tally.kept < cfg.episodes:
                        entry["episode_index"] = writer.add_episode(ep.frames, ep.instruction, subtasks=ep.subtasks)
                        tally.kept += 1
                        tally.frames += ep.length
                        progress.advance(bar)
                    episode_log.append(entry)
                    done = sum(x.successes for x in tallies.values())
                    tried = sum(x.attempts for x in tallies.values())
                    progress.update(bar, **{who: f"{done}/{tried} ok"})
            seconds = time.perf_counter() - start
            summary = CollectSummary(Path(cfg.out), cfg.suite, tallies, seconds, workers)
            writer.write_meta_json(COLLECTION_META, _collection_meta(cfg, spec, cameras, summary, episode_log))
            writer.write_meta_json("embodiment.json", spec.to_dict())  # the dataset says which robot made it
    except BaseException:
        if isinstance(executor, ProcessPoolExecutor):
            executor.shutdown(wait=False, cancel_futures=True)
        raise
    return summary


def _collection_meta(cfg: CollectConfig, spec: EmbodimentSpec, cameras: tuple[str, ...], summary: CollectSummary,
                     episodes: list[dict[str, Any]]) -> dict[str, Any]:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {
        "suite": cfg.suite,
        "embodiment": spec.name,
        "cameras": list(cameras),
        "config": config,
        "seed_ranges": seed_ranges(),
        "seed_split": "train",
        "train_seed_offset": cfg.seed,
        "first_train_seed": TRAIN_SEEDS[cfg.seed],
        "expert": {t: {"attempts": x.attempts, "successes": x.successes, "success_rate": x.success_rate,
                       "kept": x.kept, "frames": x.frames} for t, x in summary.tallies.items()},
        "expert_success_rate": summary.expert_success_rate,
        # with --driver the episodes' moves (and the successes above) are that policy's; the actions the expert's
        "driver": str(cfg.driver) if cfg.driver is not None else None,
        "seconds": summary.seconds,
        "workers": summary.workers,
        "episodes": episodes,
    }
