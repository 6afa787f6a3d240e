"""The policy server, driven by openpi's unmodified client: metadata, health, auth, bad input, batching."""

import json
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import websockets
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from physis.cli import main
from physis.runtime import ObservationError, Policy, example_observation, observation_spec, validate_observation
from physis.runtime.server import PolicyServer
from physis.runtime.wire import encode

MAX_SIZE = 2**20
# openpi's client calls websockets' connect() outside a `with`, which websockets >= 16 warns about
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


@pytest.fixture(scope="module")
def policy(tiny_checkpoint):
    return Policy.from_checkpoint(tiny_checkpoint, flow_steps=2)


@pytest.fixture(scope="module")
def obs(tiny_checkpoint):
    return example_observation(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(policy, tiny_checkpoint):
    s = PolicyServer(policy, port=0, max_size=MAX_SIZE, checkpoint=str(tiny_checkpoint)).start_in_thread()
    yield s
    s.stop()


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# ------------------------------------------------------------------ schema and example
def test_example_observation_validates_and_runs(policy, obs):
    spec = observation_spec(policy)
    validate_observation(obs, spec)
    assert obs["images"]["corner"].shape == (32, 32, 3) and obs["state"]["eef_pos"].dtype == np.float32
    assert policy.infer(obs)["actions"].shape == (8, 4)
    other_size = {**obs, "images": {c: np.zeros((48, 64, 3), np.uint8) for c in obs["images"]}}
    validate_observation(other_size, spec)  # any HxWx3 is accepted; the policy resizes it
    assert policy.infer(other_size)["actions"].shape == (8, 4)
    with pytest.raises(ObservationError, match=r"'state/gripper': expected shape \(1,\), found float64 \(2,\)"):
        validate_observation({**obs, "state": {**obs["state"], "gripper": np.zeros(2)}}, spec)


# ------------------------------------------------------------------ micro-batching in the Policy
def test_a_batch_of_one_equals_infer_and_sessions_stay_apart(tiny_checkpoint, policy, obs):
    p = Policy.from_checkpoint(tiny_checkpoint, flow_steps=2, seed=7, text_encoder=policy.text)
    session = p.new_session(7)
    moved = {**obs, "state": {**obs["state"], "eef_pos": np.array([0.1, 0.6, 0.2], np.float32)}}
    for o in (obs, moved):  # two steps: the frame history and the generator advance the same way
        a, (b,) = p.infer(o), p.infer_batch([o], [session])
        np.testing.assert_array_equal(a["actions"], b["actions"])
        assert a["subtask"] == b["subtask"]
    sessions = [p.new_session(s) for s in (1, 2, 3)]
    batched = p.infer_batch([obs, moved, obs], sessions)
    for o, seed, out in zip([obs, moved, obs], (1, 2, 3), batched, strict=True):
        (alone,) = p.infer_batch([o], [p.new_session(seed)])
        np.testing.assert_allclose(out["actions"], alone["actions"], atol=1e-4)
        assert out["subtask"] == alone["subtask"]
    assert not np.allclose(batched[0]["actions"], batched[2]["actions"])  # same observation, own noise
    with pytest.raises(ValueError, match="appears twice"):
        p.infer_batch([obs, obs], [session, session])
    with pytest.raises(Exception, match="observation 1: observation lacks cameras"):
        p.infer_batch([obs, {**obs, "images": {}}], sessions[:2])


# ------------------------------------------------------------------ the server
def test_openpi_client_gets_metadata_then_actions(server, obs):
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    meta = client.get_server_metadata()
    assert meta["embodiment"] == "metaworld_sawyer"
    assert meta["observation"]["images"]["corner"]["preferred_shape"] == [32, 32, 3]
    assert meta["observation"]["state"]["eef_pos"]["shape"] == [3]
    assert meta["observation"]["instruction"] == {"dtype": "str"}
    assert meta["action"]["horizon"] == 8 and meta["action"]["dim"] == 4
    assert meta["action"]["names"] == ["dx", "dy", "dz", "grip"]
    assert meta["server"]["name"] == "physis" and meta["server"]["max_size"] == MAX_SIZE
    assert meta["checkpoint"]["step"] == 4 and meta["checkpoint"]["flow_steps"] == 2
    out = client.infer(obs)
    assert out["actions"].shape == (8, 4) and out["actions"].dtype == np.float64
    assert np.all(np.abs(out["actions"]) <= 1.0)
    assert isinstance(out["subtask"], str)
    assert out["server_timing"]["infer_ms"] > 0 and out["server_timing"]["batch_size"] == 1
    assert "prev_total_ms" in client.infer({**obs, "reset": True})["server_timing"]


def test_a_localizer_checkpoint_names_its_estimate_and_sends_it(localizer_run):
    from physis.eval.policies import ServerPolicy
    from physis.sim import EnvConfig, make_env

    policy = Policy.from_checkpoint(localizer_run, flow_steps=2)
    s = PolicyServer(policy, port=0, max_size=MAX_SIZE).start_in_thread()
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=32, cameras=tuple(policy.cameras)))
    try:
        remote = ServerPolicy(f"ws://127.0.0.1:{s.port}", env)
        assert remote.env_state_names == policy.env_state_names and len(policy.env_state_names) == 12
        obs, _ = env.reset(seed=1_000_000)
        out = remote.infer(obs)
        assert out["env_state"].shape == (12,) and out["env_state"].dtype == np.float32
        np.testing.assert_allclose(out["env_state"], policy.infer(obs)["env_state"], atol=1e-5)
    finally:
        env.close()
        s.stop()


def test_healthz_answers_200(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
        assert r.status == 200 and r.read() == b"OK\n"


def test_api_key_is_required_when_set(policy, obs):
    keyed = PolicyServer(policy, port=0, api_key="s3cret", warmup=False).start_in_thread()
    try:
        for key in (None, "wrong"):
            with pytest.raises(websockets.exceptions.InvalidStatus) as e:
                WebsocketClientPolicy("127.0.0.1", keyed.port, api_key=key)
            assert e.value.response.status_code == 401
            assert b"API key" in e.value.response.body
        client = WebsocketClientPolicy("127.0.0.1", keyed.port, api_key="s3cret")
        assert client.infer(obs)["actions"].shape == (8, 4)
        with urllib.request.urlopen(f"http://127.0.0.1:{keyed.port}/healthz", timeout=10) as r:
            assert r.status == 200  # health checks need no key
    finally:
        keyed.stop()


def raw_array_obs(obs, fields):
    """The observation with images/corner replaced by a hand-made array map."""
    arr = {b"__ndarray__": True, b"data": b"\x00" * 3072, b"dtype": "|u1", b"shape": [32, 32, 3], **fields}
    body = {k: v for k, v in obs.items() if k != "images"}
    body["images"] = {"corner": arr, "gripper": obs["images"]["gripper"]}
    return msgpack.packb(body, default=lambda a: {b"__ndarray__": True, b"data": a.tobytes(),
                                                  b"dtype": a.dtype.str, b"shape": a.shape})


def test_bad_requests_get_clear_errors_and_everyone_keeps_being_served(server, obs):
    client, other = WebsocketClientPolicy("127.0.0.1", server.port), WebsocketClientPolicy("127.0.0.1", server.port)
    state = obs["state"]
    bad_obs = [
        ({k: v for k, v in obs.items() if k != "state"}, "missing key 'state'"),
        ({**obs, "images": {"corner": obs["images"]["corner"]}}, r"'images' lacks \['gripper'\]"),
        ({**obs, "state": {**state, "eef_pos": np.zeros(4, np.float32)}}, r"'state/eef_pos': expected shape \(3,\)"),
        ({**obs, "images": {**obs["images"], "corner": np.zeros((32, 32, 3), np.float32)}},
         r"'images/corner': expected a uint8 array \[H, W, 3\] \(preferably 32x32x3\), found float32"),
        ({**obs, "images": {**obs["images"], "corner": np.zeros((32, 32), np.uint8)}}, r"found uint8 \(32, 32\)"),
        ({**obs, "state": {**state, "eef_pos": np.array([0, np.nan, 0], np.float32)}}, "must be finite"),
        ({**obs, "state": {**state, "gripper": np.array([np.inf])}}, "'state/gripper': values must be finite"),
        ({**obs, "state": {**state, "gripper": "open"}}, "'state/gripper': expected 1 numbers"),
        ({**obs, "instruction": 3}, "'instruction': expected a str"),
        ({**obs, "reset": "yes"}, "'reset': expected true or false"),
        ([1, 2, 3], "an observation is a mapping"),
    ]
    for bad, match in bad_obs:
        with pytest.raises(RuntimeError, match="physis: bad request: .*" + match):
            client.infer(bad)
        assert client.infer(obs)["actions"].shape == (8, 4)  # the same connection goes on
    raw = [
        (b"\x93\xc1garbage", "not a valid msgpack message"),
        (encode(obs)[:-100], "truncated"),
        (encode(obs) + b"\x00", "extra bytes"),
        ("a text frame", "got a text frame"),
        (raw_array_obs(obs, {b"dtype": "|O"}), "images/corner: numpy array with dtype '|O' is not allowed"),
        (raw_array_obs(obs, {b"shape": [32, 32, 4]}), "needs 4096 bytes, the message carries 3072"),
    ]
    for frame, match in raw:
        client._ws.send(frame)
        reply = client._ws.recv()
        assert isinstance(reply, str) and match in reply, reply
        assert client.infer(obs)["actions"].shape == (8, 4)
    huge = {**obs, "images": {c: np.zeros((700, 700, 3), np.uint8) for c in obs["images"]}}  # ~2.9 MB > 1 MiB
    with pytest.raises(websockets.exceptions.ConnectionClosedError) as e:
        client.infer(huge)
    assert e.value.rcvd.code == 1009  # message too big: the protocol can only close this connection
    assert other.infer(obs)["actions"].shape == (8, 4)
    assert WebsocketClientPolicy("127.0.0.1", server.port).infer(obs)["actions"].shape == (8, 4)


def hold_the_worker(server):
    """Block the server's inference thread until the returned event is set."""
    gate = threading.Event()
    server._executor.submit(gate.wait)
    return gate


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(policy, obs):
    srv = PolicyServer(policy, port=0, batch_window_ms=2.0, warmup=False).start_in_thread()
    try:
        clients = [WebsocketClientPolicy("127.0.0.1", srv.port) for _ in range(4)]  # sessions seeded 0..3, in order
        replies = [None] * 4
        gate = hold_the_worker(srv)
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, clients[i].infer(obs)))
                   for i in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: srv._in_flight == 4)  # every request is in the server, waiting for the worker
        gate.set()
        for t in threads:
            t.join(60)
    finally:
        srv.stop()
    sizes = [r["server_timing"]["batch_size"] for r in replies]
    assert sum(1 / s for s in sizes) <= 2.0 + 1e-9  # at most 2 batches: the one that waited, then the rest
    for seed, r in enumerate(replies):
        (alone,) = policy.infer_batch([obs], [policy.new_session(seed)])
        np.testing.assert_allclose(r["actions"], alone["actions"], atol=1e-4)


def test_shutdown_answers_requests_in_flight_then_closes(policy, obs):
    srv = PolicyServer(policy, port=0, warmup=False).start_in_thread()
    client = WebsocketClientPolicy("127.0.0.1", srv.port)
    gate = hold_the_worker(srv)
    reply = {}
    t = threading.Thread(target=lambda: reply.update(client.infer(obs)))
    t.start()
    wait_for(lambda: srv._in_flight == 1)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    time.sleep(0.05)
    gate.set()
    t.join(30)
    stopper.join(30)
    assert reply["actions"].shape == (8, 4)  # the request in flight was answered
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        client.infer(obs)
    with pytest.raises(OSError):
        WebsocketClientPolicy("127.0.0.1", srv.port)


def test_bench_serve_command_runs_a_server_process(tiny_checkpoint, tmp_path, capsys):
    main(["bench", "serve", "--checkpoint", str(tiny_checkpoint), "--clients", "2", "--requests", "3", "--warmup",
          "1", "--flow-steps", "2", "--backend", "bf16", "--out", str(tmp_path), "--startup-timeout-s", "900"])
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["config"]["backend"] == "bf16" and "(backend bf16;" in (tmp_path / "server.log").read_text()
    assert r["requests_ok"] == 6 and r["errors"] == 0, r["error_examples"]
    assert r["server_exit_code"] == 0  # SIGTERM shut it down cleanly
    assert r["round_trip_ms"]["p50"] > 0 and r["overhead_ms"]["p99"] >= r["overhead_ms"]["p50"]
    assert 1 <= r["batch_size"]["mean"] <= 2
    assert "round trip" in capsys.readouterr().out


def test_serve_refuses_an_unknown_backend_or_a_missing_gpu(tiny_checkpoint, monkeypatch):
    import torch

    from physis.runtime.server import ServeConfig, ServeError, server_from_config

    with pytest.raises(ServeError, match="--backend 'tensorrt' is not one of eager"):
        server_from_config(ServeConfig(checkpoint=tiny_checkpoint, backend="tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ServeError, match="--device cuda: torch sees no CUDA device"):
        server_from_config(ServeConfig(checkpoint=tiny_checkpoint, device="cuda", backend="cuda-graph"))
