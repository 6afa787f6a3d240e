"""Policies `physis eval` runs: a checkpoint in this process, and the same checkpoint behind the policy server."""

import pytest

from physis.eval.policies import ServerPolicy
from physis.eval.runner import EvalConfig, evaluate
from physis.runtime import Policy
from physis.runtime.server import PolicyServer
from physis.sim import EnvConfig, make_env

# openpi's client calls websockets' connect() outside a `with`, which websockets >= 16 warns about
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = PolicyServer(Policy.from_checkpoint(tiny_checkpoint), port=0, checkpoint=str(tiny_checkpoint))
    s.start_in_thread()
    yield s
    s.stop()


def test_eval_through_the_server_matches_the_checkpoint_in_process(tiny_checkpoint, server, tmp_path):
    common = dict(suite="metaworld/mt10", tasks=("reach-v3",), episodes=2, image_size=32, max_steps=20,
                  replan_every=4, workers=1, videos=0, progress=False)
    remote = evaluate(EvalConfig(out=tmp_path / "remote", server=f"ws://127.0.0.1:{server.port}", **common))
    local = evaluate(EvalConfig(out=tmp_path / "local", checkpoint=tiny_checkpoint, **common))
    assert remote["policy"] == "server" and local["policy"] == "checkpoint"
    r, lo = remote["tasks"]["reach-v3"], local["tasks"]["reach-v3"]
    assert r["errors"] == 0, r["error_examples"]
    # the same weights, noise seeds and observations: the same episodes, step for step
    assert r["episode_length"] == lo["episode_length"] and r["episode_success"] == lo["episode_success"]


def test_server_policy_checks_the_address_and_the_robot(server):
    env = make_env("fetch", "reach", EnvConfig(render=False))
    try:
        with pytest.raises(ValueError, match="expected ws://HOST:PORT"):
            ServerPolicy(f"http://127.0.0.1:{server.port}", env)
        with pytest.raises(ValueError, match="serves embodiment 'metaworld_sawyer'; this suite's robot is 'fetch'"):
            ServerPolicy(f"ws://127.0.0.1:{server.port}", env)
    finally:
        env.close()
