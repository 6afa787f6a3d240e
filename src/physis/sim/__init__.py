"""Benchmark suites behind one observation format, scripted experts that label subtasks, and collection."""

from physis.sim.base import ActionError, EnvConfig, Expert, Observation, SimEnv
from physis.sim.seeds import EVAL_SEEDS, TRAIN_SEEDS, eval_seeds, train_seeds
from physis.sim.suites import SUITES, Suite, UnknownNameError, get_suite, make_env, resolve_tasks

__all__ = [
    "EVAL_SEEDS", "SUITES", "TRAIN_SEEDS", "ActionError", "EnvConfig", "Expert", "Observation", "SimEnv", "Suite",
    "UnknownNameError", "eval_seeds", "get_suite", "make_env", "resolve_tasks", "train_seeds",
]
