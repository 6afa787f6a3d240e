"""`PolicyServer`: a `Policy` behind a websocket, speaking openpi's msgpack-numpy protocol.

The unmodified `openpi-client` (`WebsocketClientPolicy`) drives it:
  1. On connect the server sends one binary frame: the metadata (observation spec, action space,
     checkpoint and server facts; see `schema.observation_spec`).
  2. Each binary frame from the client is an observation; the answer is a binary frame
     `{"actions": [H, D] float64, "server_timing": {"infer_ms", ...}, "subtask"?: str, "unsafe"?: str,
     "env_state"?: [E] float32}` (env_state: the localizer's estimate, named by the metadata's
     checkpoint.env_state_names).
     An observation may carry `"reset": True` to start a new episode (forget this connection's frames).
  3. A request that cannot be served (not msgpack, a text frame, a key missing, a wrong shape or dtype,
     NaN in the state) is answered with a text frame that says why; openpi's client raises it as an
     error. The connection stays open and the next request is served as usual. A frame larger than
     `max_size` closes that connection with code 1009 (the protocol offers nothing else).
`GET /healthz` answers 200. With an API key set, the handshake must carry `Authorization: Api-Key KEY`
(what openpi's client sends for `api_key=`), else it is refused with 401.

Inference runs on one worker thread, off the event loop. Requests that arrive within `batch_window_ms`
of each other (up to `max_batch`) are inferred together with `Policy.infer_batch`; each connection has
its own `PolicySession`. SIGINT/SIGTERM stop accepting connections, finish the requests in flight, answer
them, and close every connection. Nothing received is ever unpickled.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import physis
from physis.runtime import wire
from physis.runtime.policy import Policy, PolicySession
from physis.runtime.schema import ObservationError, example_from_spec, observation_spec, validate_observation

log = logging.getLogger(__name__)

API_KEY_ENV = "PHYSIS_API_KEY"
PROTOCOL = "openpi-msgpack-numpy"


class ServeError(RuntimeError):
    """The server cannot start (the port is taken, the address is wrong)."""


@dataclass(frozen=True)
class ServeConfig:
    checkpoint: Path
    """A run directory (its latest checkpoint is served) or one checkpoints/step_* directory."""
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 serves other machines too (then set an API key)."""
    port: int = 8000
    api_key: str | None = None
    """Clients must send `Authorization: Api-Key KEY`; defaults to $PHYSIS_API_KEY; unset: no key needed."""
    embodiment: str | None = None
    """The robot to serve, when the checkpoint serves several."""
    flow_steps: int | None = None
    """Flow steps per action chunk (default: the checkpoint's)."""
    max_batch: int = 8
    """Most requests inferred together in one forward pass."""
    batch_window_ms: float = 2.0
    """How long the first request of a batch waits for others to join it."""
    max_size_mb: float = 8.0
    """Largest request frame accepted, in MiB; a larger one closes its connection (code 1009)."""
    seed: int = 0
    """Connection i samples with seed + i."""
    device: str = "cpu"
    """Where the model runs: cpu, cuda, cuda:1, ..."""
    backend: str = "eager"
    """How it runs (physis.runtime.backends): eager, bf16, int8, compile, compile-bf16, fused (CPUs with AMX or
    AVX-512 BF16), onnx, onnx-int8; on a GPU cuda-graph."""
    latch: tuple[str, ...] = ()
    """Environment-state values the localizer reads once per episode (from a 'reset') and then holds, e.g. goal_x
    goal_y goal_z (physis.runtime.latch)."""
    latch_release: float = 0.0
    """Let the latched values go once the robot is within this many metres of them (0: hold them all episode)."""


@dataclass
class _Request:
    obs: dict[str, Any]
    session: PolicySession
    arrived: float  # loop time
    future: asyncio.Future


class PolicyServer:
    """Serve `policy` over websocket; `run()` blocks until SIGINT/SIGTERM, `start_in_thread()` returns at once."""

    def __init__(self, policy: Policy, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_batch: int = 8, batch_window_ms: float = 2.0, max_size: int = 8 * 2**20, seed: int = 0,
                 checkpoint: str | None = None, drain_timeout_s: float = 30.0, warmup: bool = True,
                 threads: int = 0) -> None:
        if max_batch < 1 or batch_window_ms < 0 or max_size < 1:
            raise ValueError(f"PolicyServer: need max_batch >= 1, batch_window_ms >= 0, max_size >= 1; got "
                             f"{max_batch}, {batch_window_ms}, {max_size}")
        self.policy, self.host, self.port = policy, host, port
        self.api_key = api_key or None
        self.max_batch, self.window_s, self.max_size = max_batch, batch_window_ms / 1000.0, max_size
        self.seed, self.drain_timeout_s, self.warmup = seed, drain_timeout_s, warmup
        self.threads = threads or torch.get_num_threads()  # torch threads of the inference thread
        self.spec = observation_spec(policy)
        self.metadata = {
            **self.spec,
            "server": {"name": "physis", "version": physis.__version__, "protocol": PROTOCOL,
                       "max_batch": max_batch, "batch_window_ms": batch_window_ms, "max_size": max_size,
                       "reset": "send 'reset': True with an observation to start a new episode"},
            "checkpoint": {"path": checkpoint, "step": policy.meta.get("step"),
                           "preset": policy.meta.get("model", {}).get("preset_name"),
                           "flow_steps": policy.flow_steps or policy.model.config.flow_steps,
                           "subtask": bool(policy.model.config.subtask and len(policy.vocab.words)),
                           "latch": list(policy.latch), "latch_release": policy.latch_release,
                           "env_state_names": list(policy.env_state_names)},
        }
        self._metadata_frame = wire.encode(self.metadata)
        self._counter = itertools.count()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._closing = False
        self._in_flight = 0
        self._open = 0  # connections being served: a batch never waits for more requests than that
        self.stats = {"connections": 0, "requests": 0, "errors": 0, "batches": 0}

    # ------------------------------------------------------------------ lifecycle
    def run(self, on_ready: Callable[[PolicyServer], None] | None = None) -> None:
        """Serve until SIGINT or SIGTERM, then shut down gracefully (main thread only). `on_ready` is called
        once the server listens (`self.port` is then the bound port)."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._request_stop)
            await self.serve(on_ready)

        asyncio.run(main())

    def start_in_thread(self, timeout_s: float = 300.0) -> PolicyServer:
        """Serve from a background thread; returns once listening (`self.port` is then the bound port)."""

        def target() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as e:  # reported to the starting thread
                self._thread_error = e
                self._ready.set()

        self._thread = threading.Thread(target=target, name="physis-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the policy server did not start listening within {timeout_s}s")
        if self._thread_error is not None:
            raise self._thread_error
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Shut down gracefully from another thread, and wait for it."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._request_stop)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def serve(self, on_ready: Callable[[PolicyServer], None] | None = None) -> None:
        """Listen until asked to stop; then finish in-flight requests and close every connection."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="physis-infer",
                                            initializer=torch.set_num_threads, initargs=(self.threads,))
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        batcher = asyncio.create_task(self._batch_loop())
        try:
            if self.warmup:  # the first inference pays for lazy initialization; no client should wait for it
                example = example_from_spec(self.spec)
                await self._loop.run_in_executor(self._executor, self.policy.infer_batch, [example],
                                                 [self.policy.new_session()])
            async with serve(self._handle, self.host, self.port, process_request=self._process_request,
                             max_size=self.max_size, compression=None) as server:
                self.port = server.sockets[0].getsockname()[1]
                log.info("serving %s on ws://%s:%d", self.spec["embodiment"], self.host, self.port)
                self._ready.set()
                if on_ready is not None:
                    on_ready(self)
                await self._stop.wait()
                log.info("shutting down: finishing %d request(s) in flight", self._in_flight)
                server.server.close()  # no new connections; open ones finish their current request
                self._closing = True
                deadline = self._loop.time() + self.drain_timeout_s
                while self._in_flight and self._loop.time() < deadline:
                    await asyncio.sleep(0.01)
            # leaving the block closes the remaining connections (1001 going away) and waits for their handlers
        finally:
            batcher.cancel()
            self._executor.shutdown(wait=True)
            log.info("stopped after %s", self.stats)

    # ------------------------------------------------------------------ handshake
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Api-Key {self.api_key}".encode()):
                why = "wrong API key" if given else "missing API key"
                return connection.respond(HTTPStatus.UNAUTHORIZED,
                                          f"{why}: send the header 'Authorization: Api-Key <key>'\n")
        return None

    # ------------------------------------------------------------------ one connection
    async def _handle(self, connection: ServerConnection) -> None:
        session = self.policy.new_session(self.seed + next(self._counter))
        self.stats["connections"] += 1
        self._open += 1
        prev_total_ms: float | None = None
        try:
            await connection.send(self._metadata_frame)
            async for message in connection:
                start = time.perf_counter()
                self._in_flight += 1
                try:
                    reply = await self._answer(message, session, prev_total_ms)
                    await connection.send(reply)
                finally:
                    self._in_flight -= 1
                prev_total_ms = (time.perf_counter() - start) * 1000
                if self._closing:
                    break  # the request in flight is answered; now this connection closes
        except ConnectionClosed:
            pass
        finally:
            self._open -= 1

    async def _answer(self, message: bytes | str, session: PolicySession, prev_total_ms: float | None) -> bytes | str:
        """Reply bytes, or a str naming the problem (openpi's client raises a str reply as an error)."""
        self.stats["requests"] += 1
        start = time.perf_counter()
        try:
            if isinstance(message, str):
                raise ObservationError("expected a binary frame holding a msgpack observation, got a text frame")
            try:
                obs = wire.decode(message)
            except wire.WireError as e:
                raise ObservationError(f"could not decode the request: {e}") from None
            validate_observation(obs, self.spec)
            reset = obs.get("reset", False)
            if not isinstance(reset, bool):
                raise ObservationError(f"'reset': expected true or false, found {type(reset).__name__}")
        except ObservationError as e:
            self.stats["errors"] += 1
            return f"physis: bad request: {e}"
        if reset:
            session.reset()  # safe here: this session has no request in the worker
        request = _Request(obs, session, asyncio.get_running_loop().time(), asyncio.get_running_loop().create_future())
        self._queue.put_nowait(request)
        try:
            out, timing = await request.future
        except Exception as e:
            self.stats["errors"] += 1
            log.exception("inference failed")
            return f"physis: inference failed: {type(e).__name__}: {e}"
        reply: dict[str, Any] = {"actions": out["actions"]}
        for key in ("subtask", "unsafe", "env_state"):
            if key in out:
                reply[key] = out[key]
        timing["server_ms"] = (time.perf_counter() - start) * 1000
        if prev_total_ms is not None:
            timing["prev_total_ms"] = prev_total_ms
        reply["server_timing"] = timing
        return wire.encode(reply)

    # ------------------------------------------------------------------ micro-batching
    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = batch[0].arrived + self.window_s  # already past if it waited behind the previous batch
            while len(batch) < min(self.max_batch, self._open):
                try:
                    wait = deadline - loop.time()
                    batch.append(self._queue.get_nowait() if wait <= 0 else
                                 await asyncio.wait_for(self._queue.get(), wait))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.stats["batches"] += 1
        try:
            outs = await loop.run_in_executor(self._executor, self.policy.infer_batch,
                                              [r.obs for r in batch], [r.session for r in batch])
        except Exception as e:  # every request of the batch hears about it; the server carries on
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)
            return
        infer_ms = (loop.time() - started) * 1000
        for r, out in zip(batch, outs, strict=True):
            if not r.future.done():
                r.future.set_result((out, {"infer_ms": infer_ms, "batch_size": len(batch),
                                           "queue_ms": (started - r.arrived) * 1000}))


def server_from_config(cfg: ServeConfig) -> PolicyServer:
    """Load `cfg.checkpoint` into a server (what `physis serve` runs); the API key falls back to $PHYSIS_API_KEY.

    The calling thread is left with one torch thread: only the inference thread runs torch in parallel. Where two
    threads each own an OpenMP pool and their threads outnumber the cores, libgomp stops spinning between
    operations, and a `small` chunk took twice as long (about 42 ms instead of 20 on 2 cores).
    """
    from physis.runtime.backends import BACKENDS

    if cfg.backend not in BACKENDS:
        raise ServeError(f"--backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ServeError(f"--device {cfg.device}: torch sees no CUDA device on this machine")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    policy = Policy.from_checkpoint(cfg.checkpoint, embodiment=cfg.embodiment, flow_steps=cfg.flow_steps,
                                    seed=cfg.seed, device=cfg.device, backend=cfg.backend)
    try:
        policy.set_latch(cfg.latch, cfg.latch_release)
    except ValueError as e:
        torch.set_num_threads(threads)
        raise ServeError(f"--latch: {e}") from None
    return PolicyServer(policy, host=cfg.host, port=cfg.port, api_key=cfg.api_key or os.environ.get(API_KEY_ENV),
                        max_batch=cfg.max_batch, batch_window_ms=cfg.batch_window_ms,
                        max_size=int(cfg.max_size_mb * 2**20), seed=cfg.seed, checkpoint=str(cfg.checkpoint),
                        threads=threads)
