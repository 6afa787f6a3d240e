"""The `physis` command: prints for people; the work happens in the package."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro
from rich.console import Console
from rich.table import Table

from physis.data.benchmark import DataBenchConfig
from physis.eval.heads import HeadsConfig
from physis.eval.runner import EvalConfig
from physis.sim.collect import CollectConfig
from physis.train.run import TrainCommand

console = Console()
_CONFIG = (tyro.conf.OmitArgPrefixes,)  # `--out DIR`, not `--cfg.out DIR`


def embodiments(name: tyro.conf.Positional[str | None] = None) -> None:
    """List the built-in embodiments, or show one (a name or a .yaml/.json spec file)."""
    from physis.embodiment import UnifiedSpace, builtin_names, load_embodiment

    if name is not None:
        spec = load_embodiment(name)
        console.print_json(json.dumps(spec.to_dict()))
        return
    specs = [load_embodiment(n) for n in builtin_names()]
    space = UnifiedSpace.for_specs(specs)
    table = Table(title=f"built-in embodiments (unified space: {space.dim} slots)")
    for col in ("name", "fps", "action", "state", "cameras"):
        table.add_column(col, no_wrap=col == "name")
    for s in specs:
        table.add_row(s.name, f"{s.fps:g}", " ".join(f"{g.name}:{g.size}" for g in s.action),
                      " ".join(f"{g.name}:{g.size}" for g in s.state),
                      " ".join(f"{c.name} {c.height}x{c.width}" for c in s.cameras))
    console.print(table)


def dataset(root: tyro.conf.Positional[Path]) -> None:
    """Load a LeRobot v3.0 / v2.1 dataset, check it, and summarize it."""
    from physis.data.reader import LeRobotDataset

    ds = LeRobotDataset(root, video_mode="seek")
    table = Table(title=str(root))
    table.add_column("feature")
    table.add_column("dtype")
    table.add_column("shape")
    for key, feat in ds.features.items():
        table.add_row(key, feat["dtype"], str(feat["shape"]))
    console.print(table)
    console.print(f"{ds.info['codebase_version']}: {len(ds.episodes)} episodes, {len(ds)} frames at "
                  f"{ds.fps:g} fps, {len(ds.tasks)} tasks" + (f", {len(ds.subtasks)} subtasks" if ds.subtasks else ""))
    if len(ds):
        sample = ds[0]
        console.print("first frame decodes: " + ", ".join(
            f"{k} {tuple(v.shape)}" for k, v in sample.items() if hasattr(v, "shape") and v.ndim >= 3))


def bench_data(cfg: DataBenchConfig) -> None:
    """Training windows per second through a torch DataLoader (2 cameras from mp4, history, chunks)."""
    from physis.data.benchmark import run

    result = run(cfg)
    table = Table(title="physis bench data: training windows per second")
    for col in ("loader", "windows/s", "windows", "seconds"):
        table.add_column(col)
    rows = {"cached": "frame cache, float32 images", "cached_uint8": "frame cache, uint8 images",
            "seek": "seek per sample, float32 images"}
    for mode, label in rows.items():
        if mode in result:
            r = result[mode]
            table.add_row(label, f"{r['windows_per_s']:.0f}", str(r["windows"]), f"{r['seconds']:.2f}")
    console.print(table)
    console.print(f"decoding the mp4 files into the frame cache took {result['decode_into_cache_s']:.1f}s; "
                  f"results in {cfg.out / 'results.json'}")


def suites(name: tyro.conf.Positional[str | None] = None) -> None:
    """List the benchmark suites, or the tasks and instructions of one."""
    from physis.sim.suites import SUITES, get_suite

    if name is None:
        table = Table(title="benchmark suites")
        for col in ("suite", "embodiment", "tasks", "description"):
            table.add_column(col, no_wrap=col == "suite")
        for s in SUITES.values():
            table.add_row(s.name, s.embodiment, str(len(s.tasks)), s.description)
        console.print(table)
        return
    suite = get_suite(name)
    table = Table(title=f"{suite.name}: {suite.description}")
    table.add_column("task", no_wrap=True)
    for t in suite.tasks:
        table.add_row(t)
    console.print(table)


def collect(cfg: CollectConfig) -> None:
    """Expert demonstrations -> a LeRobot v3.0 dataset with instructions and subtask labels."""
    from physis.sim.collect import collect as run

    summary = run(cfg)
    table = Table(title=f"physis collect {cfg.suite} -> {cfg.out}")
    for col in ("task", "kept", "expert success", "tried", "frames"):
        table.add_column(col)
    for task, t in summary.tallies.items():
        table.add_row(task, str(t.kept), f"{t.success_rate:.0%}", str(t.attempts), str(t.frames))
    console.print(table)
    console.print(f"{summary.episodes} episodes kept of {summary.attempts} tried (expert success "
                  f"{summary.expert_success_rate:.1%}) in {summary.seconds:.0f}s with {summary.workers} workers: "
                  f"{summary.episodes_per_minute:.1f} episodes/min")


def eval(cfg: EvalConfig) -> None:  # noqa: A001 -- the command is called eval
    """Run a policy on held-out seeds; writes results.json, success.png and videos/."""
    from physis.eval.runner import evaluate

    results = evaluate(cfg)
    table = Table(title=f"physis eval {cfg.suite} ({results['policy']}, {cfg.episodes} episodes per task)")
    for col in ("task", "success", "95% interval", "mean length", "errors"):
        table.add_column(col)
    for task, r in results["tasks"].items():
        lo, hi = r["ci95"]
        table.add_row(task, f"{r['successes']}/{r['episodes']}", f"{lo:.0%}-{hi:.0%}", f"{r['mean_length']:.0f}",
                      str(r["errors"]))
    console.print(table)
    for task, r in results["tasks"].items():
        for e in r["error_examples"][:1]:
            console.print(f"[yellow]{task} seed {e['seed']}[/]: {e['error']}")
    console.print(f"mean success {results['mean_success']:.1%}; {results['episodes_per_minute']:.1f} episodes/min; "
                  f"results in {Path(cfg.out) / 'results.json'}")


def train(cmd: TrainCommand) -> None:
    """Train physis on LeRobot v3.0 datasets; checkpoints in OUT/checkpoints, metrics in OUT/metrics.jsonl."""
    from physis.train.run import train as run

    s = run(cmd)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, the first process reports for all
    console.print(f"trained {s['steps']} steps ({s['params_trainable']:,} of {s['params_total']:,} parameters "
                  f"trainable) in {s['wall_s'] / 60:.1f} min: {s['samples_per_s']:.0f} samples/s, final loss "
                  f"{s['final_loss']:.4f}, peak memory {s['peak_rss_mb']:.0f} MB; checkpoint {s['checkpoint']}")


def eval_heads(cfg: HeadsConfig) -> None:
    """Every head of a checkpoint on held-out demonstrations: actions, world model vs copy, subtask, progress."""
    from physis.eval.heads import evaluate_heads

    r = evaluate_heads(cfg)
    console.print_json(json.dumps(r))


@dataclass(frozen=True)
class Quickstart:
    out: Path = Path("outputs/quickstart")
    """Where the quickstart writes its dataset and results."""
    episodes: int = 5
    """Demonstrations per task, and evaluation episodes per task."""


QUICKSTART_TASKS = ("reach-v3", "drawer-close-v3", "button-press-topdown-v3")


def quickstart(cfg: Quickstart) -> None:
    """The main job, as far as it is built: collect expert demonstrations, check them, evaluate on held-out seeds."""
    from physis.sim.collect import COLLECTION_META

    console.print(
        "[bold]physis quickstart[/bold]: collects Meta-World demonstrations with subtask labels, checks the dataset,\n"
        "evaluates the scripted expert on held-out seeds and benchmarks the data loader. Training the model\n"
        "is not built yet; this run covers what exists."
    )
    suites()
    demos = cfg.out / "demos"
    if (demos / "meta" / COLLECTION_META).is_file():
        console.print(f"reusing the demonstrations in {demos}")
    else:
        collect(CollectConfig(suite="metaworld/mt10", tasks=QUICKSTART_TASKS, episodes=cfg.episodes, out=demos,
                              overwrite=True))
    dataset(demos)
    eval(EvalConfig(suite="metaworld/mt10", tasks=QUICKSTART_TASKS, episodes=cfg.episodes, policy="expert",
                    out=cfg.out / "eval-expert"))
    cfg_bench = DataBenchConfig(out=cfg.out / "bench-data", episodes=20, batches=30, seek_batches=2)
    bench_data(cfg_bench)


def _bench_help() -> None:
    """Measured figures, printed and written as JSON: `physis bench data`."""
    tyro.extras.subcommand_cli_from_dict({"data": bench_data}, args=["--help"], prog="physis bench", config=_CONFIG)


def _user_errors() -> tuple[type[Exception], ...]:
    from physis.data.layout import DatasetFormatError
    from physis.embodiment import SpecError
    from physis.sim.suites import UnknownNameError

    return (UnknownNameError, DatasetFormatError, SpecError, FileNotFoundError, FileExistsError)


_USER_ERRORS = _user_errors()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["bench"]:
            tyro.extras.subcommand_cli_from_dict({"data": bench_data}, args=args[1:], prog="physis bench",
                                                 config=_CONFIG)
            return
        tyro.extras.subcommand_cli_from_dict(
            {"quickstart": quickstart, "collect": collect, "train": train, "eval": eval, "eval-heads": eval_heads,
             "suites": suites, "embodiments": embodiments, "dataset": dataset, "bench": _bench_help},
            args=args, prog="physis", config=_CONFIG,
            description="physis: an end-to-end foundation model for the physical world.")
    except _USER_ERRORS as e:
        if os.environ.get("PHYSIS_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
