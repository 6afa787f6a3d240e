"""The AMX flow kernel against the eager float32 model (a tiny model with the kernel's shapes, random weights)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.utils.cpp_extension

from physis.model import ModelConfig, PhysisModel
from physis.runtime import fused
from physis.runtime.backends import CompiledEngine, make_engine
from physis.runtime.export import example_batch
from physis.runtime.fused import STALE_LOCK_S, FusedFlow, amx_cpu, pack_b, supports

A = 7
needs_amx = pytest.mark.skipif(not amx_cpu(), reason="the kernel runs on CPUs with AMX tiles only")


@pytest.fixture(scope="module")
def model() -> PhysisModel:
    torch.manual_seed(0)
    # heads 32 wide and expert widths in whole tiles, as the kernel needs; 16 action steps
    cfg = ModelConfig.preset(
        "tiny",
        image_size=32,
        action_dim=A,
        state_dim=5,
        cameras=2,
        heads=2,
        expert_width=64,
        subtask_vocab=("reach", "the", "goal", "push", "block"),
    )
    return PhysisModel(cfg).eval()


def test_pack_b_lays_a_weight_out_in_tiles_of_pairs() -> None:
    w = torch.randn(20, 40)
    packed = pack_b(w).float().view(2, 2, 16, 16, 2)  # N/16 x K/32 tiles, 16 k-pairs x 16 columns x 2
    ref = torch.nn.functional.pad(w, (0, 24, 0, 12)).to(torch.bfloat16).float()
    for n, k in [(0, 0), (3, 5), (17, 33), (19, 39), (31, 63)]:
        assert packed[n // 16, k // 32, (k % 32) // 2, n % 16, k % 2] == ref[n, k]


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PHYSIS_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: kw)  # what the loader would be asked
    lock = fused.build_directory() / "lock"
    lock.parent.mkdir(parents=True)
    try:
        for age, kept in ((2 * STALE_LOCK_S, False), (1.0, True)):
            lock.touch()
            os.utime(lock, (time.time() - age, time.time() - age))
            fused.kernel.cache_clear()
            assert fused.kernel()["build_directory"] == str(lock.parent)
            assert lock.exists() == kept
    finally:
        fused.kernel.cache_clear()  # the real extension for the tests after this one


def test_supports_names_what_the_kernel_cannot_run(model) -> None:
    assert "32 wide" in supports(PhysisModel(ModelConfig.preset("tiny", action_dim=A, state_dim=5)))
    assert "16 steps" in supports(
        PhysisModel(ModelConfig.preset("tiny", action_dim=A, state_dim=5, heads=2, expert_width=64, horizon=8))
    )
    assert supports(model) == (None if amx_cpu() else "the CPU has no AMX tiles")


@pytest.mark.skipif(amx_cpu(), reason="this CPU has AMX")
def test_the_fused_backend_says_why_it_cannot_run(model) -> None:
    with pytest.raises(RuntimeError, match="no AMX"):
        make_engine(model, "fused")


@needs_amx
def test_the_kernel_samples_what_the_eager_model_samples(model) -> None:
    batch = example_batch(model, seed=3, text_tokens=5)
    batch["action_mask"] = torch.tensor([[True] * (A - 2) + [False] * 2])  # a smaller robot in a padded space
    flow = FusedFlow(model)
    g = torch.Generator().manual_seed(3)
    noise, target = torch.randn(1, 16, A, generator=g), torch.randn(1, 16, A, generator=g)
    weights = torch.zeros(1, 16)
    weights[:, :4], weights[:, 4:6] = 1.0, 0.5
    with torch.inference_mode():
        cache = model.generate_subtask(model.encode_prefix(batch, pooled=False))[1]
        assert not bool(cache.mask.all()) and cache.mask.shape[1] % 32  # masked keys, a partial key block
        for steps in (1, 4):
            for inpaint in (False, True):
                hook = dict(prefix_actions=target, prefix_weights=weights) if inpaint else {}
                ref = model.sample_actions(cache=cache, noise=noise, steps=steps, **hook)
                out = flow(cache, noise, steps, *hook.values())
                # bf16 matmuls against float32: well under 2% of the scale; a misplaced tile is off by far more
                assert out.shape == ref.shape and (out - ref).abs().max() < 0.02 * ref.abs().max()
                assert torch.equal(out[..., A - 2 :], torch.zeros(1, 16, 2))
                if inpaint:  # the committed steps exactly
                    assert torch.equal(out[:, :4, : A - 2], target[:, :4, : A - 2])


@needs_amx
def test_the_engine_runs_batch_one_on_the_kernel_and_larger_batches_on_the_graph(model, monkeypatch) -> None:
    engine = CompiledEngine(model, torch.bfloat16, unrolled=True, fused=True)
    monkeypatch.setattr(engine, "_compile", lambda module: module)  # the flow graph's module, run eagerly here
    eager = make_engine(model, "eager")
    noise = torch.randn(2, 16, A, generator=torch.Generator().manual_seed(4))
    cache = eager.generate_subtask(eager.encode_prefix(example_batch(model, batch=2, seed=4, text_tokens=5)))[1]
    ref = eager.sample_actions(cache=cache, noise=noise, steps=3)
    out = engine.sample_actions(cache=cache.head(1), noise=noise[:1], steps=3)
    assert (out - ref[:1]).abs().max() < 0.02 * ref.abs().max()
    with pytest.raises(ValueError, match="prefix_weights"):  # the hook's checks hold on the kernel's path too
        engine.sample_actions(
            cache=cache.head(1),
            noise=noise[:1],
            steps=3,
            prefix_actions=noise[:1],
            prefix_weights=torch.full((1, 16), 2.0),
        )
    monkeypatch.setattr(engine, "_fused", lambda *a: pytest.fail("the kernel was given a batch of two"))
    out = engine.sample_actions(cache=cache, noise=noise, steps=3)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
