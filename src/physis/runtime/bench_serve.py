"""`physis bench serve`: the policy server under load from openpi's own client.

Starts `physis serve` in a separate process on a free loopback port, waits for `/healthz`, then runs
N client threads, each holding one `openpi_client.WebsocketClientPolicy` and sending M observations
(`example_observation` of the checkpoint) one after another, as a robot's control loop does. Reports
round-trip percentiles, throughput, errors, the batch sizes the server formed, and the server's
overhead above model time (round trip minus the server's `infer_ms` for the batch the request rode in).
Finally the server is sent SIGTERM and must exit cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from physis.runtime.schema import example_observation


@dataclass(frozen=True)
class ServeBenchConfig:
    checkpoint: Path
    """The run (or step) directory to serve."""
    clients: int = 4
    """Concurrent clients, one connection each."""
    requests: int = 50
    """Timed requests per client."""
    warmup: int = 3
    """Untimed requests per client before the clock starts."""
    flow_steps: int | None = None
    backend: str = "eager"
    """The server's inference backend (physis.runtime.backends), as `physis serve --backend`."""
    max_batch: int = 8
    batch_window_ms: float = 2.0
    out: Path = Path("outputs/bench-serve")
    """Where results.json and the server's log go."""
    startup_timeout_s: float = 300.0
    """How long the server may take to load the checkpoint and answer /healthz (and to exit after SIGTERM)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(cfg: ServeBenchConfig, port: int, log_file: Any) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "physis.cli", "serve", "--checkpoint", str(cfg.checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(cfg.max_batch), "--batch-window-ms", str(cfg.batch_window_ms),
           "--backend", cfg.backend]
    if cfg.flow_steps is not None:
        cmd += ["--flow-steps", str(cfg.flow_steps)]
    env = {k: v for k, v in os.environ.items() if k != "PHYSIS_API_KEY"}  # loopback, no key
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + cfg.startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before listening; see {log_file.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"the server did not answer /healthz within {cfg.startup_timeout_s}s; see {log_file.name}")


def _client(port: int, obs: dict, cfg: ServeBenchConfig, barrier: threading.Barrier, rows: list, errors: list) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    try:
        client = WebsocketClientPolicy("127.0.0.1", port)
        for _ in range(cfg.warmup):
            client.infer(obs)
    except Exception as e:
        errors.append(f"connect/warm-up: {type(e).__name__}: {e}")
        barrier.abort()
        return
    barrier.wait()
    for _ in range(cfg.requests):
        start = time.perf_counter()
        try:
            reply = client.infer(obs)
        except Exception as e:  # counted, and the loop goes on: the server should keep serving
            errors.append(f"{type(e).__name__}: {e}")
            continue
        rtt = (time.perf_counter() - start) * 1000
        timing = reply["server_timing"]
        rows.append((rtt, timing["infer_ms"], timing["batch_size"], timing.get("queue_ms", 0.0)))
    client._ws.close()  # openpi's client has no close(); its connection is this attribute


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _pct(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(values.mean()),
            "max": float(values.max())}


def run(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Run the benchmark; writes cfg.out/results.json and returns the same dict."""
    try:
        import openpi_client  # noqa: F401 - the reference client is the point of this benchmark
    except ImportError as e:
        raise ImportError("physis bench serve drives the server with openpi's client: pip install openpi-client "
                          "(with --no-deps on numpy 2)") from e
    if cfg.clients < 1 or cfg.requests < 1:
        raise ValueError(f"need at least one client and one request, got {cfg.clients} and {cfg.requests}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    obs = example_observation(cfg.checkpoint)
    port = _free_port()
    load_before = os.getloadavg()
    cpu_before = _children_cpu_s()
    with open(cfg.out / "server.log", "w") as log_file:
        proc = _start_server(cfg, port, log_file)
        try:
            rows: list[tuple[float, float, int, float]] = []
            errors: list[str] = []
            barrier = threading.Barrier(cfg.clients + 1)
            threads = [threading.Thread(target=_client, args=(port, obs, cfg, barrier, rows, errors))
                       for _ in range(cfg.clients)]
            for t in threads:
                t.start()
            with contextlib.suppress(threading.BrokenBarrierError):  # a client failed to connect; it said why
                barrier.wait(timeout=cfg.startup_timeout_s)
            start = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(timeout=cfg.startup_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = None
    data = np.array(rows, dtype=np.float64).reshape(-1, 4)
    result = {
        "date": date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "requests_ok": len(rows),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": wall,
        "throughput_rps": len(rows) / wall if wall > 0 else 0.0,
        "round_trip_ms": _pct(data[:, 0]),
        "infer_ms": _pct(data[:, 1]),
        "overhead_ms": _pct(data[:, 0] - data[:, 1]),
        "queue_ms": _pct(data[:, 3]),
        "batch_size": {"mean": float(data[:, 2].mean()) if len(data) else 0.0,
                       "max": int(data[:, 2].max()) if len(data) else 0},
        "server_exit_code": exit_code,
        # On a shared machine these say how much of it the benchmark had.
        "server_cpu_s": _children_cpu_s() - cpu_before,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
    }
    (cfg.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
