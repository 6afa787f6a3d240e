"""Latching: a policy holds the localizer's first estimate of a goal for the episode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from physis.embodiment import load_embodiment
from physis.eval.runner import EvalConfig, evaluate
from physis.runtime import Policy
from physis.runtime.latch import EnvStateLatch
from physis.sim import EnvConfig, make_env

WORLD = ["object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z"]
NAMES = WORLD + [f"{n}-robot" for n in WORLD]
GOAL = ("goal_x", "goal_y", "goal_z")
OBJECT = ("object_x", "object_y", "object_z")


def _latch() -> EnvStateLatch:
    mean, std = np.linspace(-0.5, 0.5, 12), np.linspace(0.1, 0.3, 12)
    return EnvStateLatch(GOAL, NAMES, mean, std, load_embodiment("metaworld_sawyer"))


def test_held_values_come_back_in_model_units_with_their_robot_relative_counterparts() -> None:
    latch = _latch()
    estimate = np.arange(12, dtype=np.float32) / 10
    held = latch.hold(estimate)  # normalized -> the data's units
    assert np.allclose(held, estimate[3:6] * latch.std[3:6] + latch.mean[3:6])
    values, mask = latch.given(None, np.zeros(4))
    assert not mask.any()  # nothing held yet: the model keeps its estimate
    hand = np.array([0.1, 0.6, 0.2, 0.5])  # eef_pos, then the gripper
    values, mask = latch.given(held, hand)
    assert mask.tolist() == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3  # goal and goal-robot only
    assert np.allclose(values[3:6], estimate[3:6], atol=1e-6)
    relative = (held - hand[:3] - latch.mean[9:12]) / latch.std[9:12]
    assert np.allclose(values[9:12], relative, atol=1e-6)


def test_near_field_counterparts_follow_from_the_held_values_on_their_own_scale() -> None:
    names = NAMES + [f"{n}-robot-near" for n in WORLD]
    mean, std = np.linspace(-0.5, 0.5, 18), np.linspace(0.1, 0.3, 18)
    spec = load_embodiment("metaworld_sawyer")
    latch = EnvStateLatch(GOAL, names, mean, std, spec, near=0.04)
    held = np.array([0.1, 0.7, 0.2])
    hand = np.array([0.12, 0.65, 0.2, 0.5])
    values, mask = latch.given(held, hand)
    assert np.flatnonzero(mask).tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17]
    near = np.tanh((held - hand[:3]) / 0.04)
    assert np.allclose(values[15:18], (near - mean[15:18]) / std[15:18], atol=1e-6)
    with pytest.raises(ValueError, match="cannot latch"):  # near-field values are not world-frame ones
        EnvStateLatch(("goal_x-robot-near",), names, mean, std, spec, near=0.04)
    with pytest.raises(ValueError, match="no near-field scale"):
        EnvStateLatch(GOAL, names, mean, std, spec)


def test_a_held_object_is_let_go_once_the_hand_comes_within_the_release_distance() -> None:
    mean, std = np.linspace(-0.5, 0.5, 12), np.linspace(0.1, 0.3, 12)
    spec = load_embodiment("metaworld_sawyer")
    latch = EnvStateLatch(OBJECT, NAMES, mean, std, spec, release=0.05)
    held = np.array([0.1, 0.7, 0.02])
    assert not latch.reached(None, np.zeros(4))  # nothing held yet
    assert not latch.reached(held, np.array([0.1, 0.7, 0.2, 0.5]))  # 18 cm above it
    assert not latch.reached(held, np.array([0.131, 0.74, 0.02, 0.5]))  # 5.1 cm off in x and y
    assert latch.reached(held, np.array([0.12, 0.73, 0.04, 0.5]))  # 4.1 cm
    assert not EnvStateLatch(OBJECT, NAMES, mean, std, spec).reached(held, held)  # no release distance: held on
    with pytest.raises(ValueError, match="one position"):  # a distance to what, with two positions held
        EnvStateLatch(OBJECT + GOAL, NAMES, mean, std, spec, release=0.05)
    with pytest.raises(ValueError, match="finite number >= 0"):
        EnvStateLatch(OBJECT, NAMES, mean, std, spec, release=-0.05)


def test_only_world_frame_values_the_checkpoint_names_can_be_latched() -> None:
    spec = load_embodiment("metaworld_sawyer")
    with pytest.raises(ValueError, match="cannot latch \\['goal_w'\\]"):
        EnvStateLatch(("goal_w",), NAMES, np.zeros(12), np.ones(12), spec)
    with pytest.raises(ValueError, match="robot-relative ones follow"):
        EnvStateLatch(("goal_x-robot",), NAMES, np.zeros(12), np.ones(12), spec)
    with pytest.raises(ValueError, match="lists none"):
        EnvStateLatch(GOAL, [], np.zeros(0), np.ones(0), spec)
    with pytest.raises(ValueError, match="repeat"):
        EnvStateLatch(("goal_x", "goal_x"), NAMES, np.zeros(12), np.ones(12), spec)


def test_the_policy_feeds_the_first_estimate_of_the_goal_for_the_whole_episode(localizer_run) -> None:
    policy = Policy.from_checkpoint(localizer_run, flow_steps=2)
    assert policy.meta["env_state_names"] == NAMES
    fed: list[torch.Tensor] = []
    policy.model.prefix.localizer_in.register_forward_hook(lambda m, args, out: fed.append(args[0][0].clone()))
    located: list[torch.Tensor] = []
    policy.model.prefix.localizer.register_forward_hook(lambda m, args, out: located.append(out[0].clone()))
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=32, cameras=tuple(policy.cameras)))
    obs, _ = env.reset(seed=1_000_000)

    def run_chunk(obs):
        policy.infer(obs)
        for _ in range(8):  # the hand moves: the images, the state and the estimate change
            obs = env.step(np.array([1.0, -1.0, 1.0, 0.0]))[0]
        return obs

    policy.latch = GOAL
    policy.reset()
    obs = run_chunk(obs)
    assert torch.equal(fed[0], located[0])  # the first chunk: the estimate itself, now held
    held = policy.session.latched
    assert held is not None and np.allclose(held, policy._latch.hold(located[0].numpy()))
    run_chunk(obs)
    stats = policy._latch
    hand = obs["state"]["eef_pos"]
    goal = (held - stats.mean[3:6]) / stats.std[3:6]
    goal_robot = (held - hand - stats.mean[9:12]) / stats.std[9:12]
    assert not torch.allclose(located[1], located[0])  # the estimate moved ...
    assert np.allclose(fed[1][3:6].numpy(), goal, atol=1e-5)  # ... the goal fed did not
    assert np.allclose(fed[1][9:12].numpy(), goal_robot, atol=1e-5)  # relative to where the hand is now
    assert torch.equal(fed[1][:3], located[1][:3]) and torch.equal(fed[1][6:9], located[1][6:9])  # objects move
    policy.reset()
    assert policy.session.latched is None  # a new episode reads the goal again
    policy.latch = ()
    obs, _ = env.reset(seed=1_000_001)
    run_chunk(obs)
    run_chunk(obs)
    assert torch.equal(fed[-1], located[-1]) and policy.session.latched is None  # off: the estimate every chunk
    env.close()


def test_the_policy_feeds_the_live_estimate_again_once_the_hand_reaches_the_held_object(localizer_run) -> None:
    policy = Policy.from_checkpoint(localizer_run, flow_steps=2)
    fed: list[torch.Tensor] = []
    policy.model.prefix.localizer_in.register_forward_hook(lambda m, args, out: fed.append(args[0][0].clone()))
    located: list[torch.Tensor] = []
    policy.model.prefix.localizer.register_forward_hook(lambda m, args, out: located.append(out[0].clone()))
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=32, cameras=tuple(policy.cameras)))
    for release, let_go in ((1e-4, False), (10.0, True)):  # out of reach / reached wherever the hand is
        policy.set_latch(OBJECT, release=release)
        assert policy.latch == OBJECT and policy.latch_release == release
        policy.reset()
        obs, _ = env.reset(seed=1_000_000)
        policy.infer(obs)
        assert torch.equal(fed[-1], located[-1]) and not policy.session.released  # the first chunk reads it
        obs = env.step(np.array([1.0, -1.0, 1.0, 0.0]))[0]
        policy.infer(obs)
        assert policy.session.released == let_go
        assert torch.equal(fed[-1][:3], located[-1][:3]) == let_go  # held, or the estimate again
        policy.reset()
        assert not policy.session.released  # a new episode holds again
    with pytest.raises(ValueError, match="needs latched values"):
        policy.set_latch((), release=0.05)
    env.close()


def test_latching_needs_a_localizer_and_an_eager_backend(localizer_run, tiny_checkpoint) -> None:
    with pytest.raises(ValueError, match="no localizer"):
        Policy.from_checkpoint(tiny_checkpoint).latch = GOAL
    with pytest.raises(ValueError, match="runs on the backends"):
        Policy.from_checkpoint(localizer_run, backend="compile").latch = GOAL
    policy = Policy.from_checkpoint(localizer_run, backend="bf16")
    policy.latch = GOAL
    assert policy.latch == GOAL


def test_eval_latches_the_goal_and_checks_the_names_first(localizer_run, tiny_checkpoint, tmp_path) -> None:
    cfg = EvalConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, out=tmp_path, checkpoint=localizer_run,
                     workers=1, image_size=32, max_steps=10, videos=0, latch=GOAL, progress=False)
    results = evaluate(cfg)
    task = results["tasks"]["reach-v3"]
    assert task["errors"] == 0, task["error_examples"]
    assert results["latch"] == list(GOAL)
    with pytest.raises(ValueError, match="cannot latch \\['goal'\\]"):
        evaluate(dataclasses.replace(cfg, latch=("goal",)))
    with pytest.raises(ValueError, match="has none \\(train it with --localizer\\)"):
        evaluate(dataclasses.replace(cfg, checkpoint=tiny_checkpoint))
    with pytest.raises(ValueError, match="pass --checkpoint"):
        evaluate(dataclasses.replace(cfg, checkpoint=None))


def test_the_server_latches_per_connection_and_says_so(localizer_run, tiny_checkpoint) -> None:
    from physis.runtime.server import ServeConfig, ServeError, server_from_config

    threads = torch.get_num_threads()
    server = server_from_config(ServeConfig(checkpoint=localizer_run, port=0, latch=GOAL, latch_release=0.05))
    torch.set_num_threads(threads)  # the server leaves the calling thread one; the tests after this want theirs
    assert server.policy.latch == GOAL and server.metadata["checkpoint"]["latch"] == list(GOAL)
    assert server.metadata["checkpoint"]["latch_release"] == 0.05
    with pytest.raises(ServeError, match="--latch: .*no localizer"):
        server_from_config(ServeConfig(checkpoint=tiny_checkpoint, port=0, latch=GOAL))
