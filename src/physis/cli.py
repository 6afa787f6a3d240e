"""The `physis` command: prints for people; the work happens in the package."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import tyro
from rich.console import Console
from rich.table import Table

from physis.data.benchmark import DataBenchConfig
from physis.eval.heads import HeadsConfig
from physis.eval.runner import EvalConfig
from physis.quickstart import QuickstartConfig
from physis.runtime.bench_latency import LatencyBenchConfig
from physis.runtime.bench_serve import ServeBenchConfig
from physis.runtime.server import ServeConfig, ServeError
from physis.sim.collect import CollectConfig
from physis.train.benchmark import TrainBenchConfig
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


def bench_train(cfg: TrainBenchConfig) -> None:
    """Training samples per second of a `physis train` configuration: the step, the loader, the operations."""
    from physis.train.benchmark import run

    r = run(cfg)
    console.print(f"[bold]physis bench train[/]: {r['parameters']:,} parameters, batch {r['batch_size']}, "
                  f"{r['machine']['torch_threads']} threads", highlight=False)
    console.print(f"optimizer step p50 {r['step_ms']['p50']:.0f} ms (min {r['step_ms']['min']:.0f}, max "
                  f"{r['step_ms']['max']:.0f}): [bold]{r['samples_per_s']:.1f} samples/s[/]; the loader alone "
                  f"{r['loader_samples_per_s']:.0f} samples/s; peak memory {r['peak_rss_mb']:,.0f} MB", highlight=False)
    if "operations" in r:
        table = Table(title="where a step goes (self CPU time)")
        for col in ("operation", "calls/step", "ms/step", "share"):
            table.add_column(col, justify="left" if col == "operation" else "right")
        for op in r["operations"]:
            table.add_row(op["name"], f"{op['calls_per_step']:.0f}", f"{op['ms_per_step']:.1f}", f"{op['share']:.0%}")
        console.print(table)
    console.print(f"results in {cfg.out / 'results.json'}")


def bench_serve(cfg: ServeBenchConfig) -> None:
    """The policy server under load from openpi's client: round trips, throughput, batching, overhead."""
    from physis.runtime.bench_serve import run

    r = run(cfg)
    table = Table(title=f"physis bench serve: {cfg.clients} clients x {cfg.requests} requests")
    for col in ("ms", "p50", "p90", "p99", "mean"):
        table.add_column(col)
    for key, label in (("round_trip_ms", "round trip"), ("infer_ms", "model (batch)"),
                       ("overhead_ms", "round trip - model"), ("queue_ms", "waiting for a batch")):
        if r[key]:
            table.add_row(label, *(f"{r[key][q]:.1f}" for q in ("p50", "p90", "p99", "mean")))
    console.print(table)
    console.print(f"{r['requests_ok']} answered, {r['errors']} errors, {r['throughput_rps']:.1f} requests/s, mean "
                  f"batch {r['batch_size']['mean']:.2f} (max {r['batch_size']['max']}), server exit code "
                  f"{r['server_exit_code']}; results in {cfg.out / 'results.json'}")
    console.print(f"the server process used {r['server_cpu_s']:.1f} CPU-s in all; 1-min load average "
                  f"{r['load_average_1min']['before']:.1f} before, {r['load_average_1min']['after']:.1f} after")
    for e in r["error_examples"]:
        console.print(f"[yellow]error:[/] {e}", highlight=False)


def bench_latency(cfg: LatencyBenchConfig) -> None:
    """Milliseconds per action chunk at batch 1: presets x flow steps x prefix cache x backends, vs a FLOP floor."""
    from physis.runtime.bench_latency import run

    r = run(cfg)
    pause = f", {cfg.pause_ms:g} ms idle before each chunk" if cfg.pause_ms else ""
    table = Table(title=f"physis bench latency: ms per chunk, batch 1, {r['threads']} threads{pause}")
    for col in ("preset", "backend", "steps", "cache", "p50", "p90", "p99", "GFLOP", "floor ms", "x floor"):
        table.add_column(col, justify="left" if col in ("preset", "backend") else "right")
    for x in r["results"]:
        table.add_row(x["preset"], x["backend"], str(x["steps"]), "on" if x["cache"] else "off",
                      f"{x['p50_ms']:.1f}", f"{x['p90_ms']:.1f}", f"{x['p99_ms']:.1f}", f"{x['gflop']:.2f}",
                      f"{x['floor_ms']:.1f}", f"{x['ratio_to_floor']:.1f}")
    console.print(table, width=max(console.width, 100))  # backend names stay whole in a narrow terminal
    for s in r["skipped"]:
        if "steps" not in s:  # a backend that could not be built; uncached onnx/compile rows are skipped by design
            console.print(f"[yellow]skipped {s['preset']} {s['backend']}:[/] {s['reason']}", highlight=False)
    machine = r["machine"]
    if machine.get("steal_s"):  # a shared virtual machine: its host ran something else on these CPUs meanwhile
        console.print(f"the hypervisor took {machine['steal_s']:.2f} CPU-s from this machine during the "
                      f"{machine['timing_s']:.1f} s of timing (steal): on a shared machine, compare runs with little "
                      "of it", highlight=False)
    console.print(f"results in {cfg.out / 'results.json'}")


def serve(cfg: ServeConfig) -> None:
    """Serve a checkpoint over websocket (openpi's msgpack-numpy protocol) until Ctrl-C or SIGTERM."""
    from physis.runtime.server import PolicyServer, server_from_config

    def ready(server: PolicyServer) -> None:
        auth = "an API key" if server.api_key else "no API key"
        console.print(f"serving {server.spec['embodiment']} from {cfg.checkpoint} on ws://{server.host}:{server.port} "
                      f"(backend {server.policy.engine.backend}; {auth}; health check at /healthz); Ctrl-C stops",
                      highlight=False)

    server = server_from_config(cfg)
    try:
        server.run(on_ready=ready)
    except OSError as e:  # most often: the port is taken
        raise ServeError(f"cannot serve on {cfg.host}:{cfg.port}: {e}") from None


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
    who = "driver" if cfg.driver is not None else "expert"  # --driver: a policy moved the robot, not the expert
    for col in ("task", "kept", f"{who} success", "tried", "frames"):
        table.add_column(col)
    openings = cfg.max_frames > 0  # episodes cut short: whether the expert would have succeeded is not known
    for task, t in summary.tallies.items():
        table.add_row(task, str(t.kept), "-" if openings else f"{t.success_rate:.0%}", str(t.attempts), str(t.frames))
    console.print(table)
    success = f"the first {cfg.max_frames} frames of each" if openings else \
        f"{who} success {summary.expert_success_rate:.1%}"
    console.print(f"{summary.episodes} episodes kept of {summary.attempts} tried ({success}) in "
                  f"{summary.seconds:.0f}s with {summary.workers} workers: "
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
    if s.get("stopped_by"):
        console.print(f"[yellow]stopped by {s['stopped_by']}[/] at step {s['steps']} of {cmd.steps}: the same command "
                      "with --resume carries on", highlight=False)
        raise SystemExit(128 + signal.SIGTERM)


def eval_heads(cfg: HeadsConfig) -> None:
    """Every head of a checkpoint on held-out demonstrations: actions, world model vs copy, subtask, progress."""
    from physis.eval.heads import evaluate_heads

    r = evaluate_heads(cfg)
    console.print_json(json.dumps(r))


def quickstart(cfg: QuickstartConfig) -> None:
    """The main job: collect demonstrations, train, evaluate on held-out seeds, write report.html (re-runs resume)."""
    from physis.quickstart import REPORT, run

    try:
        r = run(cfg, say=lambda text: console.print(text, highlight=False))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: run the same command again to carry on where it stopped")
        raise SystemExit(130) from None
    table = Table(title=f"physis quickstart: {r['suite']}, {r['episodes_per_task']} held-out episodes per task")
    for col in ("task", "success", "95% interval"):
        table.add_column(col)
    for task, t in r["tasks"].items():
        table.add_row(task, f"{t['successes']}/{t['episodes']}", f"{t['ci95'][0]:.0%}-{t['ci95'][1]:.0%}")
    console.print(table)
    console.print(f"mean success {r['mean_success']:.1%}; whole run {r['quickstart']['wall_s'] / 60:.1f} min; "
                  f"open {cfg.out / REPORT}", highlight=False)


# `physis bench NAME`
BENCHES = {"data": bench_data, "train": bench_train, "serve": bench_serve, "latency": bench_latency}


def _bench_help() -> None:
    """Measured figures, printed and written as JSON: `physis bench data|train|serve|latency`."""
    tyro.extras.subcommand_cli_from_dict(BENCHES, args=["--help"], prog="physis bench", config=_CONFIG)


def _user_errors() -> tuple[type[Exception], ...]:
    from physis.data.layout import DatasetFormatError
    from physis.embodiment import SpecError
    from physis.runtime.policy import CheckpointMismatchError
    from physis.sim.suites import UnknownNameError
    from physis.train.checkpoint import CheckpointError
    from physis.train.run import TrainSetupError

    return (UnknownNameError, DatasetFormatError, SpecError, FileNotFoundError, FileExistsError, CheckpointError,
            CheckpointMismatchError, ServeError, TrainSetupError)


_USER_ERRORS = _user_errors()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["bench"]:
            tyro.extras.subcommand_cli_from_dict(BENCHES, args=args[1:], prog="physis bench",
                                                 config=_CONFIG)
            return
        tyro.extras.subcommand_cli_from_dict(
            {"quickstart": quickstart, "collect": collect, "train": train, "eval": eval, "eval-heads": eval_heads,
             "serve": serve, "suites": suites, "embodiments": embodiments, "dataset": dataset, "bench": _bench_help},
            args=args, prog="physis", config=_CONFIG,
            description="physis: an end-to-end foundation model for the physical world.")
    except _USER_ERRORS as e:
        if os.environ.get("PHYSIS_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
