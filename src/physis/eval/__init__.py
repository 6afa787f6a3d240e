"""Evaluation: closed-loop rollouts of any policy on held-out seeds, success with confidence intervals,
videos and plots."""

from physis.eval.policies import ChunkPolicy, ExpertPolicy, RandomPolicy
from physis.eval.runner import EvalConfig, evaluate
from physis.eval.stats import wilson_interval

__all__ = ["ChunkPolicy", "EvalConfig", "ExpertPolicy", "RandomPolicy", "evaluate", "wilson_interval"]
