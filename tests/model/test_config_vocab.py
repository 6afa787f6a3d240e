"""ModelConfig presets and JSON round trip; SubtaskVocab encode/decode."""

from __future__ import annotations

import json

import pytest
import torch

from physis.model import PRESETS, ModelConfig, PhysisModel, SubtaskVocab
from physis.model.vocab import BOS, EOS, PAD, UNK


def test_config_round_trips_through_json() -> None:
    cfg = ModelConfig.preset("small", action_dim=9, subtask_vocab=["grasp", "block"], world_model=False)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["subtask_vocab"] == ["grasp", "block"] and data["preset_name"] == "small"
    assert ModelConfig.from_dict(data) == cfg
    assert ModelConfig().preset_name == "small"
    assert cfg.future_offset == cfg.horizon == 16 and cfg.flow_steps == 10 and cfg.image_size == 96


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="action_head"):
        ModelConfig(action_head="diffusion")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        ModelConfig.from_dict({"colour": 1})


@pytest.mark.parametrize(("name", "low", "high"), [("tiny", 0, 1e6), ("small", 2e6, 5e6), ("base", 80e6, 130e6)])
def test_preset_sizes(name: str, low: float, high: float) -> None:
    assert set(PRESETS) == {"tiny", "small", "base"}
    with torch.device("meta"):  # count without allocating or initialising
        model = PhysisModel(ModelConfig.preset(name))
    assert low < model.num_parameters() < high


def test_vocab_encode_decode() -> None:
    vocab = SubtaskVocab.from_labels(["Grasp the block", "carry it to the target", "grasp the block"])
    assert vocab.words == sorted({"grasp", "the", "block", "carry", "it", "to", "target"})
    assert len(vocab) == 4 + 7
    ids = vocab.encode("grasp the block", max_len=8)
    assert ids[0] == BOS and ids[4] == EOS and ids[5:] == [PAD] * 3 and len(ids) == 8
    assert vocab.decode(ids) == "grasp the block"
    assert vocab.encode("grasp the cup", 6)[3] == UNK
    carry, it = vocab.encode("carry", 3)[1], vocab.encode("it", 3)[1]
    assert vocab.encode("carry it to the target", 4) == [BOS, carry, it, EOS]  # truncated, EOS kept
    assert SubtaskVocab(vocab.words).encode("it", 3) == vocab.encode("it", 3)  # rebuilt from saved words
