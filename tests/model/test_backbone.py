"""A Hugging Face model from a local directory serves the prefix tokens in place of the trunk."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from physis.model import PhysisModel  # noqa: E402
from tests.model.test_physis_model import make_batch, make_config  # noqa: E402


def test_hf_backbone_from_local_dir(tmp_path) -> None:
    hf_cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=16, max_position_embeddings=128,
    )  # fmt: skip
    transformers.BertModel(hf_cfg).save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = make_config(backbone=f"hf:{tmp_path}")
    model = PhysisModel(cfg)
    assert model.backbone is not None and model.backbone.config.hidden_size == 32
    batch = make_batch(cfg)
    losses = model(batch)
    assert {"action", "subtask", "progress", "world_model"} <= set(losses)
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    with torch.no_grad():
        cache = model.encode_prefix(batch)
        ids, cache = model.generate_subtask(cache)
        assert model.sample_actions(cache=cache, steps=2).shape == (3, cfg.horizon, cfg.action_dim)
        # the prefix really goes through the backbone: changing its weights changes the actions
        noise = torch.randn(3, cfg.horizon, cfg.action_dim)
        a1 = model.sample_actions(batch, noise=noise, steps=2)
        for p in model.backbone.parameters():
            p.add_(0.5)
        assert not torch.allclose(a1, model.sample_actions(batch, noise=noise, steps=2))


def test_backbone_must_be_a_local_hf_dir() -> None:
    with pytest.raises(ValueError, match="hf:/local/dir"):
        make_config(backbone="bert-base-uncased")
