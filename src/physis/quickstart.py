"""`physis quickstart`: the main job end to end (collect, train, evaluate, report), resumable at every stage.

Stages, each writing under OUT:
  1. collect  demos/ (expert demonstrations) and heldout/ (a few more, from a disjoint training-seed offset)
  2. train    run/ (checkpoints, metrics.jsonl, summary.json) for at most --minutes of wall time
  3. eval     eval/ (results.json, success.png, videos/) on held-out evaluation seeds, re-planning every k steps
  4. heads    heads/ (heads.json, world_model.png): every head of the model on the held-out demonstrations
  5. trace    trace.json: the model's subtask beside the expert's, step by step, on one evaluation seed
  6. report   results.json (the evaluation's results plus everything above) and report.html (self-contained)

OUT/stages.json records every stage with the settings it ran with. A re-run reuses a finished stage whose
settings and inputs are unchanged, continues an interrupted training run from its latest checkpoint (with
what is left of the time budget), and redoes any other interrupted stage, so Ctrl-C at any point leaves a
state the same command carries on from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from physis.eval.heads import HeadsConfig
from physis.eval.runner import EvalConfig
from physis.eval.trace import TraceConfig
from physis.model.config import PRESETS
from physis.sim.collect import COLLECTION_META, CollectConfig
from physis.train.run import TrainCommand

log = logging.getLogger(__name__)

# The tasks `small` solves most often after a short run (docs/benchmarks/model.md, re-planning every 8 steps):
# drawer-close 10/10, door-open, drawer-open and window-close 9/10, button-press-topdown 5/10.
DEFAULT_TASKS = ("drawer-close-v3", "door-open-v3", "window-close-v3", "drawer-open-v3", "button-press-topdown-v3")
HELDOUT_SEED_OFFSET = 500_000  # eval-heads demonstrations start here, far from the training demonstrations
# Rates on 2 CPU cores at 96x96, for the plan printed at the start and for --steps 0.
CPU_SAMPLES_PER_S = 45.0  # `small`, batch 32
COLLECT_EPISODES_PER_MIN = 45.0
EVAL_EPISODES_PER_MIN = 14.0
STAGES_FILE = "stages.json"
RESULTS = "results.json"
REPORT = "report.html"


@dataclass(frozen=True)
class QuickstartConfig:
    """Collect demonstrations, train, evaluate on held-out seeds and write a self-contained HTML report."""

    out: Path = Path("outputs/quickstart")  # every stage writes under here; a re-run carries on from it
    suite: str = "metaworld/mt10"  # `physis suites` lists them
    tasks: tuple[str, ...] = DEFAULT_TASKS
    episodes: int = 20  # expert demonstrations per task
    eval_episodes: int = 10  # held-out evaluation episodes per task
    minutes: float = 12.0  # training budget in wall-clock minutes (0: no limit, train --steps)
    steps: int = 0  # training steps; 0: what `small` reaches in --minutes on 2 CPU cores
    preset: str = "small"  # tiny | small | base
    device: str = "cpu"  # where training runs (cpu, cuda, ...); evaluation runs on the CPU
    batch_size: int = 32  # training
    lr: float = 4e-4  # peak learning rate (warmup, then cosine)
    image_size: int = 96  # camera images, square
    patch_size: int = 0  # image patch side; 0: the preset's (it must divide --image-size)
    horizon: int = 16  # action chunk length
    replan_every: int = 8  # evaluation: ask the model again after this many steps of each chunk (0: open loop)
    max_steps: int = 0  # evaluation and trace episode limit; 0: the suite's
    videos: int = 1  # evaluation videos per task
    heldout_episodes: int = 2  # held-out demonstrations per task for eval-heads
    heads_samples: int = 256  # frames eval-heads scores
    trace_task: str = ""  # the task of the subtask trace; empty: the first task
    workers: int = 0  # processes for collection and evaluation; 0: one per core
    train_workers: int = 2  # DataLoader worker processes for training
    save_every: int = 100  # checkpoint every N steps (what an interruption can lose)
    seed: int = 0  # training seed, and offset into the training-seed range for the demonstrations
    progress: bool = True  # progress bars with an ETA

    def train_steps(self) -> int:
        """--steps, or what `small` trains in --minutes on 2 CPU cores at --batch-size."""
        if self.steps > 0:
            return self.steps
        return max(1, math.ceil(self.minutes * 60 * CPU_SAMPLES_PER_S / self.batch_size))


@dataclass
class Plan:
    """The configuration every stage runs with (what the report's commands reproduce)."""

    demos: CollectConfig
    heldout: CollectConfig
    train: TrainCommand
    eval: EvalConfig
    heads: HeadsConfig
    trace: TraceConfig
    commands: dict[str, str] = field(default_factory=dict)


def make_plan(cfg: QuickstartConfig) -> Plan:
    """Check the settings and build each stage's configuration."""
    from physis.sim.seeds import eval_seeds
    from physis.sim.suites import resolve_tasks

    tasks = tuple(resolve_tasks(cfg.suite, list(cfg.tasks) or None))
    for name in ("episodes", "eval_episodes", "heldout_episodes", "batch_size", "image_size", "horizon",
                 "heads_samples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.minutes < 0 or cfg.steps < 0 or (cfg.minutes == 0 and cfg.steps == 0):
        raise ValueError(f"give a training budget: --minutes > 0 or --steps > 0 (got --minutes {cfg.minutes} "
                         f"--steps {cfg.steps})")
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown --preset {cfg.preset!r}; expected one of {', '.join(PRESETS)}")
    patch = cfg.patch_size or PRESETS[cfg.preset]["patch_size"]
    if cfg.image_size % patch:
        raise ValueError(f"--image-size {cfg.image_size} is not a multiple of the patch size {patch} "
                         f"({'--patch-size' if cfg.patch_size else 'preset ' + cfg.preset}); change one of them")
    trace_task = cfg.trace_task or tasks[0]
    if trace_task not in tasks:
        raise ValueError(f"--trace-task {trace_task!r} is not one of --tasks {', '.join(tasks)}")
    collect = CollectConfig(suite=cfg.suite, out=cfg.out / "demos", tasks=tasks, episodes=cfg.episodes, seed=cfg.seed,
                            image_size=cfg.image_size, workers=cfg.workers, progress=cfg.progress)
    if math.ceil(cfg.episodes * collect.max_attempts) + cfg.seed > HELDOUT_SEED_OFFSET:
        raise ValueError(f"--episodes {cfg.episodes} would draw training seeds up to the held-out offset "
                         f"{HELDOUT_SEED_OFFSET}")
    heldout = replace(collect, out=cfg.out / "heldout", episodes=cfg.heldout_episodes, seed=HELDOUT_SEED_OFFSET)
    run = cfg.out / "run"
    train = TrainCommand(data=(collect.out,), out=run, preset=cfg.preset, steps=cfg.train_steps(),
                         minutes=cfg.minutes, batch_size=cfg.batch_size, lr=cfg.lr, device=cfg.device,
                         horizon=cfg.horizon, image_size=cfg.image_size, patch_size=cfg.patch_size, seed=cfg.seed,
                         workers=cfg.train_workers,
                         warmup=min(100, max(1, cfg.train_steps() // 10)), save_every=cfg.save_every,
                         log_every=max(1, min(10, cfg.train_steps() // 50)),
                         progress=cfg.progress)
    evaluation = EvalConfig(suite=cfg.suite, out=cfg.out / "eval", tasks=tasks, episodes=cfg.eval_episodes,
                            checkpoint=run, replan_every=cfg.replan_every, workers=cfg.workers, videos=cfg.videos,
                            image_size=cfg.image_size, max_steps=cfg.max_steps, progress=cfg.progress)
    heads = HeadsConfig(checkpoint=run, data=heldout.out, out=cfg.out / "heads", samples=cfg.heads_samples,
                        batch_size=min(32, cfg.heads_samples), seed=cfg.seed, progress=cfg.progress)
    trace = TraceConfig(checkpoint=run, suite=cfg.suite, task=trace_task, seed=eval_seeds(1)[0],
                        image_size=cfg.image_size, max_steps=cfg.max_steps, progress=cfg.progress)
    plan = Plan(collect, heldout, train, evaluation, heads, trace)
    plan.commands = {
        "quickstart": command("quickstart", cfg),
        "collect": command("collect", collect, skip=("workers",)),
        "collect_heldout": command("collect", heldout, skip=("workers",)),
        "train": command("train", train, skip=("workers",)),
        "eval": command("eval", evaluation, skip=("workers",)),
        "eval_heads": command("eval-heads", heads),
    }
    return plan


def command(name: str, cfg: Any, skip: tuple[str, ...] = ()) -> str:
    """The `physis NAME ...` command line that gives `cfg` (fields left at their defaults are omitted)."""
    parts = ["physis", name]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("progress", "overwrite", *skip):
            continue
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple | list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def estimate_minutes(cfg: QuickstartConfig) -> float:
    """The whole run's wall time on 2 CPU cores, from measured rates (a plan, not a promise)."""
    tasks = len(cfg.tasks) or 10
    collect = tasks * (cfg.episodes * 1.05 + cfg.heldout_episodes) / COLLECT_EPISODES_PER_MIN
    train = cfg.minutes if cfg.minutes > 0 else cfg.train_steps() * cfg.batch_size / CPU_SAMPLES_PER_S / 60
    evaluation = tasks * cfg.eval_episodes / EVAL_EPISODES_PER_MIN
    return collect + train + evaluation + 1.5  # start-up, eval-heads, trace and report


# ---------------------------------------------------------------------------------------------------- stages


class StageLog:
    """OUT/stages.json: per stage, the settings it ran with, whether it finished, and the seconds it took."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.records: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            log.warning("%s is unreadable; every stage runs again", path)
            self.records = {}
        self.status: dict[str, dict[str, Any]] = {}  # what this invocation did: ran / resumed / reused

    def finished(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        record = self.records.get(name)
        return record if record and record.get("done") and record.get("key") == _plain(key) else None

    def begin(self, name: str, key: dict[str, Any]) -> dict[str, Any]:
        """Mark the stage as under way; time already spent on the same settings is kept (training resumes)."""
        record = self.records.get(name)
        if not record or record.get("key") != _plain(key):
            record = {"key": _plain(key), "seconds": 0.0}
        record["done"] = False
        self.records[name] = record
        self.save()
        return record

    def add_seconds(self, name: str, seconds: float) -> None:
        self.records[name]["seconds"] = round(self.records[name]["seconds"] + seconds, 2)
        self.save()

    def end(self, name: str, **extra: Any) -> dict[str, Any]:
        record = self.records[name]
        record.update(done=True, id=uuid.uuid4().hex[:12], **extra)
        self.save()
        return record

    def save(self) -> None:
        from physis.data.layout import write_json_atomic

        write_json_atomic(self.path, self.records)


def _plain(obj: Any) -> Any:
    """JSON's view of a value (tuples become lists, paths strings), so keys compare after a round trip."""
    return json.loads(json.dumps(obj, default=str))


def _cached(stages: StageLog, name: str, key: dict[str, Any], output: Path, work: Callable[[], Any],
            say: Callable[[str], None]) -> dict[str, Any]:
    """Reuse stage `name` if it finished with `key` and `output` exists; else empty `output`'s folder (the stage's
    own) and run `work`, which writes `output`."""
    record = stages.finished(name, key)
    if record is not None and output.exists():
        say(f"reusing {output} (same settings and inputs as the last run)")
        stages.status[name] = {"status": "reused", "seconds": record["seconds"]}
        return record
    if output.parent.exists():
        shutil.rmtree(output.parent)  # a partial or outdated stage is redone from scratch, never trusted
    stages.records.pop(name, None)
    stages.begin(name, key)
    start = time.perf_counter()
    try:
        work()
    finally:
        stages.add_seconds(name, time.perf_counter() - start)
    record = stages.end(name)
    stages.status[name] = {"status": "ran", "seconds": record["seconds"]}
    return record


def _collect(stages: StageLog, name: str, cfg: CollectConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """A dataset is reused when its meta/collection.json says it was collected with the same settings."""
    from physis.sim.collect import collect

    meta = cfg.out / "meta" / COLLECTION_META
    key = {k: getattr(cfg, k) for k in ("suite", "tasks", "episodes", "seed", "image_size", "max_attempts")}
    if meta.is_file():
        previous = json.loads(meta.read_text())["config"]
        if {k: previous.get(k) for k in key} == _plain(key):
            say(f"reusing the demonstrations in {cfg.out}")
            stages.status[name] = {"status": "reused", "seconds": stages.records.get(name, {}).get("seconds", 0.0)}
            return _dataset_record(meta)
        say(f"{cfg.out} was collected with other settings: collecting again")
    elif cfg.out.exists():
        say(f"{cfg.out} is incomplete (an interrupted collection): collecting again")
    stages.records.pop(name, None)
    stages.begin(name, key)
    start = time.perf_counter()
    try:
        collect(replace(cfg, overwrite=True))
    finally:
        stages.add_seconds(name, time.perf_counter() - start)
    stages.end(name)
    stages.status[name] = {"status": "ran", "seconds": stages.records[name]["seconds"]}
    return _dataset_record(meta)


def _dataset_record(meta: Path) -> dict[str, Any]:
    """The collection's summary, with an id that changes whenever the dataset is collected again."""
    raw = meta.read_bytes()
    m = json.loads(raw)
    return {"id": hashlib.sha1(raw).hexdigest()[:12], "meta": m}


def _train(stages: StageLog, cmd: TrainCommand, demos_id: str, budget_minutes: float,
           say: Callable[[str], None]) -> dict[str, Any]:
    """Train, continue an interrupted run from its latest checkpoint, or reuse a finished one."""
    from physis.train.checkpoint import latest_checkpoint
    from physis.train.run import train

    key = {"demos": demos_id, **{k: getattr(cmd, k) for k in ("preset", "steps", "batch_size", "lr", "horizon",
                                                            "image_size", "patch_size", "seed", "warmup")}}
    ckpt = latest_checkpoint(cmd.out)
    done = stages.finished("train", key)
    if done is not None and ckpt is not None and (cmd.out / "summary.json").is_file():
        say(f"reusing the trained model in {cmd.out} (step {done.get('step')})")
        stages.status["train"] = {"status": "reused", "seconds": done["seconds"]}
        return done
    previous = stages.records.get("train")
    resume = ckpt is not None and previous is not None and previous.get("key") == _plain(key)
    if not resume:
        stages.records.pop("train", None)  # the budget starts afresh with the run
        if cmd.out.exists():
            say(f"starting the training run in {cmd.out} afresh (no checkpoint, or other settings or data)")
            shutil.rmtree(cmd.out)
    record = stages.begin("train", key)
    minutes = 0.0
    if budget_minutes > 0:  # what is left of the budget; a little at least, to finish with a checkpoint
        minutes = max(budget_minutes - record["seconds"] / 60, 0.1)
    if resume:
        left = f" with {minutes:.1f} of {budget_minutes:g} minutes left" if budget_minutes > 0 else ""
        say(f"resuming training from {ckpt}{left}")
    start = time.perf_counter()
    try:
        summary = train(replace(cmd, minutes=minutes, resume=resume))
    finally:
        stages.add_seconds("train", time.perf_counter() - start)
    if summary.get("stopped_by"):  # checkpointed where it stopped; a re-run resumes from there
        raise KeyboardInterrupt(f"training stopped by {summary['stopped_by']} at step {summary['steps']}")
    record = stages.end("train", step=summary["steps"], start_step=summary["start_step"])
    stages.status["train"] = {"status": "resumed" if resume else "ran", "seconds": record["seconds"],
                              "start_step": summary["start_step"]}
    return record


# ---------------------------------------------------------------------------------------------------- the run


def run(cfg: QuickstartConfig, say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Every stage in order (each reused or resumed when it can be); returns the written results.json."""
    from physis.data.layout import write_json_atomic
    from physis.eval.curves import plot_training
    from physis.eval.heads import evaluate_heads
    from physis.eval.html import write_html_report
    from physis.eval.runner import evaluate
    from physis.eval.trace import subtask_trace

    start = time.perf_counter()
    plan = make_plan(cfg)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    stages = StageLog(out / STAGES_FILE)
    tasks = plan.demos.tasks
    say(f"physis quickstart: {len(tasks)} tasks of {cfg.suite}, {cfg.episodes} demonstrations each, "
        f"`{cfg.preset}` trained for {_budget(cfg, plan)}, {cfg.eval_episodes} held-out episodes per task; "
        f"about {estimate_minutes(cfg):.0f} min on 2 CPU cores. Results in {out}.")

    say(f"1/6 collect: {cfg.episodes} expert demonstrations per task, and {cfg.heldout_episodes} held-out ones "
        f"(training seeds from offset {HELDOUT_SEED_OFFSET}) for eval-heads")
    demos = _collect(stages, "collect", plan.demos, say)
    heldout = _collect(stages, "collect_heldout", plan.heldout, say)

    say(f"2/6 train: `{cfg.preset}` for {_budget(cfg, plan)} on {cfg.device}; Ctrl-C is safe, a re-run resumes")
    trained = _train(stages, plan.train, demos["id"], cfg.minutes, say)

    say(f"3/6 eval: {cfg.eval_episodes} held-out episodes per task, re-planning every {cfg.replan_every} steps")
    eval_key = {"train": trained["id"], **_fields(plan.eval, exclude=("workers", "progress"))}
    _cached(stages, "eval", eval_key, plan.eval.out / "results.json", lambda: evaluate(plan.eval), say)

    say(f"4/6 eval-heads: subtask, progress, world model and actions on {plan.heldout.out}")
    heads_key = {"train": trained["id"], "heldout": heldout["id"], **_fields(plan.heads, exclude=("progress",))}
    _cached(stages, "heads", heads_key, plan.heads.out / "heads.json", lambda: evaluate_heads(plan.heads), say)

    say(f"5/6 subtask trace: the expert acts on {plan.trace.task} seed {plan.trace.seed}, the model narrates")
    trace_path = out / "trace" / "trace.json"
    trace_key = {"train": trained["id"], **_fields(plan.trace, exclude=("progress",))}
    _cached(stages, "trace", trace_key, trace_path,
            lambda: write_json_atomic(trace_path, subtask_trace(plan.trace)), say)

    say("6/6 report: results.json and report.html")
    curves = plot_training(plan.train.out / "metrics.jsonl", out / "training_curves.png")
    results = _results(cfg, plan, stages, demos, heldout, trained, curves is not None, time.perf_counter() - start)
    write_json_atomic(out / RESULTS, results)
    results = json.loads((out / RESULTS).read_text())  # the report shows exactly what the file holds
    write_html_report(results, out, out / REPORT)
    return results


def _budget(cfg: QuickstartConfig, plan: Plan) -> str:
    steps = plan.train.steps
    return f"{cfg.minutes:g} min (at most {steps} steps)" if cfg.minutes > 0 else f"{steps} steps"


def _fields(cfg: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in exclude}


def _results(cfg: QuickstartConfig, plan: Plan, stages: StageLog, demos: dict[str, Any], heldout: dict[str, Any],
             trained: dict[str, Any], curves: bool, wall_s: float) -> dict[str, Any]:
    """The evaluation's results.json (video paths relative to OUT) plus a section per other stage."""
    out = cfg.out
    results = json.loads((plan.eval.out / "results.json").read_text())
    for task in results["tasks"].values():
        task["videos"] = [str(Path(plan.eval.out.name) / v) for v in task["videos"]]
    summary = json.loads((plan.train.out / "summary.json").read_text())
    heads = json.loads((plan.heads.out / "heads.json").read_text())
    if "world_model_png" in heads:
        heads["world_model_png"] = str(Path(plan.heads.out.name) / heads["world_model_png"])
    meta = demos["meta"]
    return {
        **results,
        "quickstart": {
            "config": _plain(asdict(cfg)),
            "stages": stages.status,
            "wall_s": round(wall_s, 1),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}",
            "commands": plan.commands,
        },
        "data": {
            "demos": plan.demos.out.name, "episodes": sum(t["kept"] for t in meta["expert"].values()),
            "frames": sum(t["frames"] for t in meta["expert"].values()),
            "first_train_seed": meta["first_train_seed"], "expert": meta["expert"],
            "expert_success_rate": meta["expert_success_rate"],
            "heldout": plan.heldout.out.name,
            "heldout_episodes": sum(t["kept"] for t in heldout["meta"]["expert"].values()),
            "heldout_first_seed": heldout["meta"]["first_train_seed"],
        },
        "training": {
            "preset": cfg.preset, "device": cfg.device, "steps": summary["steps"], "target_steps": plan.train.steps,
            "budget_minutes": cfg.minutes, "seconds": trained["seconds"], "batch_size": cfg.batch_size,
            "samples_per_s": summary["samples_per_s"], "final_losses": summary["final_losses"],
            "params_total": summary["params_total"], "peak_rss_mb": summary["peak_rss_mb"],
            "run": plan.train.out.name, "curves": "training_curves.png" if curves else None,
        },
        "heads": heads,
        "subtask_trace": json.loads((out / "trace" / "trace.json").read_text()),
        "report": REPORT,
    }
