"""The fast inference paths of PhysisModel against the plain ones: flow sampling with its inpainting hook,
incremental subtask generation, the prefix encoded without its pooled summary, bf16 weights."""

from __future__ import annotations

import copy

import pytest
import torch

from physis.model.trunk import PrefixCache
from physis.model.vocab import BOS, EOS, PAD
from tests.model.test_physis_model import A, B, H, _one_thread, model_and_batch  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def trained():
    """The tiny model after a few steps on one batch, so the subtask head emits EOS at different places."""
    model, batch = model_and_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    return model.eval(), batch


def reference_actions(model, cache: PrefixCache, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler steps over `predict_velocity` (concatenated keys/values, bool masks): the sampler as first written."""
    x, dt = noise, 1.0 / steps
    for i in range(steps):
        x = x - dt * model.predict_velocity(cache, x, torch.full((x.shape[0],), 1.0 - i * dt))
    return x * cache.action_mask[:, None, :].float()


def reference_subtask(model, cache: PrefixCache) -> tuple[torch.Tensor, PrefixCache]:
    """Greedy decoding that re-runs every generated token through the trunk at each step, then once more."""
    base = cache.prefix_only()
    b, n = base.batch_size, model.config.max_subtask_tokens
    ids = torch.full((b, n), PAD, dtype=torch.long)
    ids[:, 0] = BOS
    done = torch.zeros(b, dtype=torch.bool)
    for i in range(1, n):
        x = model.subtask_emb(ids[:, :i]) + model.subtask_pos[:i]
        hidden, _, _ = model._trunk_extend(x, base.keys, base.values, base.mask)
        logits = model.subtask_out(hidden[:, -1])
        logits[:, [PAD, BOS]] = float("-inf")
        nxt = torch.where(done, PAD, logits.argmax(-1))
        ids[:, i] = nxt
        done |= nxt == EOS
        if bool(done.all()):
            break
    return ids, model.extend_subtask(cache, ids)


@torch.inference_mode()
def test_sampling_without_the_hook_equals_the_plain_euler_loop(trained) -> None:
    model, batch = trained
    noise = torch.randn(B, H, A, generator=torch.Generator().manual_seed(1))
    for cache in (model.encode_prefix(batch), model.generate_subtask(model.encode_prefix(batch))[1]):
        for steps in (1, 4):
            fast = model.sample_actions(cache=cache, noise=noise, steps=steps)
            assert torch.allclose(fast, reference_actions(model, cache, noise, steps), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_inpainting_freezes_weight_one_steps_exactly(trained) -> None:
    model, batch = trained
    cache = model.encode_prefix(batch)
    g = torch.Generator().manual_seed(2)
    noise, target = torch.randn(B, H, A, generator=g), torch.randn(B, H, A, generator=g)
    target = target * cache.action_mask[:, None, :]  # committed actions live on the body's slots
    weights = torch.zeros(B, H)
    weights[:, :3] = 1.0
    weights[:, 3:6] = torch.tensor([0.8, 0.4, 0.1])
    free = model.sample_actions(cache=cache, noise=noise, steps=5)
    out = model.sample_actions(cache=cache, noise=noise, steps=5, prefix_actions=target, prefix_weights=weights)
    assert torch.equal(out[:, :3], target[:, :3])
    # soft steps end up between the free sample and the target, closer to the target than the free sample
    assert (out[:, 3:6] - target[:, 3:6]).norm() < (free[:, 3:6] - target[:, 3:6]).norm()
    assert not torch.equal(out[:, 6:], free[:, 6:])  # free steps follow the frozen ones (attention)
    # all-zero weights: the plain Euler step, to rounding
    zero = model.sample_actions(cache=cache, noise=noise, steps=5, prefix_actions=target,
                                prefix_weights=torch.zeros(B, H))
    assert torch.allclose(zero, free, atol=1e-5)
    # one step only: still exact
    one = model.sample_actions(cache=cache, noise=noise, steps=1, prefix_actions=target, prefix_weights=weights)
    assert torch.equal(one[:, :3], target[:, :3])


def test_inpainting_with_the_mse_head_and_bad_arguments() -> None:
    model, batch = model_and_batch(action_head="mse")
    target, weights = torch.randn(B, H, A) * batch["action_mask"][:, None], torch.zeros(B, H)
    weights[:, :2] = 1.0
    out = model.sample_actions(batch, prefix_actions=target, prefix_weights=weights)
    assert torch.equal(out[:, :2], target[:, :2])
    with pytest.raises(ValueError, match="together"):
        model.sample_actions(batch, prefix_actions=target)
    with pytest.raises(ValueError, match=r"expected prefix_actions \(3, 8, 7\)"):
        model.sample_actions(batch, prefix_actions=target[:, :4], prefix_weights=weights[:, :4])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.sample_actions(batch, prefix_actions=target, prefix_weights=weights + 1.5)


@torch.inference_mode()
def test_incremental_subtask_generation_equals_the_full_rerun(trained) -> None:
    model, batch = trained
    cache = model.encode_prefix(batch)
    ids, fast = model.generate_subtask(cache)
    ref_ids, ref = reference_subtask(model, cache)
    assert torch.equal(ids, ref_ids)
    lengths = (ids != PAD).sum(1)
    assert len(set(lengths.tolist())) > 1  # rows stop at different places: padding is exercised
    assert torch.equal(fast.mask, ref.mask) and torch.equal(fast.subtask_ids, ids)
    valid = fast.mask[:, None, :, None]  # masked positions may differ (never computed vs padding tokens)
    for k1, k2, v1, v2 in zip(fast.keys, ref.keys, fast.values, ref.values, strict=True):
        assert k1.shape == k2.shape
        assert torch.allclose(k1 * valid, k2 * valid, atol=1e-5) and torch.allclose(v1 * valid, v2 * valid, atol=1e-5)
    noise = torch.randn(B, H, A, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(model.sample_actions(cache=fast, noise=noise), model.sample_actions(cache=ref, noise=noise),
                          atol=1e-5)


def _drafts(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Guesses at the greedy decode `ids` (B, Ls): right, wrong at each position, truncated, junk, other rows'."""
    drafts = {"right": ids.clone(), "shorter tensor": ids[:, :3], "rows swapped": ids.flip(0)}
    for j in range(1, ids.shape[1]):
        wrong = ids.clone()
        wrong[:, j] = torch.where(wrong[:, j] == EOS, EOS + 1, EOS)  # a different token at position j
        drafts[f"wrong at {j}"] = wrong
    one_wrong = ids.clone()
    one_wrong[0, 1] = EOS if ids[0, 1] != EOS else EOS + 1
    drafts["one row wrong"] = one_wrong
    drafts["junk"] = torch.randint(0, 8, ids.shape, generator=torch.Generator().manual_seed(0))
    drafts["no tokens"] = torch.full_like(ids, PAD)
    return drafts


@torch.inference_mode()
def test_subtask_draft_gives_the_greedy_decode_whatever_it_guesses(trained) -> None:
    model, batch = trained
    cache = model.encode_prefix(batch)
    ids, plain = model.generate_subtask(cache)
    noise = torch.randn(B, H, A, generator=torch.Generator().manual_seed(3))
    want = model.sample_actions(cache=plain, noise=noise)
    for name, draft in _drafts(ids).items():
        got, fast = model.generate_subtask(cache, draft=draft)
        assert torch.equal(got, ids), name
        assert torch.equal(fast.mask, plain.mask) and torch.equal(fast.subtask_ids, ids), name
        valid = fast.mask[:, None, :, None]
        for k1, k2, v1, v2 in zip(fast.keys, plain.keys, fast.values, plain.values, strict=True):
            assert torch.allclose(k1 * valid, k2 * valid, atol=1e-5), name
            assert torch.allclose(v1 * valid, v2 * valid, atol=1e-5), name
        assert torch.allclose(model.sample_actions(cache=fast, noise=noise), want, atol=1e-5), name
    with pytest.raises(ValueError, match="draft has 1 rows, the cache 3"):
        model.generate_subtask(cache, draft=ids[:1])


@torch.inference_mode()
def test_a_right_subtask_draft_costs_one_pass(trained, monkeypatch) -> None:
    model, batch = trained
    cache = model.encode_prefix(batch)
    ids, _ = model.generate_subtask(cache)
    calls = []
    block_type = type(model.blocks[0])
    original = block_type.forward_cached
    monkeypatch.setattr(block_type, "forward_cached",
                        lambda self, x, *a: calls.append(x.shape[1]) or original(self, x, *a))
    model.generate_subtask(cache)
    assert len(calls) == model.config.depth * int((ids != PAD).sum(1).max())  # one token per step
    calls.clear()
    model.generate_subtask(cache, draft=ids)
    assert len(calls) == model.config.depth  # one pass over the whole draft


@torch.inference_mode()
def test_prefix_without_pooled_summary_has_the_same_keys() -> None:
    model, batch = model_and_batch()
    full, lean = model.encode_prefix(batch), model.encode_prefix(batch, pooled=False)
    assert lean.pooled is None and full.pooled is not None
    for a, b in zip(full.keys + full.values, lean.keys + lean.values, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="pooled=False"):
        model.predict_progress(lean)


@torch.inference_mode()
def test_bf16_weights_sample_float32_chunks() -> None:
    model, batch = model_and_batch()
    model.eval()
    half = copy.deepcopy(model).to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    noise = torch.randn(B, H, A, generator=torch.Generator().manual_seed(4))
    cache = half.encode_prefix(inputs, pooled=False)
    ids, cache = half.generate_subtask(cache)
    out = half.sample_actions(cache=cache, noise=noise, steps=3)
    # the float32 reference on the same subtask: random weights leave near-ties that bf16 decodes either way
    ref = model.sample_actions(cache=model.extend_subtask(model.encode_prefix(batch, pooled=False), ids), noise=noise,
                               steps=3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 keeps about 3 significant digits per operation; through the trunk, the expert and 3 steps the actions
    # come out within a few percent of their scale, by how much depends on the CPU's bf16 arithmetic
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
