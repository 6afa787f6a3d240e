"""The physis model: tokenizers, trunk, action expert and heads (see physis_model.py)."""

from physis.model.config import PRESETS, ModelConfig
from physis.model.physis_model import PhysisModel
from physis.model.trunk import PrefixCache
from physis.model.vocab import SubtaskVocab

__all__ = ["PRESETS", "ModelConfig", "PhysisModel", "PrefixCache", "SubtaskVocab"]
