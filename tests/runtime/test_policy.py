"""Datasets -> `physis train` (tiny) -> checkpoint -> Policy -> `physis eval --checkpoint`, end to end."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from physis.eval.runner import EvalConfig, evaluate
from physis.runtime import CheckpointMismatchError, Policy
from physis.sim import EnvConfig, make_env
from physis.train.run import train


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_train_writes_checkpoints_metrics_and_summary(run):
    root, _, summary = run
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    assert 0 < summary["params_total"] < 1_000_000  # tiny
    lines = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert {"action", "subtask", "progress", "world_model"} <= set(lines[-1])
    ckpt = root / "run" / "checkpoints" / "step_000004"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "stats.json").is_file()


def test_resume_continues_from_the_last_checkpoint(run, tmp_path):
    root, cmd, _ = run
    shutil.copytree(root / "run", tmp_path / "run")  # the shared run stays at step 4 for the other tests
    summary = train(replace(cmd, out=tmp_path / "run", steps=6, resume=True))
    assert summary["start_step"] == 4 and summary["steps"] == 6


def _policy_and_reach_env(run):
    root, _, _ = run
    policy = Policy.from_checkpoint(root / "run", embodiment="metaworld_sawyer", flow_steps=2)
    env = make_env("metaworld/mt10", "reach-v3", EnvConfig(image_size=32))
    obs, _ = env.reset(seed=1_000_000)
    return policy, env, obs


def test_policy_outputs_native_actions_within_limits(run):
    root, _, _ = run
    policy, env, obs = _policy_and_reach_env(run)
    policy.reset()
    out = policy.infer(obs)
    assert out["actions"].shape == (8, 4)
    assert np.all(out["actions"] >= -1) and np.all(out["actions"] <= 1)
    assert isinstance(out.get("subtask"), str)
    with pytest.raises(CheckpointMismatchError, match="cameras"):
        policy.infer({**obs, "images": {}})
    with pytest.raises(CheckpointMismatchError, match="state group"):
        policy.infer({**obs, "state": {}})
    with pytest.raises(CheckpointMismatchError, match="not 'fetch'"):
        Policy.from_checkpoint(root / "run", embodiment="fetch")
    env.close()


def test_the_noise_scale_tempers_the_flow_noise(run):
    root, _, _ = run
    policy, env, obs = _policy_and_reach_env(run)
    chunks = {}
    for scale in (1.0, 0.0):
        for seed in (0, 1):
            policy.noise_scale = scale
            policy.session = policy.new_session(seed)
            chunks[scale, seed] = policy.infer(obs)["actions"]
    assert not np.allclose(chunks[1.0, 0], chunks[1.0, 1])  # sampled: the seed matters
    np.testing.assert_allclose(chunks[0.0, 0], chunks[0.0, 1])  # no noise: one deterministic chunk
    with pytest.raises(ValueError, match="noise_scale must be a finite number >= 0"):
        Policy.from_checkpoint(root / "run", noise_scale=-0.5)
    with pytest.raises(ValueError, match="--noise-scale scales a checkpoint's flow noise"):
        evaluate(EvalConfig(suite="metaworld/mt10", out=root / "unused", noise_scale=0.5))
    with pytest.raises(ValueError, match="--noise-scale must be a finite number"):
        evaluate(EvalConfig(suite="metaworld/mt10", out=root / "unused", checkpoint=root / "run",
                            noise_scale=float("nan")))
    env.close()


def test_eval_runs_a_checkpoint(run, tmp_path):
    root, _, _ = run
    results = evaluate(EvalConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, out=tmp_path,
                                  checkpoint=root / "run", workers=1, image_size=32, max_steps=10, videos=0,
                                  noise_scale=0.5, progress=False))
    task = results["tasks"]["reach-v3"]
    assert task["errors"] == 0, task["error_examples"]
    assert task["mean_length"] == 10 and results["policy"] == "checkpoint"
    assert results["noise_scale"] == 0.5


def test_eval_heads_reports_every_head(run):
    from physis.eval.heads import HeadsConfig, evaluate_heads

    root, _, _ = run
    r = evaluate_heads(HeadsConfig(checkpoint=root / "run", data=root / "demos", out=root / "heads", samples=8,
                                   batch_size=4, strip=2))
    assert r["samples"] == 8 and np.isfinite(r["action_mse"])
    assert 0.0 <= r["subtask_accuracy"] <= 1.0 and r["subtask_samples"] == 8
    assert -1.0 <= r["progress_pearson"] <= 1.0
    assert r["world_model_latent_mse"] > 0 and r["copy_baseline_latent_mse"] >= 0
    assert (root / "heads" / "world_model.png").stat().st_size > 500
    assert json.loads((root / "heads" / "heads.json").read_text()) == r


def test_policy_encodes_only_the_instructions_own_tokens(run):
    policy, env, obs = _policy_and_reach_env(run)
    env.close()
    seen = []
    encode = policy.engine.encode_prefix
    policy.engine.encode_prefix = lambda batch: seen.append(batch["text"].shape[1]) or encode(batch)
    policy.infer(obs)
    _, mask = policy.text.encode(obs["instruction"])
    assert seen == [int(mask.sum())] and seen[0] < policy.model.config.max_text_tokens


def test_policy_resizes_other_image_sizes_and_stacks_a_history_of_frames(run):
    import torch
    import torch.nn.functional as F

    policy, env, obs = _policy_and_reach_env(run)
    env.close()
    cam, size = policy.cameras[0], policy.image_size
    image = obs["images"][cam]
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)  # twice the size
    batch, now = policy._batch({**obs, "images": {**obs["images"], cam: big}}, policy.new_session())
    resized = F.interpolate(torch.from_numpy(big).permute(2, 0, 1)[None].float() / 255.0, size=(size, size),
                            mode="bilinear", antialias=True, align_corners=False)[0]
    assert batch["images"].shape == (1, policy.num_cameras, 1, 3, size, size)
    assert torch.allclose(batch["images"][0, 0, 0], resized, atol=1e-5) and torch.equal(batch["images"][0, :, 0], now)
    # with a history of two: the first frame twice, then the previous frame and the new one
    policy.history = 2
    session = policy.new_session()
    first, frame = policy._batch(obs, session)
    assert first["images"].shape[2] == 2 and torch.equal(first["images"][0, :, 0], first["images"][0, :, 1])
    session.frames.extend([frame, frame])
    dark = {**obs, "images": {c: np.zeros_like(v) for c, v in obs["images"].items()}}
    second, _ = policy._batch(dark, session)
    assert torch.equal(second["images"][0, :, 0], frame) and not bool(second["images"][0, :, 1].any())


def test_the_cuda_graph_backend_gives_the_eager_chunks(run, monkeypatch):
    """On a CPU the cuda-graph engine runs its parts eagerly through static buffers: the same actions."""
    import torch

    root, _, _ = run
    _, env, obs = _policy_and_reach_env(run)
    eager = Policy.from_checkpoint(root / "run", flow_steps=2, seed=3)
    graphs = Policy.from_checkpoint(root / "run", flow_steps=2, seed=3, backend="cuda-graph", device="cpu")
    for _ in range(2):  # the second chunk reads the first one's subtask as its draft
        a, b = eager.infer(obs), graphs.infer(obs)
        assert a["subtask"] == b["subtask"] and np.allclose(a["actions"], b["actions"], atol=1e-5)
        obs, *_ = env.step(a["actions"][0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda', but torch sees no CUDA device"):
        Policy.from_checkpoint(root / "run", device="cuda")
    env.close()


def test_the_compiled_backend_reasons_and_acts_as_eager(run):
    """compile-bf16 checks the previous chunk's subtask inside its prefix graph: the same subtask and close actions
    as the eager engine on the same bf16 weights (the float32 model's greedy decode may part from both at a
    near-tie, depending on the CPU's bf16 arithmetic)."""
    root, _, _ = run
    _, env, obs = _policy_and_reach_env(run)
    eager = Policy.from_checkpoint(root / "run", flow_steps=2, seed=3, backend="bf16")
    compiled = Policy.from_checkpoint(root / "run", flow_steps=2, seed=3, backend="compile-bf16")
    for _ in range(2):  # the second chunk goes through the draft-checking graph
        a, b = eager.infer(obs), compiled.infer(obs)
        assert a["subtask"] == b["subtask"] and np.abs(a["actions"] - b["actions"]).max() < 0.1
        obs, *_ = env.step(a["actions"][0])
    assert compiled.engine._reasoner is not None
    env.close()
